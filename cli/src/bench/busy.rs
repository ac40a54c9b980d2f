//! `kvxfer bench --gpu --busy`: transfers beside an engine's compute. A compute-bound load
//! (an NVRTC-compiled tensor-core kernel launched 50 times, each eight waves of short blocks,
//! two 8-warp blocks per SM, as a GEMM's tiles are: every SM busy for ~50 ms, like a prefill's
//! GEMMs) runs on its own stream; as it starts, kvxfer moves 256 MiB of
//! scattered fragments between pinned and device memory in one transfer, in each copy mode.
//! Reported: how much longer the load took than alone (alone and with alternate, medians) and
//! the transfer's GB/s (submit to wait) against the idle link.

use std::ffi::c_void;

use cudarc::driver::sys;
use kvxfer::baseline::sm_count;
use kvxfer::{CopyMode, TransferOptions};

use super::common::{
    bench_kernel, ck, err, fragment_shape, gpu_context_with, legend, median, pinned_and_device,
    secs, shuffled_ids, timed_large_copy,
};

pub struct BusyArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
    pub max_sms: u32,
}

/// Tensor-core work, as a GEMM's: four independent bf16 MMA chains per warp (m16n8k16, f32
/// accumulators) keep the tensor pipes full while the warps mostly wait on them, leaving
/// issue slots free, as a real GEMM does. (A load of plain FMA chains instead issues an
/// instruction every cycle on every scheduler and starves any other warp on its SMs: beside it
/// the copy kernel moved 0.1-0.4 of the link; docs/BENCHMARKS.md.)
const SPIN: &str = include_str!("busy_load.cu");

/// Threads per block of the compute load: a GEMM's CTA (8 warps).
const THREADS: u32 = 256;
/// Blocks of the load resident per SM, as a GEMM's tiles are: each holds a large share of the
/// SM's shared memory (reserved here, not used), so an SM runs two of them, 16 warps, which
/// keep its tensor pipes full. A load that fills every thread slot instead (2048 per SM)
/// leaves no room for any other kernel's warps, which no engine's GEMM or attention kernel
/// does.
const BLOCKS_PER_SM: i32 = 2;
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
    /// Dynamic shared memory each block reserves, and the blocks per SM that leaves.
    smem: u32,
    per_sm: u32,
    blocks: u32,
    iters: u32,
    out: sys::CUdeviceptr,
    stream: sys::CUstream,
    start: sys::CUevent,
    end: sys::CUevent,
}

impl Compute {
    fn new(dev: &kvxfer::CudaDevice) -> Result<Self, String> {
        let (function, stream, out) = bench_kernel(dev, SPIN, c"kvx_bench_spin")?;
        let (mut start, mut end) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the bench's context is current; the out pointers are locals; the events
        // live until the process ends.
        unsafe {
            ck(sys::cuEventCreate(&mut start, 0), "cuEventCreate")?;
            ck(sys::cuEventCreate(&mut end, 0), "cuEventCreate")?;
        }
        let (mut device, mut smem_per_sm) = (0, 0);
        // SAFETY: a live device ordinal; the out pointers are locals.
        unsafe {
            ck(sys::cuDeviceGet(&mut device, dev.ordinal()), "cuDeviceGet")?;
            ck(
                sys::cuDeviceGetAttribute(
                    &mut smem_per_sm,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                    device,
                ),
                "cuDeviceGetAttribute",
            )?;
        }
        // Each block reserves a little under its share, leaving the per-block reserve.
        let smem = (smem_per_sm / BLOCKS_PER_SM - 2048).max(0);
        let mut per_sm = 0;
        // SAFETY: a live function; the out pointer is a local.
        unsafe {
            ck(
                sys::cuFuncSetAttribute(
                    function,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem,
                ),
                "cuFuncSetAttribute",
            )?;
            ck(
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    &mut per_sm,
                    function,
                    THREADS as i32,
                    smem as usize,
                ),
                "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            )?;
        }
        let mut c = Self {
            function,
            smem: smem as u32,
            per_sm: per_sm.max(1) as u32,
            blocks: sm_count(dev) * per_sm.max(1) as u32 * WAVES,
            iters: 1 << 8,
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
                        self.smem,
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
    let (ctx, dev) = gpu_context_with("bench --gpu --busy", a.max_sms)?;
    let compute = Compute::new(&dev)?;
    let total = a.total_mib << 20;
    let big = fragment_shape(1, total, 4096);
    let (pinned, device) = pinned_and_device(&ctx, big)?;
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
    // The same copy while the load runs: what the link gives anyone beside it.
    let busy_limit = |to_device: bool| -> Result<f64, String> {
        let mut t = Vec::new();
        for _ in 0..=a.iters {
            compute.launch()?;
            // SAFETY: as above.
            t.push(unsafe { timed_large_copy(p, d, total, to_device) }?);
            compute.elapsed_ms()?;
        }
        t.remove(0);
        Ok(total as f64 / median(t) / 1e9)
    };
    let busy_limits = [busy_limit(true)?, busy_limit(false)?];
    if !a.json {
        println!(
            "beside a compute load on every SM ({:.0} ms alone, {LAUNCHES} launches of {} blocks x {THREADS}, {} per SM, {WAVES} waves each): {} MiB per transfer, median of {}",
            compute.alone()?,
            compute.blocks,
            compute.per_sm,
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
        let (host, gpu) = pinned_and_device(&ctx, c)?;
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
                let busy_limit = busy_limits[usize::from(!to_device)];
                let (ratio, slowdown) = (gbps / limit, with / alone - 1.0);
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": "busy", "direction": dir, "mode": mode_name,
                            "fragment_bytes": fragment, "bytes": total, "iters": a.iters,
                            "transfer_gbps": gbps, "limit_gbps": limit,
                            "busy_limit_gbps": busy_limit,
                            "transfer_ratio": ratio, "compute_alone_ms": alone,
                            "compute_with_transfer_ms": with, "compute_slowdown": slowdown,
                            "sms": sms, "load_warps_per_sm": compute.per_sm * THREADS / 32,
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
