//! Anonymous host mappings: page-aligned, zeroed, optionally page-locked.

use super::Region;
use crate::error::{Error, Result, bail};

/// Refuses an allocation larger than the memory the kernel reports available. Pools are
/// populated when made, and populating more than there is would wake the OOM killer instead of
/// returning an error.
pub(super) fn check_available(len: u64) -> Result<()> {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    match available {
        Some(avail) if len > avail => bail!(
            OutOfMemory,
            "cannot allocate {len} bytes of host memory: only {avail} bytes are available"
        ),
        _ => Ok(()),
    }
}

/// One `mmap`ed host allocation, unmapped on drop.
#[derive(Debug)]
pub struct HostAllocation {
    map: *mut libc::c_void,
    map_len: usize,
    addr: usize,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is tied to a thread.
unsafe impl Send for HostAllocation {}
// SAFETY: `HostAllocation` hands out only its address; concurrent access is governed by the
// transfer validation of the layouts that use it.
unsafe impl Sync for HostAllocation {}

/// The transparent huge page size on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

impl HostAllocation {
    /// Maps `len` zeroed bytes whose start is aligned to `alignment` (a power of two). With
    /// `lock`, the pages are locked in RAM (`mlock`), which is what "pinned" means without CUDA.
    pub fn new(len: u64, alignment: u64, lock: bool) -> Result<Self> {
        let too_big = || Error::OutOfMemory(format!("cannot allocate {len} bytes of host memory"));
        let len = usize::try_from(len).map_err(|_| too_big())?;
        if len == 0 {
            bail!(InvalidArgument, "cannot allocate 0 bytes");
        }
        let page = page_size();
        let mut align = usize::try_from(alignment).map_err(|_| too_big())?.max(page);
        if len >= HUGE_PAGE {
            // Scattered block copies touch a new page per fragment; with 4 KiB pages that is a
            // TLB miss on each side. Huge-page alignment lets the kernel back pools with THP.
            align = align.max(HUGE_PAGE);
        }
        // mmap aligns to a page; a larger alignment is found inside a bigger mapping.
        let map_len = len
            .checked_add(align - page)
            .and_then(|l| l.checked_next_multiple_of(page))
            .ok_or_else(too_big)?;
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            bail!(OutOfMemory, "mmap of {map_len} bytes failed: {e}");
        }
        let addr = (map as usize).next_multiple_of(align);
        let this = Self {
            map,
            map_len,
            addr,
            len,
        };
        if len >= HUGE_PAGE {
            // Advisory: without THP support the pages simply stay small.
            // SAFETY: [addr, addr+len) lies inside the mapping just created.
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        this.populate(page)?;
        if lock {
            // SAFETY: [addr, addr+len) lies inside the mapping just created.
            if unsafe { libc::mlock(addr as *const libc::c_void, len) } != 0 {
                let e = std::io::Error::last_os_error();
                bail!(
                    OutOfMemory,
                    "cannot page-lock {len} bytes of pinned memory: {e} (raise `ulimit -l` \
                     or give the process CAP_IPC_LOCK)"
                );
            }
        }
        Ok(this)
    }

    /// Faults every page in now, so a pool is ready when made: the first transfer into it does
    /// not pay for page faults.
    fn populate(&self, page: usize) -> Result<()> {
        // SAFETY: [addr, addr+len) lies inside this mapping.
        let rc = unsafe {
            libc::madvise(
                self.addr as *mut libc::c_void,
                self.len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            bail!(
                OutOfMemory,
                "cannot populate {} bytes of host memory: {e}",
                self.len
            );
        }
        // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte per page.
        for off in (0..self.len).step_by(page) {
            // SAFETY: inside the mapping; the memory is zero, so writing 0 changes nothing.
            unsafe { std::ptr::write_volatile((self.addr + off) as *mut u8, 0) };
        }
        Ok(())
    }

    pub fn region(&self) -> Region {
        Region {
            addr: self.addr as u64,
            len: self.len as u64,
        }
    }
}

impl Drop for HostAllocation {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are exactly what mmap returned; munmap also drops any lock.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}
