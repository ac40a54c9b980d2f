//! `kvxfer bench --gpu-disk`: device <-> disk through kvxfer's pipelined pinned bounce buffers
//! (the seed's two-hop plans), against limits measured in the same run: one device <-> pinned
//! copy of the same bytes (`cuMemcpy`), and the disk's sequential speed, the faster of a raw
//! O_DIRECT `pwrite`/`pread` loop in 8 MiB pieces and kvxfer's own pinned <-> disk transfer of
//! one contiguous run. The goal is at least 0.80 of the smaller of the two limits. Where a
//! context with NIXL's GDS backend can be made, the same transfers also run through GPUDirect
//! Storage (`allow_gds`) for comparison.

use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use kvxfer::{
    Backends, Capabilities, Context, ContextConfig, Layout, LayoutConfig, LayoutKind, StorageKind,
    StorageSpec, TransferOptions,
};

use super::common::{err, legend, median, secs, shape, shuffled_ids, timed_large_copy};

pub struct GpuDiskArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
    /// Folder for the disk layouts and the raw baseline's file.
    pub disk_dir: Option<PathBuf>,
    /// The GDS comparison through NIXL's GDS_MT backend instead of GDS.
    pub gds_mt: bool,
}

/// Raw I/O piece of the disk baseline.
const PIECE: usize = 8 << 20;

/// One contiguous allocation of `bytes` as a single-block layout.
fn one_block(bytes: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: 1,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: bytes,
        dtype_width: 1,
        alignment: 4096,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    }
}

/// Sequential O_DIRECT writes (or reads) of `bytes` from (into) `buf`, 8 MiB at a time.
fn raw_io(path: &PathBuf, buf: u64, bytes: u64, write: bool) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e} (the raw baseline needs O_DIRECT)", path.display()))?;
    let mut off = 0u64;
    while off < bytes {
        let n = PIECE.min((bytes - off) as usize);
        let p = (buf + off) as *mut c_void;
        // SAFETY: `buf` is a pinned allocation of at least `bytes` bytes, page-aligned, that
        // outlives the call; `n` and `off` are multiples of 4096 (sizes are whole MiB).
        let r = unsafe {
            if write {
                libc::pwrite(f.as_raw_fd(), p, n, off as i64)
            } else {
                libc::pread(f.as_raw_fd(), p, n, off as i64)
            }
        };
        if r != n as isize {
            return Err(format!(
                "raw {} at {off}: {}",
                if write { "pwrite" } else { "pread" },
                std::io::Error::last_os_error()
            ));
        }
        off += n as u64;
    }
    if write {
        f.sync_data().map_err(err)?;
    }
    Ok(())
}

/// The disk's sequential write and read speed in one round: the faster of a raw O_DIRECT loop
/// and kvxfer's pinned <-> disk transfer of one contiguous run (seconds for `total` bytes).
struct DiskLimit<'a> {
    ctx: &'a Context,
    pinned: Layout,
    disk: Layout,
    raw_path: PathBuf,
    total: u64,
}

impl DiskLimit<'_> {
    /// (write seconds, read seconds, raw write, raw read, kvxfer write, kvxfer read).
    fn round(&self) -> Result<[f64; 6], String> {
        let buf = self.pinned.region(0, 0, 0).map_err(err)?.addr;
        let one = TransferOptions::default();
        let kv = |src: &Layout, dst: &Layout| -> Result<(), String> {
            self.ctx
                .submit(src, &[0], dst, &[0], &one)
                .and_then(|t| t.wait(None))
                .map_err(err)
        };
        let raw_w = secs(|| raw_io(&self.raw_path, buf, self.total, true))?;
        let kv_w = secs(|| kv(&self.pinned, &self.disk))?;
        let raw_r = secs(|| raw_io(&self.raw_path, buf, self.total, false))?;
        let kv_r = secs(|| kv(&self.disk, &self.pinned))?;
        Ok([raw_w.min(kv_w), raw_r.min(kv_r), raw_w, raw_r, kv_w, kv_r])
    }
}

/// Device -> disk and disk -> device of `fragment`-byte pieces in `ctx`, random permutations;
/// each round also measures the disk's limits right before, so that both see the same disk.
/// Checks the round trip. Returns the bytes and the medians of (kvxfer write, kvxfer read,
/// and the six `DiskLimit::round` values), in seconds.
fn measure(
    ctx: &Context,
    limit: &DiskLimit<'_>,
    fragment: u64,
    iters: usize,
) -> Result<(u64, Vec<f64>), String> {
    let new = |c: LayoutConfig, kind| ctx.new_layout(c, &StorageSpec::new(kind)).map_err(err);
    let blocks = (limit.total / (64 * fragment)).max(1);
    let dev_l = new(
        shape(LayoutKind::LayerSeparateBlockFirst, blocks, fragment),
        StorageKind::Device,
    )?;
    let disk_l = new(
        shape(LayoutKind::FullyContiguous, blocks, fragment),
        StorageKind::Disk,
    )?;
    let back = new(
        shape(LayoutKind::LayerSeparateOuterFirst, blocks, fragment),
        StorageKind::Device,
    )?;
    let ids: Vec<u64> = (0..blocks).collect();
    let (sb, db) = shuffled_ids(blocks, fragment);
    ctx.fill(&dev_l, &ids, 7).map_err(err)?;
    let one = TransferOptions::default();
    let kv = |src: &Layout, dst: &Layout, s: &[u64], d: &[u64]| -> Result<(), String> {
        ctx.submit(src, s, dst, d, &one)
            .and_then(|t| t.wait(None))
            .map_err(err)
    };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 8];
    for i in 0..=iters {
        let l = limit.round()?;
        let tw = secs(|| kv(&dev_l, &disk_l, &sb, &db))?;
        let tr = secs(|| kv(&disk_l, &back, &db, &sb))?;
        if i > 0 {
            for (v, t) in samples.iter_mut().zip([tw, tr].into_iter().chain(l)) {
                v.push(t);
            }
        }
    }
    if ctx.checksum(&dev_l, &ids).map_err(err)? != ctx.checksum(&back, &ids).map_err(err)? {
        return Err(format!(
            "{} KiB: the round trip through the disk changed bytes",
            fragment >> 10
        ));
    }
    Ok((
        blocks * 64 * fragment,
        samples.into_iter().map(median).collect(),
    ))
}

pub fn run(a: &GpuDiskArgs) -> Result<(), String> {
    let ctx = Context::new(ContextConfig {
        nixl_backends: Backends::POSIX,
        disk_dir: a.disk_dir.clone(),
        ..Default::default()
    })
    .map_err(err)?;
    let dev = ctx
        .cuda_device()
        .cloned()
        .ok_or("bench --gpu-disk needs a CUDA GPU and driver; this machine has none")?;
    let total = a.total_mib << 20;
    let new = |c: LayoutConfig, kind| ctx.new_layout(c, &StorageSpec::new(kind)).map_err(err);
    let dir = a.disk_dir.clone().unwrap_or_else(std::env::temp_dir);
    let limit = DiskLimit {
        ctx: &ctx,
        pinned: new(one_block(total), StorageKind::Pinned)?,
        disk: new(one_block(total), StorageKind::Disk)?,
        raw_path: dir.join(format!("kvxfer-bench-raw-{}", std::process::id())),
        total,
    };
    ctx.fill(&limit.pinned, &[0], 1).map_err(err)?;
    // D2H and H2D limits: one copy of the same bytes, medians of `iters`.
    let device = new(one_block(total), StorageKind::Device)?;
    let (h, d) = (
        limit.pinned.region(0, 0, 0).map_err(err)?.addr,
        device.region(0, 0, 0).map_err(err)?.addr,
    );
    dev.bind().map_err(err)?;
    let (mut d2h, mut h2d) = (Vec::new(), Vec::new());
    for i in 0..=a.iters {
        // SAFETY: both buffers hold `total` bytes; the device's context is bound.
        let down = unsafe { timed_large_copy(h, d, total, false) }?;
        // SAFETY: as above.
        let up = unsafe { timed_large_copy(h, d, total, true) }?;
        if i > 0 {
            d2h.push(down);
            h2d.push(up);
        }
    }
    drop(device);
    let gbps = |bytes: u64, t: f64| bytes as f64 / t / 1e9;
    let (d2h, h2d) = (gbps(total, median(d2h)), gbps(total, median(h2d)));
    let mut gds = Context::new(ContextConfig {
        nixl_backends: Backends::POSIX
            | if a.gds_mt {
                Backends::GDS_MT
            } else {
                Backends::GDS
            },
        capabilities: Capabilities {
            allow_gds: true,
            allow_gpu_rdma: false,
        },
        disk_dir: a.disk_dir.clone(),
        ..Default::default()
    });
    if !a.json {
        println!(
            "device <-> disk through pinned bounce buffers: {} MiB per point, median of {} (GB/s); D2H {d2h:.2}, H2D {h2d:.2}; disk limits measured in each round",
            a.total_mib, a.iters
        );
        println!(
            "{:>8} {:>7} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9}",
            "fragment",
            "frags",
            "dev->disk",
            "disk wr",
            "(raw/kvx)",
            "ratio",
            "disk->dev",
            "disk rd",
            "(raw/kvx)",
            "ratio",
            "GDS d->k",
            "GDS k->d"
        );
    }
    if let Err(e) = &gds {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"name": "gds", "available": false, "why": e.to_string()})
            );
        } else {
            println!("GDS: not measured, no GDS context here: {e}");
        }
    }
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        if fragment < 4096 || fragment % 4096 != 0 {
            return Err(format!("fragment {kib} KiB: use a multiple of 4 KiB"));
        }
        let (bytes, m) = measure(&ctx, &limit, fragment, a.iters)?;
        let (gw, gr) = (gbps(bytes, m[0]), gbps(bytes, m[1]));
        let (disk_w, disk_r) = (gbps(total, m[2]), gbps(total, m[3]));
        let (mw, mr) = (d2h.min(disk_w), h2d.min(disk_r));
        let gds_rates = match gds.as_ref().map(|g| measure(g, &limit, fragment, a.iters)) {
            Ok(Ok((b, g))) => Some((gbps(b, g[0]), gbps(b, g[1]))),
            Ok(Err(e)) => {
                // Reported once; the two-hop points go on without GDS.
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"name": "gds", "available": true, "failed": e})
                    );
                } else {
                    println!("GDS: transfers failed, not measured further: {e}");
                }
                gds = Err(kvxfer::Error::Unavailable(e));
                None
            }
            Err(_) => None,
        };
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "name": "gpu_disk", "fragment_bytes": fragment, "fragments": bytes / fragment,
                    "bytes": bytes, "iters": a.iters, "d2h_gbps": d2h, "h2d_gbps": h2d,
                    "disk_write_gbps": disk_w, "disk_read_gbps": disk_r,
                    "raw_write_gbps": gbps(total, m[4]), "raw_read_gbps": gbps(total, m[5]),
                    "kvxfer_contiguous_write_gbps": gbps(total, m[6]),
                    "kvxfer_contiguous_read_gbps": gbps(total, m[7]),
                    "device_to_disk_gbps": gw, "device_to_disk_ratio": gw / mw,
                    "disk_to_device_gbps": gr, "disk_to_device_ratio": gr / mr,
                    "gds_device_to_disk_gbps": gds_rates.map(|g| g.0),
                    "gds_disk_to_device_gbps": gds_rates.map(|g| g.1),
                })
            );
        } else {
            let g = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            println!(
                "{:>5} KiB {:>7} {gw:>9.2} {disk_w:>9.2} {:>9} {:>7.3} {gr:>9.2} {disk_r:>9.2} {:>9} {:>7.3} {:>9} {:>9}",
                kib,
                bytes / fragment,
                format!("{:.2}/{:.2}", gbps(total, m[4]), gbps(total, m[6])),
                gw / mw,
                format!("{:.2}/{:.2}", gbps(total, m[5]), gbps(total, m[7])),
                gr / mr,
                g(gds_rates.map(|r| r.0)),
                g(gds_rates.map(|r| r.1)),
            );
        }
    }
    let _ = std::fs::remove_file(&limit.raw_path);
    if !a.json {
        legend(&[
            (
                "dev->disk",
                "GB/s of kvxfer's device -> disk transfer (two hops through pinned buffers)",
            ),
            (
                "disk wr",
                "the disk's write limit measured in the round (large pwrite through O_DIRECT)",
            ),
            (
                "(raw/kvx)",
                "the raw disk write and kvxfer's own host -> disk write",
            ),
            (
                "ratio",
                "kvxfer / min(D2H limit, disk limit): the slower of the two hops bounds it",
            ),
            (
                "disk->dev",
                "the same for disk -> device, against min(H2D, disk read)",
            ),
            (
                "GDS",
                "where shown: NIXL's GDS backend directly, against the same limits",
            ),
        ]);
    }
    Ok(())
}
