//! CUDA-owned memory: pinned host memory (`cuMemHostAlloc`, portable and device-mapped), device
//! memory (`cuMemAlloc`), and caller host memory registered so that kernels can reach it.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};

use super::Region;
use crate::cuda::{CudaDevice, check};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pinned,
    Device,
}

/// One CUDA allocation, freed on drop (with the device's context bound).
#[derive(Debug)]
pub struct CudaAllocation {
    dev: Arc<CudaDevice>,
    kind: Kind,
    base: u64,
    addr: u64,
    len: u64,
}

fn oom_or(r: CUresult, what: &str, len: u64) -> Result<()> {
    if r == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(Error::OutOfMemory(format!(
            "{what} of {len} bytes: out of memory"
        )));
    }
    check(r, what)
}

impl CudaAllocation {
    /// `len` bytes aligned to `alignment` (a power of two), zeroed.
    fn new(dev: &Arc<CudaDevice>, kind: Kind, len: u64, alignment: u64) -> Result<Self> {
        dev.bind()?;
        let natural = if kind == Kind::Pinned { 4096 } else { 256 };
        let pad = alignment.saturating_sub(natural);
        let total = len
            .checked_add(pad)
            .and_then(|t| usize::try_from(t).ok())
            .ok_or_else(|| Error::OutOfMemory(format!("cannot allocate {len} bytes")))?;
        let base = match kind {
            Kind::Pinned => {
                super::host::check_available(total as u64)?;
                let mut p = std::ptr::null_mut();
                let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
                // SAFETY: the context is current; the out pointer is a local.
                oom_or(
                    unsafe { sys::cuMemHostAlloc(&mut p, total, flags) },
                    "cuMemHostAlloc",
                    len,
                )?;
                // SAFETY: `p` holds `total` bytes just allocated.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, total) };
                p as u64
            }
            Kind::Device => {
                let mut p = 0;
                // SAFETY: the context is current; the out pointer is a local.
                oom_or(
                    unsafe { sys::cuMemAlloc_v2(&mut p, total) },
                    "cuMemAlloc",
                    len,
                )?;
                // SAFETY: `p` is a device allocation of `total` bytes.
                let r = unsafe { sys::cuMemsetD8_v2(p, 0, total) };
                if let Err(e) = check(r, "cuMemsetD8") {
                    // SAFETY: freeing what was just allocated.
                    unsafe { sys::cuMemFree_v2(p) };
                    return Err(e);
                }
                p
            }
        };
        Ok(Self {
            dev: dev.clone(),
            kind,
            base,
            addr: base.next_multiple_of(alignment.max(1)),
            len,
        })
    }

    pub fn pinned(dev: &Arc<CudaDevice>, len: u64, alignment: u64) -> Result<Self> {
        Self::new(dev, Kind::Pinned, len, alignment)
    }

    pub fn device(dev: &Arc<CudaDevice>, len: u64, alignment: u64) -> Result<Self> {
        Self::new(dev, Kind::Device, len, alignment)
    }

    pub fn region(&self) -> Region {
        Region {
            addr: self.addr,
            len: self.len,
        }
    }
}

impl Drop for CudaAllocation {
    fn drop(&mut self) {
        if self.dev.bind().is_err() {
            return;
        }
        // SAFETY: `base` came from the matching allocation call and is freed once.
        unsafe {
            match self.kind {
                Kind::Pinned => sys::cuMemFreeHost(self.base as *mut _),
                Kind::Device => sys::cuMemFree_v2(self.base),
            };
        }
    }
}

/// Caller host memory page-locked and mapped for the device by kvxfer; unregistered on drop.
#[derive(Debug)]
pub struct HostRegistration {
    dev: Arc<CudaDevice>,
    addr: u64,
}

impl HostRegistration {
    /// Makes sure the device can reach [addr, addr+len): memory CUDA already knows is left as it
    /// is (`None`); other memory is registered.
    pub fn ensure(dev: &Arc<CudaDevice>, addr: u64, len: u64) -> Result<Option<Self>> {
        dev.bind()?;
        let mut ty: u32 = 0;
        // SAFETY: the context is current; the attribute is an unsigned int.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ty as *mut u32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                addr,
            )
        };
        if r == CUresult::CUDA_SUCCESS {
            return Ok(None); // already pinned or registered with CUDA
        }
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: the caller promises [addr, addr+len) is its live host memory.
        let r = unsafe { sys::cuMemHostRegister_v2(addr as *mut _, len as usize, flags) };
        check(r, "cuMemHostRegister")?;
        Ok(Some(Self {
            dev: dev.clone(),
            addr,
        }))
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: registered by `ensure`, unregistered once.
            unsafe { sys::cuMemHostUnregister(self.addr as *mut _) };
        }
    }
}
