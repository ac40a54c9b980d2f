//! `kvxfer bench --gpu --pageable`: scattered fragments between a pageable host pool the
//! runtime owns (wrapped) and device memory, through kvxfer's pinned bounce pool, against one
//! pageable copy of the same bytes (what a runtime gets from a plain cudaMemcpy) and one pinned
//! copy (the link), all measured in the same run.

use kvxfer::{Layout, Region, StorageKind, StorageSpec, TransferOptions};

use super::common::{
    err, fragment_shape, gpu_context_with, legend, median, secs, shuffled_ids, timed_large_copy,
};

pub struct PageableArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
    /// The context's max_sms (0 = auto): the device hop's blocks.
    pub max_sms: u32,
}

pub fn run(a: &PageableArgs) -> Result<(), String> {
    let (ctx, dev) = gpu_context_with("bench --gpu --pageable", a.max_sms)?;
    let total = a.total_mib << 20;
    // The runtime's pool: plain heap memory, page-aligned, touched once.
    let pool: Vec<u8> = vec![1u8; total as usize + 4096];
    let base = (pool.as_ptr() as u64).next_multiple_of(4096);
    let pinned = ctx
        .new_layout(
            fragment_shape(1, total, 4096),
            &StorageSpec::new(StorageKind::Pinned),
        )
        .map_err(err)?;
    let device = ctx
        .new_layout(
            fragment_shape(1, total, 4096),
            &StorageSpec::new(StorageKind::Device),
        )
        .map_err(err)?;
    let addr = |l: &Layout| l.region(0, 0, 0).map(|r| r.addr).map_err(err);
    let (p, d) = (addr(&pinned)?, addr(&device)?);
    dev.bind().map_err(err)?;
    // SAFETY: the pool (from `base`), the pinned and the device buffers all hold `total`
    // bytes; the device's context is bound.
    let copy = |host: u64, to_device: bool| unsafe { timed_large_copy(host, d, total, to_device) };
    if !a.json {
        println!(
            "pageable <-> device through the bounce pool: {} MiB per point, median of {}, {} worker threads (GB/s)",
            a.total_mib,
            a.iters,
            ctx.worker_threads()
        );
        println!(
            "{:<4} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9}",
            "dir", "fragment", "kvxfer", "pageable", "pinned", "ratio", "of pinned"
        );
    }
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        let blocks = total / fragment;
        let c = fragment_shape(blocks, fragment, 4096);
        let wrapped = ctx
            .wrap_layout(
                c,
                &StorageSpec::new(StorageKind::System),
                &[Region {
                    addr: base,
                    len: blocks * fragment,
                }],
            )
            .map_err(err)?;
        let dev_layout = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Device))
            .map_err(err)?;
        let (sb, db) = shuffled_ids(blocks, kib);
        for (dir, to_device) in [("H2D", true), ("D2H", false)] {
            let (src, dst) = if to_device {
                (&wrapped, &dev_layout)
            } else {
                (&dev_layout, &wrapped)
            };
            let (mut kv, mut pg, mut pn) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..=a.iters {
                let k = secs(|| {
                    ctx.submit(src, &sb, dst, &db, &TransferOptions::default())
                        .and_then(|t| t.wait(None))
                        .map_err(err)
                })?;
                let g = copy(base, to_device)?;
                let n = copy(p, to_device)?;
                if i > 0 {
                    kv.push(k);
                    pg.push(g);
                    pn.push(n);
                }
            }
            let gbps = |t: Vec<f64>| total as f64 / median(t) / 1e9;
            let (k, g, n) = (gbps(kv), gbps(pg), gbps(pn));
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": "pageable", "direction": dir, "fragment_bytes": fragment,
                        "bytes": total, "iters": a.iters, "threads": ctx.worker_threads(), "max_sms": a.max_sms,
                        "gbps": k, "pageable_copy_gbps": g, "pinned_limit_gbps": n,
                        "ratio": k / g, "ratio_to_pinned": k / n,
                    })
                );
            } else {
                println!(
                    "{dir:<4} {kib:>4} KiB {k:>9.2} {g:>9.2} {n:>9.2} {:>7.2} {:>9.3}",
                    k / g,
                    k / n
                );
            }
        }
    }
    if !a.json {
        legend(&[
            (
                "kvxfer",
                "scattered fragments of a wrapped pageable pool <-> device, through the pinned bounce pool",
            ),
            (
                "pageable",
                "one cuMemcpy of the same bytes from / to pageable memory",
            ),
            (
                "pinned",
                "one cuMemcpy of the same bytes from / to pinned memory: the link",
            ),
            ("ratio", "kvxfer / pageable; of pinned: kvxfer / pinned"),
        ]);
    }
    drop(pool);
    Ok(())
}
