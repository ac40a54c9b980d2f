//! `kvxfer bench`: scattered host block transfers against baselines measured in the same run.
//!
//! Baselines: `limit` is one memcpy of the same total bytes, cut into one contiguous share per
//! worker thread; `limit_nt` is the same contiguous copy through kvxfer's non-temporal-store
//! routine (the stricter bound for large transfers); `naive` is one memcpy per fragment on one
//! thread. Each point reports medians.

use std::time::Instant;

use kvxfer::baseline::{CopyOp, HostAllocation, host_copy as copy_all};
use kvxfer::{Backends, Context, ContextConfig, Layout, StorageKind, StorageSpec, TransferOptions};

use super::Args;
use super::common::{err, fragment_shape, legend, median, progress, shuffled_ids};
use super::plot::{Panel, Series, draw};

struct Point {
    fragment: u64,
    bytes: u64,
    copies: u64,
    kvxfer: f64,
    limit: f64,
    limit_nt: f64,
    naive: f64,
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
    let (sb, db) = shuffled_ids(blocks, fragment);
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

/// `kvxfer bench` without a tier flag: host scatter System -> Pinned.
pub fn run(a: &Args) -> Result<(), String> {
    let (total_mib, iters) = (a.total_mib.unwrap_or(256), a.iters.unwrap_or(9));
    let ctx = Context::new(ContextConfig {
        worker_threads: a.threads,
        nixl_backends: Backends::empty(),
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
    let bar = progress(fragments.len(), "host scatter");
    let mut points = Vec::new();
    for &kib in &fragments {
        let fragment = kib * 1024;
        if fragment < 2 || fragment > (total_mib << 20) {
            return Err(format!(
                "fragment {kib} KiB does not fit in {total_mib} MiB"
            ));
        }
        let p = measure(&ctx, dst_kind, fragment, total_mib, iters)?;
        bar.inc(1);
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
        points.push(p);
    }
    bar.finish_and_clear();
    if let Some(path) = &a.plot {
        let line = |name: &str, f: fn(&Point) -> f64| Series {
            name: name.to_string(),
            points: points.iter().map(|p: &Point| (p.fragment, f(p))).collect(),
        };
        let panel = Panel {
            title: format!("host scatter {direction}, {} threads", ctx.worker_threads()),
            series: vec![
                line("kvxfer", |p| p.kvxfer),
                line("contiguous, non-temporal stores", |p| p.limit_nt),
                line("naive (one memcpy per fragment)", |p| p.naive),
            ],
            limit: points.iter().map(|p| (p.fragment, p.limit)).collect(),
        };
        draw(path, &[panel])?;
        eprintln!("plot written to {}", path.display());
    }
    if !a.json {
        legend(&[
            (
                "kvxfer",
                "GB/s of kvxfer's transfer of scattered fragments (submit to completion)",
            ),
            (
                "limit",
                "one memcpy of the same total bytes, cut into one contiguous share per worker",
            ),
            (
                "limit_nt",
                "the same contiguous shares through kvxfer's non-temporal-store copy",
            ),
            ("naive", "one memcpy per fragment on one thread"),
            (
                "ratio",
                "kvxfer / the column before it; above 1 kvxfer is faster",
            ),
        ]);
    }
    Ok(())
}
