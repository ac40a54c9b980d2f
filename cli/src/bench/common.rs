//! Helpers every bench shares: medians, error text, block shapes, CUDA result checks.

use cudarc::driver::sys;
use kvxfer::{
    Backends, Context, ContextConfig, CudaDevice, Layout, LayoutConfig, LayoutKind, StorageKind,
    StorageSpec,
};

/// The median; NaN for no samples (a mode the run skipped).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Error text for the bench commands, which report failures as strings.
pub fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// One layer, one outer, bf16: every block is exactly one `fragment`-byte piece.
pub fn fragment_shape(blocks: u64, fragment: u64, alignment: u32) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: fragment / 2,
        dtype_width: 2,
        alignment,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    }
}

/// A CUDA result as the benches report errors.
pub fn ck(r: sys::CUresult, what: &str) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// A Llama-like layer-separate shape: 32 layers, K and V, 16-token pages, bf16, with `inner`
/// chosen so that one (block, layer, outer) fragment is `fragment` bytes. Shared by the GPU
/// benches.
pub fn shape(kind: LayoutKind, blocks: u64, fragment: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: fragment / 32,
        dtype_width: 2,
        alignment: 256,
        kind,
        heads: Default::default(),
    }
}

/// Prints what a bench's columns mean, after its table (not with --json).
pub fn legend(entries: &[(&str, &str)]) {
    println!("\ncolumns:");
    for (name, meaning) in entries {
        println!("  {name:<10} {meaning}");
    }
}

/// A progress bar on stderr for `steps` steps of a bench; drawn only when stderr is a
/// terminal (indicatif hides it otherwise), so logs and pipes stay clean.
pub fn progress(steps: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(steps as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} points, {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A pinned and a device layout of shape `c` on `ctx`: the two ends of host <-> device benches.
pub fn pinned_and_device(ctx: &Context, c: LayoutConfig) -> Result<(Layout, Layout), String> {
    let make = |kind| ctx.new_layout(c, &StorageSpec::new(kind)).map_err(err);
    Ok((make(StorageKind::Pinned)?, make(StorageKind::Device)?))
}

/// Seconds `f` takes.
pub fn secs(f: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t0 = std::time::Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Block ids 0..blocks shuffled twice from `seed`: the source and destination orders of a
/// scattered transfer (the same seed gives the same orders in every process).
pub fn shuffled_ids(blocks: u64, seed: u64) -> (Vec<u64>, Vec<u64>) {
    let mut sb: Vec<u64> = (0..blocks).collect();
    let mut db = sb.clone();
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut sb);
    rng.shuffle(&mut db);
    (sb, db)
}

/// A context without NIXL and its CUDA device, bound on this thread; `what` names the bench
/// in the error on a machine without a GPU.
pub fn gpu_context(what: &str) -> Result<(Context, std::sync::Arc<CudaDevice>), String> {
    gpu_context_with(what, 0)
}

/// As `gpu_context`, with the copy kernel's SM budget `max_sms` (0 = auto).
pub fn gpu_context_with(
    what: &str,
    max_sms: u32,
) -> Result<(Context, std::sync::Arc<CudaDevice>), String> {
    let ctx = Context::new(ContextConfig {
        nixl_backends: Backends::empty(),
        max_sms,
        ..Default::default()
    })
    .map_err(err)?;
    let dev = ctx
        .cuda_device()
        .cloned()
        .ok_or_else(|| format!("{what} needs a CUDA GPU and driver; this machine has none"))?;
    dev.bind().map_err(err)?;
    Ok((ctx, dev))
}

/// Seconds of one synchronous copy of `bytes` between host memory at `host` (pinned or
/// pageable) and device memory at `dev`, to the device when `to_device`.
///
/// # Safety
/// Both ranges are live memory of at least `bytes`; the caller bound the device's context.
pub unsafe fn timed_large_copy(
    host: u64,
    dev: sys::CUdeviceptr,
    bytes: u64,
    to_device: bool,
) -> Result<f64, String> {
    secs(|| {
        // SAFETY: forwarded to the caller.
        let r = unsafe {
            if to_device {
                sys::cuMemcpyHtoD_v2(dev, host as *const std::ffi::c_void, bytes as usize)
            } else {
                sys::cuMemcpyDtoH_v2(host as *mut std::ffi::c_void, dev, bytes as usize)
            }
        };
        ck(
            r,
            if to_device {
                "one large H2D copy"
            } else {
                "one large D2H copy"
            },
        )
    })
}

/// A kernel of the benches' own (`entry` of CUDA C `source`, compiled with kvxfer's NVRTC for
/// `dev`), a stream of its own and a 4-byte scratch output; all live until the process ends.
pub fn bench_kernel(
    dev: &CudaDevice,
    source: &str,
    entry: &std::ffi::CStr,
) -> Result<(sys::CUfunction, sys::CUstream, sys::CUdeviceptr), String> {
    let ptx = kvxfer::baseline::compile_ptx(dev, "kvx_bench.cu", source).map_err(err)?;
    let (mut module, mut function, mut stream) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    let mut out = 0;
    // SAFETY: the bench's context is current; out pointers are locals; the PTX is
    // NUL-terminated; what is made here lives until the process ends.
    unsafe {
        ck(
            sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()),
            "cuModuleLoadData",
        )?;
        ck(
            sys::cuModuleGetFunction(&mut function, module, entry.as_ptr()),
            "cuModuleGetFunction",
        )?;
        ck(sys::cuStreamCreate(&mut stream, 1), "cuStreamCreate")?;
        ck(sys::cuMemAlloc_v2(&mut out, 4), "cuMemAlloc")?;
    }
    Ok((function, stream, out))
}
