//! The SM gather/scatter kernel (`copy_fragments.cu`), built with NVRTC and loaded into the
//! device's primary context on first use.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUfunction, CUmodule, CUstream};

use super::device::CudaDevice;
use super::driver::check;
use super::nvrtc;
use crate::error::Result;

const SOURCE: &str = include_str!("copy_fragments.cu");
const THREADS: u32 = 256;
/// Blocks per SM when the list is long enough; more only adds scheduling.
const BLOCKS_PER_SM: u32 = 8;

#[derive(Debug)]
pub struct Kernel {
    module: CUmodule,
    function: CUfunction,
    max_blocks: u32,
}

// SAFETY: a loaded module and its function may be used from any thread of the process once the
// owning context is current there.
unsafe impl Send for Kernel {}
// SAFETY: as above; launching does not mutate the handle.
unsafe impl Sync for Kernel {}

impl Kernel {
    pub fn build(dev: &CudaDevice) -> Result<Self> {
        let (major, minor) = dev.compute_capability;
        let ptx = nvrtc::compile_ptx(
            SOURCE,
            "copy_fragments.cu",
            &format!("compute_{major}{minor}"),
        )?;
        dev.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: `ptx` is a NUL-terminated PTX image; the context is current.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()) },
            "cuModuleLoadData (copy kernel)",
        )?;
        let mut function = std::ptr::null_mut();
        // SAFETY: `module` was just loaded; the name is NUL-terminated.
        let r = unsafe {
            sys::cuModuleGetFunction(&mut function, module, c"kvx_copy_fragments".as_ptr())
        };
        if let Err(e) = check(r, "cuModuleGetFunction") {
            // SAFETY: unloading the module loaded above.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        Ok(Self {
            module,
            function,
            max_blocks: dev.sm_count * BLOCKS_PER_SM,
        })
    }

    /// Queues the copy of `count` table entries (u64 triples at device address `table`).
    pub fn launch(&self, stream: CUstream, table: u64, count: u64) -> Result<()> {
        let warps_per_block = u64::from(THREADS / 32);
        let blocks = count
            .div_ceil(warps_per_block)
            .clamp(1, u64::from(self.max_blocks)) as u32;
        let (mut table, mut count) = (table, count);
        let mut params: [*mut c_void; 2] = [
            (&mut table as *mut u64).cast(),
            (&mut count as *mut u64).cast(),
        ];
        // SAFETY: the function takes (const u64*, u64), matching `params`; the caller bound the
        // context and keeps the table alive until the stream passes this launch.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    self.function,
                    blocks,
                    1,
                    1,
                    THREADS,
                    1,
                    1,
                    0,
                    stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel (copy kernel)",
        )
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: the module was loaded by `build` and is unloaded once; the owner bound the
        // context before dropping.
        unsafe { sys::cuModuleUnload(self.module) };
    }
}
