//! CUDA IPC: handles that let another process on the same host map a device allocation, and
//! the identities a peer's export is matched against: this boot of this host, the exporting
//! process (pid and start time, watched through a pidfd while its memory is mapped), each GPU.

use cudarc::driver::sys::{self, CUresult};

use super::{CudaDevice, check, driver};
use crate::error::{Error, Result};

/// Bytes of a CUDA IPC memory handle.
pub(crate) const HANDLE_LEN: usize = 64;

/// One device allocation as another process can open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpcHandle {
    pub handle: [u8; HANDLE_LEN],
    /// The allocation's first byte and length in the exporting process.
    pub base: u64,
    pub len: u64,
}

/// This boot of this host (the kernel's boot id): two processes with equal ids run on one host
/// and may map each other's device memory. `None` where the kernel does not say. Read once.
pub(crate) fn host_id() -> Option<[u8; 16]> {
    static ID: std::sync::OnceLock<Option<[u8; 16]>> = std::sync::OnceLock::new();
    *ID.get_or_init(read_host_id)
}

fn read_host_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(id)
}

/// One process of one boot of a host: its pid and its start time (clock ticks after boot), so
/// that a reused pid is never taken for the same process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ProcessId {
    pub pid: u32,
    pub start: u64,
}

fn start_time(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses); starttime is the
    // 22nd field, the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process, as peers on this host see it.
pub(crate) fn this_process() -> ProcessId {
    ProcessId {
        pid: std::process::id(),
        start: start_time("self").unwrap_or(0),
    }
}

/// A peer process on this host, watched for its exit.
#[derive(Debug)]
pub(crate) struct ProcessWatch {
    pidfd: std::os::fd::OwnedFd,
}

impl ProcessWatch {
    /// Watches `p`; `None` where no process of that pid and start time is visible here (it
    /// exited, or runs in another PID namespace).
    pub(crate) fn open(p: ProcessId) -> Option<Self> {
        let pid = i32::try_from(p.pid).ok().filter(|&pid| pid > 0)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
        let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Checked after the pidfd is held: a pid reused before this point has another start.
        (start_time(&pid.to_string()) == Some(p.start) && p.start != 0).then_some(Self { pidfd })
    }

    /// The process has exited.
    pub(crate) fn exited(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, a zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
    }
}

/// Whether this process can share device memory with same-host peers: it knows its host's
/// boot id and can watch a process through a pidfd (Linux 5.3 and later).
pub fn same_host_ipc() -> std::result::Result<String, String> {
    let host = host_id()
        .ok_or("no /proc/sys/kernel/random/boot_id: peers are never taken for this host")?;
    ProcessWatch::open(this_process())
        .ok_or("pidfd_open failed (Linux before 5.3, or seccomp): same-host peers stay on NIXL")?;
    Ok(format!(
        "boot id {:02x}{:02x}{:02x}{:02x}..., pidfd watch works",
        host[0], host[1], host[2], host[3]
    ))
}

fn uuid_of(dev: sys::CUdevice) -> Result<[u8; 16]> {
    let mut u = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: the driver is loaded; `dev` came from cuDeviceGet; the out pointer is a local.
    check(
        unsafe { sys::cuDeviceGetUuid_v2(&mut u, dev) },
        "cuDeviceGetUuid",
    )?;
    Ok(u.bytes.map(|b| b as u8))
}

/// The ordinal of the GPU with `uuid` among those this process sees; `None` if it sees none.
pub(crate) fn ordinal_of(uuid: &[u8; 16]) -> Option<i32> {
    let d = driver().ok()?;
    (0..d.device_count).find(|&i| {
        let mut dev = 0;
        // SAFETY: the driver is loaded and `i` is in range; the out pointer is a local.
        let ok = unsafe { sys::cuDeviceGet(&mut dev, i) } == CUresult::CUDA_SUCCESS;
        ok && uuid_of(dev).is_ok_and(|u| &u == uuid)
    })
}

impl CudaDevice {
    /// The GPU's UUID: the same GPU in every process, whatever ordinal it has there.
    pub(crate) fn uuid(&self) -> Result<[u8; 16]> {
        uuid_of(self.device)
    }

    /// An IPC handle of the allocation holding `addr` (this device's memory); `Err` saying why
    /// where the allocation cannot be exported (VMM or memory-pool allocations, host memory).
    pub(crate) fn ipc_export(&self, addr: u64) -> Result<IpcHandle> {
        self.bind()?;
        let (mut base, mut size) = (0, 0);
        // SAFETY: the context is current; out pointers are locals; any address is acceptable.
        check(
            unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) },
            "cuMemGetAddressRange",
        )?;
        let mut h = sys::CUipcMemHandle {
            reserved: [0; HANDLE_LEN],
        };
        // SAFETY: `base` is the start of a live allocation of this context; `h` is a local.
        check(
            unsafe { sys::cuIpcGetMemHandle(&mut h, base) },
            "cuIpcGetMemHandle",
        )?;
        Ok(IpcHandle {
            handle: h.reserved.map(|b| b as u8),
            base,
            len: size as u64,
        })
    }

    /// Maps a peer's allocation into this device's context; returns where it starts here.
    /// The mapping must hold at least `handle.len` bytes (else it is closed again and refused).
    pub(crate) fn ipc_open(&self, handle: &IpcHandle) -> Result<u64> {
        self.bind()?;
        let h = sys::CUipcMemHandle {
            reserved: handle.handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the context is current; the handle is plain bytes the driver checks itself.
        check(
            unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, flags) },
            "cuIpcOpenMemHandle",
        )?;
        let (mut base, mut size) = (0, 0);
        // SAFETY: `ptr` was just mapped in this context; out pointers are locals.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
        if r != CUresult::CUDA_SUCCESS || base != ptr || (size as u64) < handle.len {
            self.ipc_close(ptr);
            return Err(Error::Peer(format!(
                "the peer's IPC handle maps {size} bytes, its export claims {}",
                handle.len
            )));
        }
        Ok(ptr)
    }

    /// Unmaps what `ipc_open` mapped.
    pub(crate) fn ipc_close(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle in this context and is closed once.
            let r = unsafe { sys::cuIpcCloseMemHandle(ptr) };
            if r != CUresult::CUDA_SUCCESS {
                tracing::warn!("cuIpcCloseMemHandle({ptr:#x}) failed: {r:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_live_process_is_watched_and_a_dead_one_is_seen_to_exit() {
        let me = super::this_process();
        assert!(me.start > 0);
        let w = super::ProcessWatch::open(me).expect("this process");
        assert!(!w.exited());
        assert!(
            super::ProcessWatch::open(super::ProcessId {
                start: me.start + 1,
                ..me
            })
            .is_none()
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = super::ProcessId {
            pid: child.id(),
            start: super::start_time(&child.id().to_string()).unwrap(),
        };
        let w = super::ProcessWatch::open(id).expect("the child");
        assert!(!w.exited());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(w.exited());
    }

    #[test]
    fn this_host_has_one_boot_id() {
        if std::path::Path::new("/proc/sys/kernel/random/boot_id").exists() {
            let id = super::host_id().expect("a boot id of 32 hex digits");
            assert_eq!(super::host_id(), Some(id));
            assert_ne!(id, [0; 16]);
        }
    }
}
