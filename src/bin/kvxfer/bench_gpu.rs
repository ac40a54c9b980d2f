//! `kvxfer bench --gpu`: scattered KV fragments between pinned host and device memory, and
//! device to device, against raw CUDA baselines measured in the same run: `limit` (one
//! contiguous copy of the same bytes), `naive` (one cuMemcpyAsync per fragment) and `batch`
//! (cuMemcpyBatchAsync of the same fragments). kvxfer runs in AUTO, COPY_ENGINE and KERNEL modes.

use std::time::Instant;

use cudarc::driver::sys;
use kvxfer::exec::cuda::{CudaDevice, Direction, copy};
use kvxfer::plan::CopyOp;
use kvxfer::{
    Context, ContextConfig, CopyMode, Layout, LayoutConfig, LayoutKind, StorageKind, StorageSpec,
    TransferOptions,
};

use super::bench::{err, median};

pub struct GpuArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    /// Layer-separate fragment sizes; `None` = 4, 16, 32, 64 KiB plus a fully contiguous point.
    pub fragments_kib: Option<Vec<u64>>,
    /// Any of h2d, d2h, d2d.
    pub directions: Vec<String>,
}

fn ck(r: sys::CUresult, what: &str) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// A Llama-like layer-separate shape: 32 layers, K and V, 16-token pages, bf16, with `inner`
/// chosen so that one (block, layer, outer) fragment is `fragment` bytes.
fn shape(kind: LayoutKind, blocks: u64, fragment: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: fragment / 32,
        dtype_width: 2,
        alignment: 256,
        kind,
    }
}

struct Pair {
    name: &'static str,
    direction: Direction,
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

#[allow(clippy::too_many_arguments)]
fn point(
    ctx: &Context,
    dev: &CudaDevice,
    timer: &Timer,
    pair: &Pair,
    layout_name: &str,
    fragment: u64,
    limit_bufs: (u64, u64),
    a: &GpuArgs,
    report: bool,
) -> Result<(), String> {
    let n = pair.src.config().num_blocks;
    let mut rng = fastrand::Rng::with_seed(fragment ^ n);
    let mut sb: Vec<u64> = (0..n).collect();
    let mut db = sb.clone();
    rng.shuffle(&mut sb);
    rng.shuffle(&mut db);
    if !report {
        let t = ctx
            .submit(&pair.src, &sb, &pair.dst, &db, &TransferOptions::default())
            .map_err(err)?;
        return t.wait(None).map_err(err);
    }
    let frags = fragments(&pair.src, &sb, &pair.dst, &db)?;
    let bytes: u64 = frags.iter().map(|f| f.len).sum();
    let (ls, ld) = limit_bufs;
    let mut results: Vec<(&str, Vec<f64>)> =
        ["limit", "naive", "batch", "AUTO", "COPY_ENGINE", "KERNEL"]
            .iter()
            .map(|&n| (n, Vec::new()))
            .collect();
    let mut submit_ns = Vec::new();
    let mut mechanism = String::new();
    for i in 0..=a.iters {
        let mut times = Vec::new();
        // limit: one copy of the same bytes.
        let t0 = Instant::now();
        // SAFETY: the limit buffers hold `bytes` bytes each (allocated for the largest point).
        ck(
            unsafe { sys::cuMemcpyAsync(ld, ls, bytes as usize, timer.stream) },
            "limit copy",
        )?;
        timer.sync()?;
        times.push(t0.elapsed().as_secs_f64());
        // naive: one cuMemcpyAsync per fragment.
        let t0 = Instant::now();
        for f in &frags {
            // SAFETY: fragments of live layouts.
            ck(
                unsafe { sys::cuMemcpyAsync(f.dst, f.src, f.len as usize, timer.stream) },
                "naive",
            )?;
        }
        timer.sync()?;
        times.push(t0.elapsed().as_secs_f64());
        // batch: the raw batch API over the same fragments.
        let t0 = Instant::now();
        // SAFETY: the bench's live stream on `dev`; fragments of live layouts.
        unsafe { copy::enqueue_copy_engine(dev, timer.stream, pair.direction, &frags) }
            .map_err(err)?;
        timer.sync()?;
        times.push(t0.elapsed().as_secs_f64());
        for mode in [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel] {
            let opts = TransferOptions {
                copy_mode: mode,
                ..Default::default()
            };
            let t0 = Instant::now();
            let t = ctx
                .submit(&pair.src, &sb, &pair.dst, &db, &opts)
                .map_err(err)?;
            let submitted = t0.elapsed();
            t.wait(None).map_err(err)?;
            times.push(t0.elapsed().as_secs_f64());
            if mode == CopyMode::Auto {
                submit_ns.push(submitted.as_nanos() as f64 / frags.len() as f64);
                mechanism = format!("{:?}", t.stats().mechanism);
            }
        }
        if i > 0 {
            for (r, t) in results.iter_mut().zip(times) {
                r.1.push(t);
            }
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
                });
                println!("{line}");
            }
        }
    } else {
        println!(
            "{:<8} {:<3} {:>6} KiB {:>7} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>6.3} {:>6.3} {:>6.3} {:>7.1} {:>10}",
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
            submit,
            mechanism
        );
    }
    Ok(())
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
    let ctx = Context::new(ContextConfig {
        nixl_backends: 0,
        ..Default::default()
    })
    .map_err(err)?;
    let dev = ctx
        .cuda_device()
        .cloned()
        .ok_or("bench --gpu needs a CUDA GPU and driver; this machine has none")?;
    let mut stream = std::ptr::null_mut();
    dev.bind().map_err(err)?;
    // SAFETY: the context is current; destroyed at the end.
    ck(
        unsafe { sys::cuStreamCreate(&mut stream, 1) },
        "cuStreamCreate",
    )?;
    let timer = Timer { stream };
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
    };
    let lim_host = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Pinned))
        .map_err(err)?;
    let lim_dev = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Device))
        .map_err(err)?;
    let lim_dev2 = ctx
        .new_layout(big, &StorageSpec::new(StorageKind::Device))
        .map_err(err)?;
    let addr = |l: &Layout| l.region(0, 0, 0).map(|r| r.addr).map_err(err);
    let (h, d, d2) = (addr(&lim_host)?, addr(&lim_dev)?, addr(&lim_dev2)?);
    if !a.json {
        println!(
            "GPU bench: {} MiB per point, median of {} runs (GB/s; ratios AUTO/limit, COPY_ENGINE/batch, KERNEL/limit; submit ns per fragment)",
            a.total_mib, a.iters
        );
        println!(
            "{:<8} {:<3} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>10}",
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
    for (name, (host_kind, dev_kind), fragment) in points {
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
            direction: Direction::HostToDevice,
            src: host,
            dst: dev_a,
        };
        if want("h2d") || want("d2d") {
            // D2D needs the device layout filled: H2D does it even when not reported.
            point(
                &ctx,
                &dev,
                &timer,
                &h2d,
                name,
                fragment,
                (h, d),
                a,
                want("h2d"),
            )?;
        }
        let d2h = Pair {
            name: "D2H",
            direction: Direction::DeviceToHost,
            src: h2d.dst,
            dst: h2d.src,
        };
        if want("d2h") {
            point(&ctx, &dev, &timer, &d2h, name, fragment, (d, h), a, true)?;
        }
        if want("d2d") {
            let d2d = Pair {
                name: "D2D",
                direction: Direction::DeviceToDevice,
                src: d2h.src,
                dst: mk(host_kind, StorageKind::Device)?,
            };
            point(&ctx, &dev, &timer, &d2d, name, fragment, (d, d2), a, true)?;
        }
    }
    latency(&ctx, &timer, a)?;
    // SAFETY: idle stream created above.
    unsafe { sys::cuStreamDestroy_v2(stream) };
    Ok(())
}
