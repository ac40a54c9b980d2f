//! `kvxfer bench --gpu --busy`: transfers beside an engine's compute. A compute-bound load
//! (an NVRTC-compiled kernel launched 50 times, each eight waves of short blocks as a GEMM's
//! tiles are: every SM busy for ~50 ms, like a prefill's GEMMs) runs on its own stream; as it starts, kvxfer moves 256 MiB of
//! scattered fragments between pinned and device memory in one transfer, in each copy mode.
//! Reported: how much longer the load took than alone (alone and with alternate, medians) and
//! the transfer's GB/s (submit to wait) against the idle link.

use std::ffi::c_void;

use cudarc::driver::sys;
use kvxfer::baseline::{compile_ptx, sm_count};
use kvxfer::{CopyMode, StorageKind, StorageSpec, TransferOptions};

use super::common::{
    ck, err, fragment_shape, gpu_context, legend, median, secs, shuffled_ids, timed_large_copy,
};

pub struct BusyArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
}

/// Independent FMA chains per thread, so that the SMs' FMA pipes stay full.
const SPIN: &str = r#"
extern "C" __global__ void kvx_bench_spin(float *out, unsigned iters) {
    float a = threadIdx.x * 1e-3f, b = blockIdx.x * 1e-3f, c = 0.5f, d = 0.25f;
    const float x = 0.99999f, y = 1e-7f;
    for (unsigned i = 0; i < iters; i++) {
        a = fmaf(a, x, y); b = fmaf(b, x, y); c = fmaf(c, x, y); d = fmaf(d, x, y);
    }
    if (a + b + c + d == 1234.5f) out[0] = a;
}
"#;

/// Threads per block of the compute kernel; blocks per SM fill it.
const THREADS: u32 = 512;
/// How long the compute load should run alone.
const COMPUTE_MS: f64 = 50.0;
/// Kernel launches of the load: like a model's GEMMs, one after another on one stream.
const LAUNCHES: u32 = 50;
/// Waves of blocks per launch. A GEMM of a prefill cuts its output into many more tiles than
/// the GPU runs at once (8192² in 128×256 tiles: ~16 waves on 132 SMs), so a few SMs taken by
/// a copy delay a few tiles, not the kernel's last wave. (A load of exactly one wave per
/// launch is the worst case instead: one SM taken makes a second, almost empty wave.)
const WAVES: u32 = 8;

/// The compute load: the loaded kernel, its launch shape and its own stream and events.
struct Compute {
    function: sys::CUfunction,
    blocks: u32,
    iters: u32,
    out: sys::CUdeviceptr,
    stream: sys::CUstream,
    start: sys::CUevent,
    end: sys::CUevent,
}

impl Compute {
    fn new(dev: &kvxfer::CudaDevice) -> Result<Self, String> {
        let ptx = compile_ptx(dev, "kvx_bench_spin.cu", SPIN).map_err(err)?;
        let (mut module, mut function) = (std::ptr::null_mut(), std::ptr::null_mut());
        let (mut stream, mut start, mut end) = (
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
                sys::cuModuleGetFunction(&mut function, module, c"kvx_bench_spin".as_ptr()),
                "cuModuleGetFunction",
            )?;
            ck(sys::cuStreamCreate(&mut stream, 1), "cuStreamCreate")?;
            ck(sys::cuEventCreate(&mut start, 0), "cuEventCreate")?;
            ck(sys::cuEventCreate(&mut end, 0), "cuEventCreate")?;
            ck(sys::cuMemAlloc_v2(&mut out, 4), "cuMemAlloc")?;
        }
        let mut per_sm = 0;
        // SAFETY: a live function; the out pointer is a local.
        ck(
            unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut per_sm,
                    function,
                    THREADS as i32,
                    0,
                )
            },
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )?;
        let mut c = Self {
            function,
            blocks: sm_count(dev) * per_sm.max(1) as u32 * WAVES,
            iters: 1 << 10,
            out,
            stream,
            start,
            end,
        };
        // Calibrate to COMPUTE_MS (the first run also loads the module).
        c.alone()?;
        let ms = c.alone()?;
        c.iters = ((f64::from(c.iters) * COMPUTE_MS / ms.max(1e-3)) as u32).max(1);
        Ok(c)
    }

    /// Queues the compute load (LAUNCHES kernels) between the two events.
    fn launch(&self) -> Result<(), String> {
        let mut out = self.out;
        let mut iters = self.iters;
        let mut params: [*mut c_void; 2] = [
            (&raw mut out).cast::<c_void>(),
            (&raw mut iters).cast::<c_void>(),
        ];
        // SAFETY: live function, stream and events; the parameters match the kernel's and are
        // copied during the call.
        unsafe {
            ck(sys::cuEventRecord(self.start, self.stream), "cuEventRecord")?;
            for _ in 0..LAUNCHES {
                ck(
                    sys::cuLaunchKernel(
                        self.function,
                        self.blocks,
                        1,
                        1,
                        THREADS,
                        1,
                        1,
                        0,
                        self.stream,
                        params.as_mut_ptr(),
                        std::ptr::null_mut(),
                    ),
                    "cuLaunchKernel",
                )?;
            }
            ck(sys::cuEventRecord(self.end, self.stream), "cuEventRecord")
        }
    }

    /// Milliseconds of the load queued last, once it finished.
    fn elapsed_ms(&self) -> Result<f64, String> {
        let mut ms = 0f32;
        // SAFETY: live events, both recorded on the compute stream.
        unsafe {
            ck(sys::cuEventSynchronize(self.end), "cuEventSynchronize")?;
            ck(
                sys::cuEventElapsedTime(&mut ms, self.start, self.end),
                "cuEventElapsedTime",
            )?;
        }
        Ok(f64::from(ms))
    }

    fn alone(&self) -> Result<f64, String> {
        self.launch()?;
        self.elapsed_ms()
    }
}

pub fn run(a: &BusyArgs) -> Result<(), String> {
    let (ctx, dev) = gpu_context("bench --gpu --busy")?;
    let compute = Compute::new(&dev)?;
    let total = a.total_mib << 20;
    let big = fragment_shape(1, total, 4096);
    let pinned = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Pinned))
        .map_err(err)?;
    let device = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Device))
        .map_err(err)?;
    let (p, d) = (
        pinned.region(0, 0, 0).map_err(err)?.addr,
        device.region(0, 0, 0).map_err(err)?.addr,
    );
    // The idle link: one large copy each way, no compute running.
    let limit = |to_device: bool| -> Result<f64, String> {
        let mut t = Vec::new();
        for _ in 0..=a.iters {
            // SAFETY: both buffers hold `total` bytes; the device's context is bound.
            t.push(unsafe { timed_large_copy(p, d, total, to_device) }?);
        }
        t.remove(0);
        Ok(total as f64 / median(t) / 1e9)
    };
    let limits = [limit(true)?, limit(false)?];
    if !a.json {
        println!(
            "beside a compute load on every SM ({:.0} ms alone, {LAUNCHES} launches of {} blocks x {THREADS}, {WAVES} waves each): {} MiB per transfer, median of {}",
            compute.alone()?,
            compute.blocks,
            a.total_mib,
            a.iters
        );
        println!(
            "{:<4} {:<11} {:>8} {:>9} {:>7} {:>10} {:>10} {:>9} {:>4}",
            "dir", "mode", "fragment", "GB/s", "ratio", "alone ms", "with ms", "slowdown", "SMs"
        );
    }
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        let blocks = total / fragment;
        let c = fragment_shape(blocks, fragment, 4096);
        let host = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Pinned))
            .map_err(err)?;
        let gpu = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Device))
            .map_err(err)?;
        let (sb, db) = shuffled_ids(blocks, kib);
        for (dir, to_device) in [("H2D", true), ("D2H", false)] {
            let (src, dst) = if to_device {
                (&host, &gpu)
            } else {
                (&gpu, &host)
            };
            for (mode_name, mode) in [
                ("auto", CopyMode::Auto),
                ("kernel", CopyMode::Kernel),
                ("copy_engine", CopyMode::CopyEngine),
            ] {
                let opts = TransferOptions {
                    copy_mode: mode,
                    ..Default::default()
                };
                let (mut alone, mut with, mut gbps) = (Vec::new(), Vec::new(), Vec::new());
                let mut sms = 0;
                // Round 0 warms up; alone and with alternate so that clock drift hits both.
                for i in 0..=a.iters {
                    let ms_alone = compute.alone()?;
                    compute.launch()?;
                    // One transfer submitted as the load starts, as a runtime offloads or
                    // reloads beside a prefill: what it costs the load, and how fast it moves.
                    let took = secs(|| {
                        let t = ctx.submit(src, &sb, dst, &db, &opts).map_err(err)?;
                        t.wait(None).map_err(err)?;
                        sms = t.stats().sms;
                        Ok(())
                    })?;
                    let ms_with = compute.elapsed_ms()?;
                    if i > 0 {
                        alone.push(ms_alone);
                        with.push(ms_with);
                        gbps.push(total as f64 / took / 1e9);
                    }
                }
                let (alone, with, gbps) = (median(alone), median(with), median(gbps));
                let limit = limits[usize::from(!to_device)];
                let (ratio, slowdown) = (gbps / limit, with / alone - 1.0);
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": "busy", "direction": dir, "mode": mode_name,
                            "fragment_bytes": fragment, "bytes": total, "iters": a.iters,
                            "transfer_gbps": gbps, "limit_gbps": limit,
                            "transfer_ratio": ratio, "compute_alone_ms": alone,
                            "compute_with_transfer_ms": with, "compute_slowdown": slowdown,
                            "sms": sms,
                        })
                    );
                } else {
                    println!(
                        "{dir:<4} {mode_name:<11} {kib:>4} KiB {gbps:>9.2} {ratio:>7.3} {alone:>10.2} {with:>10.2} {:>8.1}% {sms:>4}",
                        slowdown * 100.0
                    );
                }
            }
        }
    }
    if !a.json {
        legend(&[
            (
                "GB/s",
                "one kvxfer transfer (scattered pinned <-> device fragments, ids shuffled), submitted as the compute load starts",
            ),
            (
                "ratio",
                "GB/s / one large idle copy of the same bytes in that direction (the link)",
            ),
            (
                "alone / with",
                "the compute kernel's device time alone, and with the transfers beside it",
            ),
            ("slowdown", "with / alone - 1: what the engine loses"),
            (
                "SMs",
                "SMs the copy kernel ran on (stats.sms; 0: copy engines)",
            ),
        ]);
    }
    Ok(())
}
