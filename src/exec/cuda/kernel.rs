//! The SM copy kernel (`copy_blocks.cu`): built with NVRTC (once per process and GPU
//! architecture), loaded into each device's primary context, launched with a descriptor of the
//! two layouts and the block pairs, so the host never expands fragments.

use std::ffi::{CString, c_void};
use std::sync::Mutex;

use cudarc::driver::sys::{self, CUfunction, CUmodule, CUstream};

use super::device::{CudaDevice, TableBuffer};
use super::driver::check;
use super::nvrtc;
use crate::error::Result;
use crate::layout::{Layout, LayoutKind};

const SOURCE: &str = include_str!("copy_blocks.cu");
const THREADS: u32 = 256;
/// Bytes one warp copies per item: regions larger than this are shared between warps.
const PIECE: u64 = 64 << 10;

/// PTX by compute capability: NVRTC runs once per process and architecture.
static PTX: Mutex<Vec<((i32, i32), CString)>> = Mutex::new(Vec::new());

fn ptx(cc: (i32, i32)) -> Result<CString> {
    let mut cache = PTX.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = cache.iter().find(|(k, _)| *k == cc) {
        return Ok(p.clone());
    }
    let p = nvrtc::compile_ptx(
        SOURCE,
        "copy_blocks.cu",
        &format!("compute_{}{}", cc.0, cc.1),
    )?;
    cache.push((cc, p.clone()));
    Ok(p)
}

/// One side of the descriptor; mirrors `struct Side` in copy_blocks.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Side {
    kind: u64,
    num_blocks: u64,
    block_stride: u64,
    bases: u64,
}

/// Mirrors `struct Desc` in copy_blocks.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    src: Side,
    dst: Side,
    region: u64,
    outer: u64,
    layer_begin: u64,
    layers: u64,
    piece: u64,
    pieces_per_region: u64,
    pairs: u64,
    pair_ids: u64,
    wide_ids: u64,
    items: u64,
}

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

/// What the kernel moves: `pairs[i] = (src id, dst id)` for the layers in `layers`.
pub struct Job<'a> {
    pub src: &'a Layout,
    pub dst: &'a Layout,
    pub src_blocks: &'a [u64],
    pub dst_blocks: &'a [u64],
    pub layers: std::ops::Range<u64>,
}

fn side(l: &Layout, bases: u64) -> Side {
    Side {
        kind: match l.config().kind {
            LayoutKind::FullyContiguous => 0,
            LayoutKind::LayerSeparateBlockFirst => 1,
            LayoutKind::LayerSeparateOuterFirst => 2,
        },
        num_blocks: l.config().num_blocks,
        block_stride: l.geometry().block_stride,
        bases,
    }
}

impl Kernel {
    pub fn build(dev: &CudaDevice) -> Result<Self> {
        let ptx = ptx(dev.compute_capability)?;
        dev.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: `ptx` is a NUL-terminated PTX image; the context is current.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()) },
            "cuModuleLoadData (copy kernel)",
        )?;
        let mut function = std::ptr::null_mut();
        // SAFETY: `module` was just loaded; the name is NUL-terminated.
        let r =
            unsafe { sys::cuModuleGetFunction(&mut function, module, c"kvx_copy_blocks".as_ptr()) };
        if let Err(e) = check(r, "cuModuleGetFunction") {
            // SAFETY: unloading the module loaded above.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        // One wave of resident blocks: the grid-stride loop gives every block the same share,
        // so a grid larger than what fits at once ends in a partly empty last wave (with 3
        // resident blocks per SM, 8 per SM ran as 2.67 waves).
        let mut per_sm = 0;
        // SAFETY: `function` is live; the out pointer is a local; no dynamic shared memory.
        let r = unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut per_sm,
                function,
                THREADS as i32,
                0,
            )
        };
        if let Err(e) = check(r, "cuOccupancyMaxActiveBlocksPerMultiprocessor") {
            // SAFETY: unloading the module loaded above.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        Ok(Self {
            module,
            function,
            max_blocks: dev.sm_count * (per_sm.max(1) as u32),
        })
    }

    /// Writes the layouts' bases and the block pairs into a pooled table, copies it to the
    /// device on `stream` and launches the kernel there with the descriptor as its parameter.
    /// The returned table must stay untouched until the stream has passed this work.
    ///
    /// # Safety
    /// `stream` is a live stream of `dev`; the job was validated and both layouts' memory stays
    /// alive until the stream has passed this work.
    pub unsafe fn enqueue(
        &self,
        dev: &CudaDevice,
        stream: CUstream,
        job: &Job<'_>,
    ) -> Result<TableBuffer> {
        let (src, dst) = (job.src, job.dst);
        let (src_regions, dst_regions) = (src.memory().regions(), dst.memory().regions());
        let pairs = job.src_blocks.len();
        // u32 ids halve the table the host writes and the GPU reads before it starts.
        let wide = src.config().num_blocks > u64::from(u32::MAX)
            || dst.config().num_blocks > u64::from(u32::MAX);
        let pair_words = if wide { 2 * pairs } else { pairs };
        let words = src_regions.len() + dst_regions.len() + pair_words;
        let table = dev.table(words)?;
        let region = src.region_len();
        let outer = src.config().outer_dim;
        let layers = job.layers.end - job.layers.start;
        let pieces_per_region = region.div_ceil(PIECE);
        let items = pairs as u64 * layers * outer * pieces_per_region;
        let at = |word: usize| table.device + 8 * word as u64;
        let desc = Desc {
            src: side(src, at(0)),
            dst: side(dst, at(src_regions.len())),
            region,
            outer,
            layer_begin: job.layers.start,
            layers,
            piece: PIECE,
            pieces_per_region,
            pairs: pairs as u64,
            pair_ids: at(src_regions.len() + dst_regions.len()),
            wide_ids: u64::from(wide),
            items,
        };
        // SAFETY: the host table holds at least `words` u64s, none read by queued work (pool
        // contract).
        let host = unsafe { std::slice::from_raw_parts_mut(table.host, words) };
        let (bases, ids) = host.split_at_mut(src_regions.len() + dst_regions.len());
        for (w, r) in bases.iter_mut().zip(src_regions.iter().chain(dst_regions)) {
            *w = r.addr;
        }
        let pairs_in = job.src_blocks.iter().zip(job.dst_blocks);
        if wide {
            for (w, (s, d)) in ids.chunks_exact_mut(2).zip(pairs_in) {
                w[0] = *s;
                w[1] = *d;
            }
        } else {
            // Little-endian: the low half is read as the u32 source id, the high as the
            // destination id. Both fit (checked above).
            for (w, (s, d)) in ids.iter_mut().zip(pairs_in) {
                *w = *s | (*d << 32);
            }
        }
        let launch = || -> Result<()> {
            // SAFETY: both buffers hold `words` u64s; the host one is pinned, so the copy is
            // asynchronous and ordered before the launch on the same stream.
            check(
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(table.device, table.host.cast(), words * 8, stream)
                },
                "cuMemcpyHtoDAsync (copy kernel tables)",
            )?;
            self.launch(stream, desc)
        };
        match launch() {
            Ok(()) => Ok(table),
            Err(e) => {
                // SAFETY: a live stream; queued work must finish before the table is reused.
                unsafe { sys::cuStreamSynchronize(stream) };
                dev.recycle_table(table);
                Err(e)
            }
        }
    }

    fn launch(&self, stream: CUstream, desc: Desc) -> Result<()> {
        let warps_per_block = u64::from(THREADS / 32);
        let blocks = desc
            .items
            .div_ceil(warps_per_block)
            .clamp(1, u64::from(self.max_blocks)) as u32;
        let mut desc = desc;
        let mut params: [*mut c_void; 1] = [(&mut desc as *mut Desc).cast()];
        // SAFETY: the function takes (const Desc) by value, matching `params`; the driver
        // copies the parameter during the call. The caller bound the context and keeps the
        // tables alive until the stream passes this launch.
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
