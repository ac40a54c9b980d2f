//! `kvxfer bench`: scattered host block transfers against baselines measured in the same run.
//!
//! Baselines: `limit` is one memcpy of the same total bytes, cut into one contiguous share per
//! worker thread; `limit_nt` is the same contiguous copy through kvxfer's non-temporal-store
//! routine (the stricter bound for large transfers); `naive` is one memcpy per fragment on one
//! thread. Each point reports medians.

use std::time::Instant;

use kvxfer::exec::memcpy::copy_all;
use kvxfer::memory::HostAllocation;
use kvxfer::plan::CopyOp;
use kvxfer::{
    Context, ContextConfig, Layout, LayoutConfig, LayoutKind, StorageKind, StorageSpec,
    TransferOptions,
};

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Bytes moved per measurement, in MiB [default: 256, with --gpu 1024].
    #[arg(long)]
    total_mib: Option<u64>,
    /// Measurements per point, the median is reported [default: 9, with --gpu 5].
    #[arg(long)]
    iters: Option<usize>,
    /// Worker threads (0 = number of CPUs); the `limit` baseline uses as many.
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Fragment sizes in KiB [default: 4,16,64,256,1024,2048; with --gpu 4,16,32,64 for
    /// layer-separate layouts plus one fully contiguous point].
    #[arg(long, value_delimiter = ',')]
    fragments_kib: Option<Vec<u64>>,
    /// With --gpu: the directions to measure (h2d, d2h, d2d; p2p: device to the next device,
    /// on machines with two GPUs).
    #[arg(long, value_delimiter = ',', default_values_t = ["h2d".to_string(), "d2h".to_string(), "d2d".to_string()])]
    directions: Vec<String>,
    /// Benchmark the GPU tiers (H2D, D2H, D2D) instead of host memory; --total-mib defaults
    /// to 1024 there.
    #[arg(long)]
    gpu: bool,
    /// With --gpu: no untimed copy before each measurement (the GPU may then start a
    /// measurement with its clocks down after a slow baseline).
    #[arg(long, requires = "gpu")]
    cold: bool,
    /// With --gpu: skip the per-fragment baselines (naive, batch) and COPY_ENGINE mode, which
    /// take seconds per round at small fragments; they are reported as NaN. For tuning the
    /// kernel path on a short device lease.
    #[arg(long, requires = "gpu")]
    quick: bool,
    /// Benchmark NIXL (UCX write/read between two agents, POSIX disk write/read) against
    /// nixl-sys used directly; --total-mib defaults to 64 there.
    #[arg(long, conflicts_with = "gpu")]
    nixl: bool,
    /// Benchmark device <-> disk through kvxfer's pinned bounce buffers against the D2H/H2D
    /// and disk limits measured in the same run; --total-mib defaults to 1024, --iters to 3,
    /// --fragments-kib to 4,16,64 there.
    #[arg(long, conflicts_with_all = ["gpu", "nixl"])]
    gpu_disk: bool,
    /// Benchmark writes and reads between this process's device 0 and a device of a second
    /// kvxfer process with GPU RDMA (NIXL's UCX backend) against staging through pinned memory;
    /// --total-mib defaults to 256, --iters to 3, --fragments-kib to 4,16,64 there.
    #[arg(long, conflicts_with_all = ["gpu", "nixl", "gpu_disk"])]
    gpu_rdma: bool,
    /// With --gpu-rdma: the CUDA device of the peer process.
    #[arg(long, requires = "gpu_rdma", default_value_t = 0)]
    peer_device: i32,
    /// With --gpu-disk: folder for the disk layouts (default: the system's temporary folder).
    #[arg(long, requires = "gpu_disk")]
    disk_dir: Option<std::path::PathBuf>,
    /// With --gpu-disk: compare with GDS through NIXL's GDS_MT backend instead of GDS.
    #[arg(long, requires = "gpu_disk")]
    gds_mt: bool,
}

struct Point {
    fragment: u64,
    bytes: u64,
    copies: u64,
    kvxfer: f64,
    limit: f64,
    limit_nt: f64,
    naive: f64,
}

/// The median; NaN for no samples (a mode the run skipped).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Error text for the bench commands, which report failures as strings.
pub fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn scattered_layout(
    ctx: &Context,
    storage: StorageKind,
    blocks: u64,
    fragment: u64,
) -> Result<Layout, String> {
    let cfg = fragment_shape(blocks, fragment, 1);
    ctx.new_layout(cfg, &StorageSpec::new(storage)).map_err(err)
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
    }
}

/// One copy of `len` bytes cut into `threads` contiguous shares: glibc's memcpy, or with
/// `streaming` kvxfer's non-temporal-store copy.
fn limit_copy(src: usize, dst: usize, len: usize, threads: usize, streaming: bool) {
    let share = len.div_ceil(threads);
    std::thread::scope(|s| {
        for i in 0..threads {
            let off = i * share;
            let n = share.min(len - off.min(len));
            s.spawn(move || {
                let op = CopyOp {
                    src: (src + off) as u64,
                    dst: (dst + off) as u64,
                    len: n as u64,
                };
                // SAFETY: [src+off, +n) and [dst+off, +n) lie in two distinct live allocations
                // of `len` bytes owned by the caller.
                unsafe {
                    if streaming {
                        copy_all(&[op], true)
                    } else {
                        std::ptr::copy_nonoverlapping(op.src as *const u8, op.dst as *mut u8, n)
                    }
                }
            });
        }
    });
}

fn measure(
    ctx: &Context,
    dst_kind: StorageKind,
    fragment: u64,
    total_mib: u64,
    iters: usize,
) -> Result<Point, String> {
    let total = total_mib << 20;
    let blocks = (total / fragment).max(1);
    let bytes = blocks * fragment;
    let src = scattered_layout(ctx, StorageKind::System, blocks, fragment)?;
    let dst = scattered_layout(ctx, dst_kind, blocks, fragment)?;
    let mut rng = fastrand::Rng::with_seed(fragment);
    let mut sb: Vec<u64> = (0..blocks).collect();
    let mut db = sb.clone();
    rng.shuffle(&mut sb);
    rng.shuffle(&mut db);
    let all: Vec<u64> = (0..blocks).collect();
    ctx.fill(&src, &all, 1).map_err(err)?;
    ctx.fill(&dst, &all, 2).map_err(err)?;
    let pairs: Vec<(usize, usize)> = sb
        .iter()
        .zip(&db)
        .map(|(&s, &d)| {
            let (s, d) = (src.region(s, 0, 0), dst.region(d, 0, 0));
            Ok((s.map_err(err)?.addr as usize, d.map_err(err)?.addr as usize))
        })
        .collect::<Result<_, String>>()?;

    let lim_src = HostAllocation::new(bytes, 4096, false).map_err(err)?;
    let lim_dst = HostAllocation::new(bytes, 4096, dst_kind == StorageKind::Pinned).map_err(err)?;
    let (ls, ld) = (
        lim_src.region().addr as usize,
        lim_dst.region().addr as usize,
    );
    // SAFETY: both allocations hold `bytes` bytes; touching every page first keeps page faults
    // out of the timings.
    unsafe {
        std::ptr::write_bytes(ls as *mut u8, 1, bytes as usize);
        std::ptr::write_bytes(ld as *mut u8, 2, bytes as usize);
    }
    let threads = ctx.worker_threads();
    let (mut k, mut l, mut lnt, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut copies = 0;
    for i in 0..=iters {
        let t0 = Instant::now();
        let t = ctx
            .submit(&src, &sb, &dst, &db, &TransferOptions::default())
            .map_err(err)?;
        t.wait(None).map_err(err)?;
        let tk = t0.elapsed().as_secs_f64();
        copies = t.stats().copies;

        let t0 = Instant::now();
        limit_copy(ls, ld, bytes as usize, threads, false);
        let tl = t0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        limit_copy(ls, ld, bytes as usize, threads, true);
        let tlnt = t0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        for &(s, d) in &pairs {
            // SAFETY: each pair is a fragment of `src` and of `dst`, both alive, and the
            // destination ids are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, fragment as usize)
            };
        }
        let tn = t0.elapsed().as_secs_f64();
        if i > 0 {
            // The first round warms caches and TLBs and is not counted.
            k.push(tk);
            l.push(tl);
            lnt.push(tlnt);
            n.push(tn);
        }
    }
    if ctx.checksum(&src, &sb).map_err(err)? != ctx.checksum(&dst, &db).map_err(err)? {
        return Err(format!(
            "fragment {fragment}: destination does not match source"
        ));
    }
    let gbps = |t: f64| bytes as f64 / t / 1e9;
    Ok(Point {
        fragment,
        bytes,
        copies,
        kvxfer: gbps(median(k)),
        limit: gbps(median(l)),
        limit_nt: gbps(median(lnt)),
        naive: gbps(median(n)),
    })
}

pub fn run(a: &Args) -> Result<(), String> {
    if a.iters == Some(0) || a.total_mib == Some(0) {
        return Err("--iters and --total-mib must be at least 1".into());
    }
    if a.gpu {
        return super::bench_gpu::run(&super::bench_gpu::GpuArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(1024),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a.fragments_kib.clone(),
            directions: a.directions.clone(),
            cold: a.cold,
            quick: a.quick,
        });
    }
    if a.gpu_disk {
        return super::bench_gpu_disk::run(&super::bench_gpu_disk::GpuDiskArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(1024),
            iters: a.iters.unwrap_or(3),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            disk_dir: a.disk_dir.clone(),
            gds_mt: a.gds_mt,
        });
    }
    if a.gpu_rdma {
        return super::bench_gpu_rdma::run(&super::bench_gpu_rdma::GpuRdmaArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(256),
            iters: a.iters.unwrap_or(3),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            peer_device: a.peer_device,
        });
    }
    if a.nixl {
        return super::bench_nixl::run(&super::bench_nixl::NixlArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(64),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a
                .fragments_kib
                .clone()
                .unwrap_or_else(|| vec![4, 16, 64, 256, 1024, 2048]),
        });
    }
    let (total_mib, iters) = (a.total_mib.unwrap_or(256), a.iters.unwrap_or(9));
    let ctx = Context::new(ContextConfig {
        worker_threads: a.threads,
        nixl_backends: 0,
        ..Default::default()
    })
    .map_err(err)?;
    let dst_kind = match scattered_layout(&ctx, StorageKind::Pinned, 1, 4096) {
        Ok(_) => StorageKind::Pinned,
        Err(e) => {
            eprintln!("pinned memory unavailable ({e}); measuring System -> System");
            StorageKind::System
        }
    };
    let direction = format!("System->{dst_kind}");
    if !a.json {
        println!(
            "host scatter {direction}: {} MiB per run, median of {} runs, {} threads (GB/s)",
            total_mib,
            iters,
            ctx.worker_threads()
        );
        println!(
            "{:>9} {:>7} {:>8} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6}",
            "fragment", "copies", "kvxfer", "limit", "ratio", "limit_nt", "ratio", "naive", "ratio"
        );
    }
    let fragments = a
        .fragments_kib
        .clone()
        .unwrap_or_else(|| vec![4, 16, 64, 256, 1024, 2048]);
    for &kib in &fragments {
        let fragment = kib * 1024;
        if fragment < 2 || fragment > (total_mib << 20) {
            return Err(format!(
                "fragment {kib} KiB does not fit in {total_mib} MiB"
            ));
        }
        let p = measure(&ctx, dst_kind, fragment, total_mib, iters)?;
        if a.json {
            for (baseline, b) in [
                ("limit", p.limit),
                ("limit_nt", p.limit_nt),
                ("naive", p.naive),
            ] {
                let line = serde_json::json!({
                    "name": "host_scatter",
                    "direction": direction,
                    "fragment_bytes": p.fragment,
                    "bytes": p.bytes,
                    "copies": p.copies,
                    "threads": ctx.worker_threads(),
                    "iters": iters,
                    "gbps": p.kvxfer,
                    "baseline": baseline,
                    "baseline_gbps": b,
                    "ratio": p.kvxfer / b,
                });
                println!("{line}");
            }
        } else {
            println!(
                "{:>5} KiB {:>7} {:>8.2} {:>8.2} {:>6.3} {:>8.2} {:>6.3} {:>8.2} {:>6.3}",
                kib,
                p.copies,
                p.kvxfer,
                p.limit,
                p.kvxfer / p.limit,
                p.limit_nt,
                p.kvxfer / p.limit_nt,
                p.naive,
                p.kvxfer / p.naive
            );
        }
    }
    Ok(())
}
