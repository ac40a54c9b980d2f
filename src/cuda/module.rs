//! A CUDA module built from CUDA C source with NVRTC (once per process, source and GPU
//! architecture), loaded into a device's primary context, and launches of its entry points.

use std::ffi::{CStr, CString, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUfunction, CUmodule, CUstream};

use super::device::CudaDevice;
use super::driver::check;
use super::nvrtc;
use crate::error::Result;

/// PTX by (source name, compute capability).
type PtxCache = Vec<((&'static str, (i32, i32)), CString)>;
static PTX: Mutex<PtxCache> = Mutex::new(Vec::new());

fn ptx(name: &'static str, source: &str, cc: (i32, i32)) -> Result<CString> {
    let mut cache = PTX.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = cache.iter().find(|(k, _)| *k == (name, cc)) {
        return Ok(p.clone());
    }
    let p = nvrtc::compile_ptx(source, name, &format!("compute_{}{}", cc.0, cc.1))?;
    cache.push(((name, cc), p.clone()));
    Ok(p)
}

/// One entry point of a module and how many of its blocks fill the GPU once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    function: CUfunction,
    pub(crate) max_blocks: u32,
    threads: u32,
}

// SAFETY: a function handle may be used from any thread once its context is current there.
unsafe impl Send for Entry {}
// SAFETY: as above; launching does not mutate it.
unsafe impl Sync for Entry {}

/// A loaded module; unloaded on drop (it keeps its device, and so the context, alive).
#[derive(Debug)]
pub(crate) struct Module {
    dev: Arc<CudaDevice>,
    module: CUmodule,
}

// SAFETY: a loaded module may be used from any thread of the process once the owning context
// is current there.
unsafe impl Send for Module {}
// SAFETY: as above; nothing mutates the handle.
unsafe impl Sync for Module {}

impl Module {
    /// Compiles `source` (named `name`) for `dev`'s architecture and loads it there.
    pub(crate) fn build(dev: &Arc<CudaDevice>, name: &'static str, source: &str) -> Result<Self> {
        let ptx = ptx(name, source, dev.compute_capability)?;
        dev.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: `ptx` is a NUL-terminated PTX image; the context is current.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()) },
            "cuModuleLoadData",
        )?;
        Ok(Self {
            dev: dev.clone(),
            module,
        })
    }

    /// Entry point `name`, launched with `threads` threads per block.
    pub(crate) fn entry(&self, name: &CStr, threads: u32) -> Result<Entry> {
        let mut function = std::ptr::null_mut();
        // SAFETY: the module is loaded; the name is NUL-terminated.
        check(
            unsafe { sys::cuModuleGetFunction(&mut function, self.module, name.as_ptr()) },
            "cuModuleGetFunction",
        )?;
        // One wave of resident blocks: a grid-stride loop gives every block the same share, so
        // a grid larger than what fits at once ends in a partly empty last wave (with 3
        // resident blocks per SM, 8 per SM ran as 2.67 waves).
        let mut per_sm = 0;
        // SAFETY: `function` is live; the out pointer is a local; no dynamic shared memory.
        check(
            unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut per_sm,
                    function,
                    threads as i32,
                    0,
                )
            },
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )?;
        // What the compiler made of it (KVX_LOG=kvxfer=debug): beside an engine's kernels a
        // copy loop's speed has hung on its code's shape (docs/BENCHMARKS.md, session 15).
        if tracing::enabled!(tracing::Level::DEBUG) {
            let attr = |a| {
                let mut v = 0;
                // SAFETY: `function` is live; the out pointer is a local.
                let r = unsafe { sys::cuFuncGetAttribute(&mut v, a, function) };
                if r == sys::CUresult::CUDA_SUCCESS {
                    v
                } else {
                    -1
                }
            };
            use sys::CUfunction_attribute as A;
            tracing::debug!(
                entry = ?name,
                registers = attr(A::CU_FUNC_ATTRIBUTE_NUM_REGS),
                local_bytes = attr(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                const_bytes = attr(A::CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES),
                blocks_per_sm = per_sm,
                "kernel entry loaded"
            );
        }
        Ok(Entry {
            function,
            max_blocks: self.dev.sm_count * (per_sm.max(1) as u32),
            threads,
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            // SAFETY: the module was loaded by `build` and is unloaded once.
            unsafe { sys::cuModuleUnload(self.module) };
        }
    }
}

impl Entry {
    /// Launches this entry with `blocks` blocks (at most one wave) and its single parameter at
    /// `param`.
    ///
    /// # Safety
    /// `param` points to the parameter the entry takes; the caller bound the context of the
    /// entry's module, `stream` belongs to it, and every buffer the launch reads or writes stays
    /// alive until the stream passes it.
    pub(crate) unsafe fn launch(
        self,
        stream: CUstream,
        param: *mut c_void,
        blocks: u32,
    ) -> Result<()> {
        let mut params: [*mut c_void; 1] = [param];
        // SAFETY: forwarded to the caller; the driver copies the parameter during the call.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    self.function,
                    blocks.clamp(1, self.max_blocks),
                    1,
                    1,
                    self.threads,
                    1,
                    1,
                    0,
                    stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }
}
