//! `kvxfer bench --gpu`: scattered KV fragments between pinned host and device memory, and
//! device to device, against raw CUDA baselines measured in the same run: `limit` (one
//! contiguous copy of the same bytes), `naive` (one cuMemcpyAsync per fragment) and `batch`
//! (cuMemcpyBatchAsync of the same fragments). kvxfer runs in AUTO, COPY_ENGINE and KERNEL modes.

use std::time::Instant;

use cudarc::driver::sys;
use kvxfer::CudaDevice;
use kvxfer::baseline::{CopyOp, Loc, copy_engine_batch, cuda_symbol as symbol};
use kvxfer::{
    Context, CopyMode, Layout, LayoutConfig, LayoutKind, StorageKind, StorageSpec, TransferOptions,
};

use super::common::{
    ck, err, gpu_context, legend, median, pinned_and_device, progress, shape, shuffled_ids,
};
use super::plot::{Panel, Series, draw};

pub struct GpuArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    /// Layer-separate fragment sizes; `None` = 4, 16, 32, 64 KiB plus a fully contiguous point.
    pub fragments_kib: Option<Vec<u64>>,
    /// Any of h2d, d2h, d2d.
    pub directions: Vec<String>,
    /// Skip the untimed copy before each measurement.
    pub cold: bool,
    /// Skip naive, batch and COPY_ENGINE (reported as NaN).
    pub quick: bool,
    /// Draw the layer-separate points into this PNG.
    pub plot: Option<std::path::PathBuf>,
}

/// One reported point: direction, layout, fragment, and GB/s by mode and baseline.
struct Measured {
    dir: &'static str,
    layout: String,
    fragment: u64,
    gbps: Vec<(&'static str, f64)>,
}

struct Pair {
    name: &'static str,
    /// Where the two sides live, for the batch baseline's hints.
    locs: (Loc, Loc),
    src: Layout,
    dst: Layout,
}

/// Every (block, layer, outer) fragment of the transfer `src[sb] -> dst[db]`, uncoalesced.
fn fragments(src: &Layout, sb: &[u64], dst: &Layout, db: &[u64]) -> Result<Vec<CopyOp>, String> {
    let c = src.config();
    let mut out = Vec::with_capacity(sb.len() * (c.num_layers * c.outer_dim) as usize);
    for (&s, &d) in sb.iter().zip(db) {
        for l in 0..c.num_layers {
            for o in 0..c.outer_dim {
                let (a, b) = (
                    src.region(s, l, o).map_err(err)?,
                    dst.region(d, l, o).map_err(err)?,
                );
                out.push(CopyOp {
                    src: a.addr,
                    dst: b.addr,
                    len: a.len,
                });
            }
        }
    }
    Ok(out)
}

struct Timer {
    stream: sys::CUstream,
}

impl Timer {
    fn sync(&self) -> Result<(), String> {
        // SAFETY: a live stream created by the bench.
        ck(
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }
}

/// `cuStreamWaitValue32`: the stream waits until a 32-bit word in memory is >= a value.
type WaitValue32 =
    unsafe extern "C" fn(sys::CUstream, sys::CUdeviceptr, u32, std::ffi::c_uint) -> sys::CUresult;

/// Device-side time of one piece of work between two timing events on the bench stream. For a
/// kvxfer transfer the stream is held (a stream wait on a pinned flag) while `submit` runs and
/// released after, so the interval holds the GPU work alone, not the host's submit cost or the
/// completion wake-ups.
pub(super) struct GpuClock {
    wait_value: Option<WaitValue32>,
    flag: *mut u32,
    next: std::cell::Cell<u32>,
    start: sys::CUevent,
    end: sys::CUevent,
}

impl GpuClock {
    pub(super) fn new() -> Result<Self, String> {
        let mut flag = std::ptr::null_mut();
        // SAFETY: the bench's context is current; freed in Drop. Mapped, so that the device
        // reads it through the same (unified) address.
        ck(
            unsafe { sys::cuMemHostAlloc(&mut flag, 4096, sys::CU_MEMHOSTALLOC_DEVICEMAP) },
            "cuMemHostAlloc (flag)",
        )?;
        let (mut start, mut end) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out pointers are locals; timing events (flags 0); destroyed in Drop.
        unsafe {
            ck(sys::cuEventCreate(&mut start, 0), "cuEventCreate")?;
            ck(sys::cuEventCreate(&mut end, 0), "cuEventCreate")?;
        }
        let wait_value =
            symbol(c"cuStreamWaitValue32_v2").or_else(|| symbol(c"cuStreamWaitValue32"));
        Ok(Self {
            // SAFETY: both entry points have this signature (CUDA 11.7 and later).
            wait_value: wait_value
                .map(|f| unsafe { std::mem::transmute::<*mut std::ffi::c_void, WaitValue32>(f) }),
            flag: flag.cast(),
            next: std::cell::Cell::new(0),
            start,
            end,
        })
    }

    /// Device time of whatever `enqueue` queues on `stream`.
    fn time(
        &self,
        stream: sys::CUstream,
        enqueue: impl FnOnce() -> Result<(), String>,
    ) -> Result<f64, String> {
        // SAFETY: live events and stream.
        ck(
            unsafe { sys::cuEventRecord(self.start, stream) },
            "cuEventRecord",
        )?;
        enqueue()?;
        self.stop(stream)
    }

    fn stop(&self, stream: sys::CUstream) -> Result<f64, String> {
        let mut ms = 0f32;
        // SAFETY: live events and stream; `start` was recorded on the same stream before.
        unsafe {
            ck(sys::cuEventRecord(self.end, stream), "cuEventRecord")?;
            ck(sys::cuEventSynchronize(self.end), "cuEventSynchronize")?;
            ck(
                sys::cuEventElapsedTime(&mut ms, self.start, self.end),
                "cuEventElapsedTime",
            )?;
        }
        Ok(f64::from(ms) / 1e3)
    }

    /// Device time of a kvxfer transfer ordered after `stream` and waited for there; NaN where
    /// the driver has no stream wait on memory values.
    pub(super) fn transfer(
        &self,
        stream: sys::CUstream,
        submit: impl FnOnce(usize) -> Result<kvxfer::Transfer, String>,
    ) -> Result<f64, String> {
        let Some(wait_value) = self.wait_value else {
            return Ok(f64::NAN);
        };
        let v = self.next.get().wrapping_add(1);
        self.next.set(v);
        // SAFETY: a live stream; the flag is mapped pinned memory that outlives the wait.
        // Flags 0 = CU_STREAM_WAIT_VALUE_GEQ.
        ck(
            unsafe { wait_value(stream, self.flag as u64, v, 0) },
            "cuStreamWaitValue32",
        )?;
        // SAFETY: live event and stream.
        ck(
            unsafe { sys::cuEventRecord(self.start, stream) },
            "cuEventRecord",
        )?;
        // Released when submit returns, or after 2 ms if it has not by then: a submit
        // that queues more work than the driver's queue holds blocks until the device drains
        // it, which a held stream never would.
        let flag = self.flag as usize;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::scope(|scope| {
            scope.spawn(move || {
                let _ = done_rx.recv_timeout(std::time::Duration::from_millis(2));
                // SAFETY: the flag is live mapped memory (freed only in Drop); the device
                // polls it.
                unsafe { std::ptr::write_volatile(flag as *mut u32, v) };
            });
            let t = submit(stream as usize);
            let _ = done_tx.send(());
            t
        });
        let t = t?;
        t.stream_wait(stream as usize).map_err(err)?;
        let gpu = self.stop(stream)?;
        t.wait(None).map_err(err)?;
        Ok(gpu)
    }
}

impl Drop for GpuClock {
    fn drop(&mut self) {
        // SAFETY: created in `new`, idle by now (every use synchronised `end`).
        unsafe {
            sys::cuEventDestroy_v2(self.start);
            sys::cuEventDestroy_v2(self.end);
            sys::cuMemFreeHost(self.flag.cast());
        }
    }
}

/// How many transfers the `queued` measurement cuts a point's blocks into.
const QUEUED: usize = 4;

#[allow(clippy::too_many_arguments)]
fn point(
    ctx: &Context,
    dev: &CudaDevice,
    timer: &Timer,
    clock: &GpuClock,
    pair: &Pair,
    layout_name: &str,
    fragment: u64,
    limit_bufs: (u64, u64),
    a: &GpuArgs,
    report: bool,
) -> Result<Option<Measured>, String> {
    let n = pair.src.config().num_blocks;
    let (sb, db) = shuffled_ids(n, fragment ^ n);
    if !report {
        let t = ctx
            .submit(&pair.src, &sb, &pair.dst, &db, &TransferOptions::default())
            .map_err(err)?;
        return t.wait(None).map_err(err).map(|()| None);
    }
    let frags = fragments(&pair.src, &sb, &pair.dst, &db)?;
    let bytes: u64 = frags.iter().map(|f| f.len).sum();
    let (ls, ld) = limit_bufs;
    let mut results: Vec<(&str, Vec<f64>)> = [
        "limit",
        "naive",
        "batch",
        "AUTO",
        "COPY_ENGINE",
        "KERNEL",
        "queued",
    ]
    .iter()
    .map(|&n| (n, Vec::new()))
    .collect();
    let mut submit_ns = Vec::new();
    let mut mechanism = String::new();
    // Device time of limit, of the three modes and of the queued transfers.
    let mut gpu: Vec<Vec<f64>> = vec![Vec::new(); 5];
    let limit_copy = || -> Result<(), String> {
        // SAFETY: the limit buffers hold `bytes` bytes each (allocated for the largest point).
        ck(
            unsafe { sys::cuMemcpyAsync(ld, ls, bytes as usize, timer.stream) },
            "limit copy",
        )
    };
    // Every measurement starts right after an untimed copy of the same size, so that none of
    // them inherits a GPU that idled (clocks down) through the slow baselines before it.
    let warm = || -> Result<(), String> {
        if a.cold {
            return Ok(());
        }
        limit_copy()?;
        timer.sync()
    };
    // One kvxfer transfer in `mode`, timed from submit to `wait` returning.
    let run_mode = |mode: CopyMode| -> Result<(f64, std::time::Duration, String), String> {
        let opts = TransferOptions {
            copy_mode: mode,
            ..Default::default()
        };
        warm()?;
        let t0 = Instant::now();
        let t = ctx
            .submit(&pair.src, &sb, &pair.dst, &db, &opts)
            .map_err(err)?;
        let submitted = t0.elapsed();
        t.wait(None).map_err(err)?;
        let wall = t0.elapsed().as_secs_f64();
        Ok((wall, submitted, format!("{:?}", t.stats().mechanism)))
    };
    // The same blocks as QUEUED AUTO transfers submitted back to back, the first with
    // `first`: how a scheduler offloads several sequences at once (each transfer waits behind
    // the ones before it on the direction's stream).
    let submit_queued = |first: &TransferOptions| -> Result<Vec<kvxfer::Transfer>, String> {
        let part = sb.len().div_ceil(QUEUED);
        let rest = TransferOptions::default();
        sb.chunks(part)
            .zip(db.chunks(part))
            .enumerate()
            .map(|(i, (s, d))| {
                ctx.submit(
                    &pair.src,
                    s,
                    &pair.dst,
                    d,
                    if i == 0 { first } else { &rest },
                )
                .map_err(err)
            })
            .collect()
    };
    // Those, then waited for in order, timed from the first submit to the last wait returning.
    let run_queued = || -> Result<f64, String> {
        warm()?;
        let t0 = Instant::now();
        for t in &submit_queued(&TransferOptions::default())? {
            t.wait(None).map_err(err)?;
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    // Their device time, from the first one's start to the last one's end: the first is
    // ordered after the clock's held stream, the others queue behind it.
    let gpu_queued = || -> Result<f64, String> {
        let mut earlier = Vec::new();
        let g = clock.transfer(timer.stream, |stream| {
            let gated = TransferOptions {
                cuda_stream: Some(stream),
                ..Default::default()
            };
            earlier = submit_queued(&gated)?;
            earlier.pop().ok_or_else(|| "no blocks".to_string())
        })?;
        for t in &earlier {
            t.wait(None).map_err(err)?;
        }
        Ok(g)
    };
    // Device time of one kvxfer transfer in `mode`.
    let gpu_mode = |mode: CopyMode| -> Result<f64, String> {
        clock.transfer(timer.stream, |stream| {
            let opts = TransferOptions {
                copy_mode: mode,
                cuda_stream: Some(stream),
                ..Default::default()
            };
            ctx.submit(&pair.src, &sb, &pair.dst, &db, &opts)
                .map_err(err)
        })
    };
    let push = |results: &mut Vec<(&str, Vec<f64>)>, name: &str, t: f64| {
        if let Some(r) = results.iter_mut().find(|r| r.0 == name) {
            r.1.push(t);
        }
    };
    // Two phases: `limit`, AUTO and KERNEL first, then the per-fragment baselines and
    // COPY_ENGINE. Right after 262144 single cuMemcpyAsync calls the driver takes longer for
    // the next calls (kvxfer's submit ran 2.5x slower on an H100; docs/BENCHMARKS.md, "GPU tiers, third pass"),
    // which would charge the baselines' aftermath to the mode measured next. Round 0 of each
    // phase is a warm-up and not recorded.
    for i in 0..=a.iters {
        warm()?;
        let t0 = Instant::now();
        limit_copy()?;
        timer.sync()?;
        let limit = t0.elapsed().as_secs_f64();
        // AUTO and KERNEL take turns going first, so that neither always follows the limit
        // copy (AUTO measured first every round ran 0.003-0.007 below KERNEL, session 20).
        let ((auto, submitted, m), (kernel, _, _)) = if i % 2 == 0 {
            let a = run_mode(CopyMode::Auto)?;
            (a, run_mode(CopyMode::Kernel)?)
        } else {
            let k = run_mode(CopyMode::Kernel)?;
            (run_mode(CopyMode::Auto)?, k)
        };
        let queued = run_queued()?;
        let g = [
            clock.time(timer.stream, limit_copy)?,
            gpu_mode(CopyMode::Auto)?,
            gpu_mode(CopyMode::Kernel)?,
            gpu_queued()?,
        ];
        if i > 0 {
            push(&mut results, "limit", limit);
            push(&mut results, "AUTO", auto);
            push(&mut results, "KERNEL", kernel);
            push(&mut results, "queued", queued);
            submit_ns.push(submitted.as_nanos() as f64 / frags.len() as f64);
            mechanism = m;
            gpu[0].push(g[0]);
            gpu[1].push(g[1]);
            gpu[3].push(g[2]);
            gpu[4].push(g[3]);
        }
    }
    for i in 0..=a.iters {
        if a.quick {
            break;
        }
        // naive: one cuMemcpyAsync per fragment.
        warm()?;
        let t0 = Instant::now();
        for f in &frags {
            // SAFETY: fragments of live layouts.
            ck(
                unsafe { sys::cuMemcpyAsync(f.dst, f.src, f.len as usize, timer.stream) },
                "naive",
            )?;
        }
        timer.sync()?;
        let naive = t0.elapsed().as_secs_f64();
        // batch: the raw batch API over the same fragments.
        warm()?;
        let t0 = Instant::now();
        // SAFETY: the bench's live stream on `dev`; fragments of live layouts.
        unsafe { copy_engine_batch(dev, timer.stream, pair.locs.0, pair.locs.1, &frags) }
            .map_err(err)?;
        timer.sync()?;
        let batch = t0.elapsed().as_secs_f64();
        let (ce, _, _) = run_mode(CopyMode::CopyEngine)?;
        let g = gpu_mode(CopyMode::CopyEngine)?;
        if i > 0 {
            push(&mut results, "naive", naive);
            push(&mut results, "batch", batch);
            push(&mut results, "COPY_ENGINE", ce);
            gpu[2].push(g);
        }
    }
    // The destination must hold the source after the last kvxfer run.
    if ctx.checksum(&pair.src, &sb).map_err(err)? != ctx.checksum(&pair.dst, &db).map_err(err)? {
        return Err(format!(
            "{} {fragment}: destination does not match source",
            pair.name
        ));
    }
    let gbps: Vec<(&str, f64)> = results
        .into_iter()
        .map(|(n, t)| (n, bytes as f64 / median(t) / 1e9))
        .collect();
    let get = |k: &str| gbps.iter().find(|(n, _)| *n == k).map_or(0.0, |x| x.1);
    let gpu_gbps: Vec<f64> = gpu
        .into_iter()
        .map(|t| bytes as f64 / median(t) / 1e9)
        .collect();
    let gpu_of = |k: &str| match k {
        "limit" => gpu_gbps[0],
        "AUTO" => gpu_gbps[1],
        "COPY_ENGINE" => gpu_gbps[2],
        "KERNEL" => gpu_gbps[3],
        "queued" => gpu_gbps[4],
        _ => f64::NAN,
    };
    let submit = median(submit_ns);
    if a.json {
        for mode in ["AUTO", "COPY_ENGINE", "KERNEL"] {
            for baseline in ["limit", "naive", "batch"] {
                let line = serde_json::json!({
                    "name": pair.name, "layout": layout_name, "fragment_bytes": fragment,
                    "fragments": frags.len(), "bytes": bytes, "mode": mode,
                    "auto_mechanism": mechanism, "iters": a.iters,
                    "gbps": get(mode), "baseline": baseline, "baseline_gbps": get(baseline),
                    "ratio": get(mode) / get(baseline), "submit_ns_per_fragment": submit,
                    "gpu_gbps": gpu_of(mode), "baseline_gpu_gbps": gpu_of(baseline),
                    "prewarm": !a.cold,
                });
                println!("{line}");
            }
        }
        let line = serde_json::json!({
            "name": format!("{} queued", pair.name), "layout": layout_name,
            "fragment_bytes": fragment, "fragments": frags.len(), "bytes": bytes,
            "mode": "AUTO", "transfers": QUEUED, "iters": a.iters, "gbps": get("queued"),
            "baseline": "limit", "baseline_gbps": get("limit"),
            "ratio": get("queued") / get("limit"), "prewarm": !a.cold,
            "gpu_gbps": gpu_of("queued"), "baseline_gpu_gbps": gpu_of("limit"),
        });
        println!("{line}");
    } else {
        println!(
            "{:<8} {:<3} {:>6} KiB {:>7} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>7.1} {:>10}",
            pair.name,
            layout_name,
            fragment >> 10,
            frags.len(),
            get("limit"),
            get("naive"),
            get("batch"),
            get("AUTO"),
            get("COPY_ENGINE"),
            get("KERNEL"),
            get("AUTO") / get("limit"),
            get("COPY_ENGINE") / get("batch"),
            get("KERNEL") / get("limit"),
            get("queued") / get("limit"),
            gpu_of("AUTO") / gpu_of("limit"),
            gpu_of("KERNEL") / gpu_of("limit"),
            submit,
            mechanism
        );
    }
    Ok(Some(Measured {
        dir: pair.name,
        layout: layout_name.to_string(),
        fragment,
        gbps,
    }))
}

/// Time from submit to `wait` returning for a one-fragment transfer, against the same copy
/// with a raw blocking-sync event; and how long `wait` takes on a finished transfer.
fn latency(ctx: &Context, timer: &Timer, a: &GpuArgs) -> Result<(), String> {
    let c = shape(LayoutKind::FullyContiguous, 1, 4096);
    let src = ctx
        .new_layout(
            LayoutConfig {
                num_layers: 1,
                outer_dim: 1,
                ..c
            },
            &StorageSpec::new(StorageKind::Pinned),
        )
        .map_err(err)?;
    let dst = ctx
        .new_layout(
            LayoutConfig {
                num_layers: 1,
                outer_dim: 1,
                ..c
            },
            &StorageSpec::new(StorageKind::Device),
        )
        .map_err(err)?;
    let (s, d) = (
        src.region(0, 0, 0).map_err(err)?,
        dst.region(0, 0, 0).map_err(err)?,
    );
    let mut ev = std::ptr::null_mut();
    let flags = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
        | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    // SAFETY: the context is current (made by ctx on this thread); destroyed below.
    ck(
        unsafe { sys::cuEventCreate(&mut ev, flags) },
        "cuEventCreate",
    )?;
    let (mut kvx, mut raw, mut done) = (Vec::new(), Vec::new(), Vec::new());
    let opts = TransferOptions {
        copy_mode: CopyMode::CopyEngine,
        ..Default::default()
    };
    for _ in 0..(a.iters * 20).max(50) {
        let t0 = Instant::now();
        let t = ctx.submit(&src, &[0], &dst, &[0], &opts).map_err(err)?;
        t.wait(None).map_err(err)?;
        kvx.push(t0.elapsed().as_secs_f64() * 1e6);
        let t1 = Instant::now();
        t.wait(None).map_err(err)?;
        done.push(t1.elapsed().as_secs_f64() * 1e9);
        let t0 = Instant::now();
        // SAFETY: live regions of 4 KiB, a live stream and event.
        unsafe {
            ck(
                sys::cuMemcpyAsync(d.addr, s.addr, 4096, timer.stream),
                "raw copy",
            )?;
            ck(sys::cuEventRecord(ev, timer.stream), "cuEventRecord")?;
            ck(sys::cuEventSynchronize(ev), "cuEventSynchronize")?;
        }
        raw.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    // SAFETY: created above; idle.
    unsafe { sys::cuEventDestroy_v2(ev) };
    let (k, r, w) = (median(kvx), median(raw), median(done));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": "completion_latency", "bytes": 4096, "kvxfer_submit_to_wait_us": k,
                "raw_event_sync_us": r, "overhead_us": k - r, "wait_on_finished_ns": w,
            })
        );
    } else {
        println!(
            "completion, one 4 KiB H2D copy: kvxfer submit->wait {k:.1} us, raw cuMemcpyAsync+event sync {r:.1} us (overhead {:.1} us); wait on a finished transfer {w:.0} ns",
            k - r
        );
    }
    Ok(())
}

pub fn run(a: &GpuArgs) -> Result<(), String> {
    let (ctx, dev) = gpu_context("bench --gpu")?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: the context is current; destroyed at the end.
    ck(
        unsafe { sys::cuStreamCreate(&mut stream, 1) },
        "cuStreamCreate",
    )?;
    let timer = Timer { stream };
    let clock = GpuClock::new()?;
    let total = a.total_mib << 20;
    let big = LayoutConfig {
        num_blocks: 1,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: total / 2,
        dtype_width: 2,
        alignment: 256,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    };
    let (lim_host, lim_dev) = pinned_and_device(&ctx, big)?;
    let lim_dev2 = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Device))
        .map_err(err)?;
    let addr = |l: &Layout| l.region(0, 0, 0).map(|r| r.addr).map_err(err);
    let (h, d, d2) = (addr(&lim_host)?, addr(&lim_dev)?, addr(&lim_dev2)?);
    if !a.json {
        println!(
            "GPU bench: {} MiB per point, median of {} runs{} (GB/s; ratios AUTO/limit, COPY_ENGINE/batch, KERNEL/limit; the same for device time alone (gA/l, gK/l); submit ns per fragment)",
            a.total_mib,
            a.iters,
            if a.cold {
                ", no warm-up copy before each"
            } else {
                ""
            }
        );
        println!(
            "{:<8} {:<3} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>10}",
            "dir",
            "lay",
            "fragment",
            "frags",
            "limit",
            "naive",
            "batch",
            "AUTO",
            "CE",
            "KERNEL",
            "A/lim",
            "CE/bat",
            "K/lim",
            "Q/lim",
            "gA/l",
            "gK/l",
            "sub ns",
            "AUTO uses"
        );
    }
    let ls = (
        LayoutKind::LayerSeparateBlockFirst,
        LayoutKind::LayerSeparateOuterFirst,
    );
    let fc = (LayoutKind::FullyContiguous, LayoutKind::FullyContiguous);
    let mut points: Vec<(&str, (LayoutKind, LayoutKind), u64)> = a
        .fragments_kib
        .clone()
        .unwrap_or_else(|| vec![4, 16, 32, 64])
        .into_iter()
        .map(|kib| ("LS", ls, kib << 10))
        .collect();
    if a.fragments_kib.is_none() {
        points.push(("FC", fc, 32 << 10));
    }
    let want = |d: &str| a.directions.iter().any(|x| x.eq_ignore_ascii_case(d));
    // P2P needs a second device: the limit's buffer lives there.
    let peer = if want("p2p") {
        let n = kvxfer::device_count().map_err(err)?;
        if n < 2 {
            return Err(format!(
                "--directions p2p needs two CUDA devices; this machine has {n}"
            ));
        }
        let other = if dev.ordinal() == 0 { 1 } else { 0 };
        let spec = StorageSpec {
            kind: StorageKind::Device,
            device_id: other,
            path: None,
        };
        Some((other, ctx.new_layout(big, &spec).map_err(err)?))
    } else {
        None
    };
    let mut measured: Vec<Measured> = Vec::new();
    let bar = progress(points.len(), "GPU bench");
    for (name, (host_kind, dev_kind), fragment) in points {
        bar.inc(1);
        if fragment < 64 || fragment % 64 != 0 {
            return Err(format!(
                "fragment {fragment} bytes: use a multiple of 64 bytes"
            ));
        }
        let blocks = (total / (64 * fragment)).max(1);
        let mk = |kind, storage| {
            let c = shape(kind, blocks, fragment);
            ctx.new_layout(c, &StorageSpec::new(storage)).map_err(err)
        };
        // H2D pinned -> device, D2H back, D2D device -> a second device layout.
        let host = mk(host_kind, StorageKind::Pinned)?;
        let dev_a = mk(dev_kind, StorageKind::Device)?;
        ctx.fill(&host, &(0..blocks).collect::<Vec<_>>(), 1)
            .map_err(err)?;
        let h2d = Pair {
            name: "H2D",
            locs: (Loc::Host, Loc::Device(dev.ordinal())),
            src: host,
            dst: dev_a,
        };
        if want("h2d") || want("d2d") || want("p2p") {
            // D2D and P2P need the device layout filled: H2D does it even when not reported.
            measured.extend(point(
                &ctx,
                &dev,
                &timer,
                &clock,
                &h2d,
                name,
                fragment,
                (h, d),
                a,
                want("h2d"),
            )?);
        }
        let d2h = Pair {
            name: "D2H",
            locs: (Loc::Device(dev.ordinal()), Loc::Host),
            src: h2d.dst,
            dst: h2d.src,
        };
        if want("d2h") {
            measured.extend(point(
                &ctx,
                &dev,
                &timer,
                &clock,
                &d2h,
                name,
                fragment,
                (d, h),
                a,
                true,
            )?);
        }
        let mut dev_src = d2h.src;
        if want("d2d") {
            let d2d = Pair {
                name: "D2D",
                locs: (Loc::Device(dev.ordinal()), Loc::Device(dev.ordinal())),
                src: dev_src,
                dst: mk(host_kind, StorageKind::Device)?,
            };
            measured.extend(point(
                &ctx,
                &dev,
                &timer,
                &clock,
                &d2d,
                name,
                fragment,
                (d, d2),
                a,
                true,
            )?);
            dev_src = d2d.src;
        }
        if let Some((peer_ordinal, peer_buf)) = &peer {
            // P2P: this device -> the next one, against one large copy between them.
            let c = shape(host_kind, blocks, fragment);
            let spec = StorageSpec {
                kind: StorageKind::Device,
                device_id: *peer_ordinal,
                path: None,
            };
            let p2p = Pair {
                name: "P2P",
                locs: (Loc::Device(dev.ordinal()), Loc::Device(*peer_ordinal)),
                src: dev_src,
                dst: ctx.new_layout(c, &spec).map_err(err)?,
            };
            let pb = addr(peer_buf)?;
            measured.extend(point(
                &ctx,
                &dev,
                &timer,
                &clock,
                &p2p,
                name,
                fragment,
                (d, pb),
                a,
                true,
            )?);
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &a.plot {
        plot_gpu(path, &measured)?;
    }
    latency(&ctx, &timer, a)?;
    // SAFETY: idle stream created above.
    unsafe { sys::cuStreamDestroy_v2(stream) };
    if !a.json {
        legend(&[
            (
                "limit",
                "one large copy of the same bytes (cuMemcpyAsync), the link's speed",
            ),
            ("naive", "one cuMemcpyAsync per fragment"),
            (
                "batch",
                "cuMemcpyBatchAsync of every fragment (the driver's batch API)",
            ),
            (
                "AUTO",
                "kvxfer, copy_mode AUTO (the SM kernel for small fragments and D2D)",
            ),
            (
                "CE",
                "kvxfer, copy_mode COPY_ENGINE (DMA engines only, no SM)",
            ),
            (
                "KERNEL",
                "kvxfer, copy_mode KERNEL (kvxfer's SM copy kernel)",
            ),
            (
                "A/lim",
                "AUTO / limit; K/lim: KERNEL / limit; CE/bat: COPY_ENGINE / batch",
            ),
            (
                "Q/lim",
                "the same blocks as 4 AUTO transfers submitted back to back, then waited for \
                 in order (first submit to last wait) / limit",
            ),
            (
                "gA/l gK/l",
                "AUTO and KERNEL by GPU time alone (events), over the limit's",
            ),
            ("sub ns", "host time of kvx_transfer_submit per fragment"),
            ("AUTO uses", "the mechanism AUTO chose"),
        ]);
    }
    Ok(())
}

/// One panel per direction of the layer-separate points: each mode and baseline against the
/// fragment size, the limit dashed.
fn plot_gpu(path: &std::path::Path, measured: &[Measured]) -> Result<(), String> {
    let mut panels = Vec::new();
    for dir in ["H2D", "D2H", "D2D", "P2P"] {
        let here: Vec<&Measured> = measured
            .iter()
            .filter(|m| m.dir == dir && m.layout != "FC")
            .collect();
        if here.is_empty() {
            continue;
        }
        let line = |mode: &str| -> Vec<(u64, f64)> {
            here.iter()
                .filter_map(|m| {
                    let v = m.gbps.iter().find(|(n, _)| *n == mode)?.1;
                    v.is_finite().then_some((m.fragment, v))
                })
                .collect()
        };
        let series = ["AUTO", "COPY_ENGINE", "KERNEL", "batch", "naive"]
            .into_iter()
            .map(|mode| Series {
                name: mode.to_string(),
                points: line(mode),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        panels.push(Panel {
            title: format!("{dir}, layer-separate"),
            series,
            limit: line("limit"),
        });
    }
    draw(path, &panels)?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}
