//! `kvxfer bench --transform` (host memory) and `--gpu --transform` (H2D, D2H, D2D): head
//! transforms between differently sharded engines against the same bytes moved untransformed
//! in the same run. Cases: a TP 4 rank (2 heads, NHD) into a TP 2 rank (4 heads, HND), and a
//! TP 2 rank (4 heads, HND) split into a TP 4 rank (2 heads, NHD); head slices of 256 B to
//! 16 KiB (head_dim x 2 bytes); 16 tokens per block, K and V, scattered ids.

use kvxfer::{
    Context, HeadOrder, Heads, Layout, LayoutConfig, LayoutKind, StorageKind, StorageSpec,
    TransferOptions,
};

use super::common::{err, gpu_context, legend, median, secs, shuffled_ids};

pub struct TransformArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub gpu: bool,
    /// Host memory of this context to and from a second context's exported layouts over UCX
    /// (writes and reads), instead of local tiers.
    pub peer: bool,
}

const PAGE: u64 = 16;
/// Bytes of one head of one token (head_dim x 2) the rows measure.
const SLICES: [u64; 4] = [256, 1024, 4096, 16384];
/// Heads both sides of every case hold.
const COMMON: u64 = 2;

/// (name, source heads, destination heads)
type Case = (&'static str, (u32, u32, HeadOrder), (u32, u32, HeadOrder));
const CASES: [Case; 2] = [
    (
        "tp4_to_tp2_nhd_to_hnd",
        (2, 2, HeadOrder::TokenMajor),
        (4, 0, HeadOrder::HeadMajor),
    ),
    (
        "tp2_to_tp4_hnd_to_nhd",
        (4, 0, HeadOrder::HeadMajor),
        (2, 2, HeadOrder::TokenMajor),
    ),
];

fn shape(blocks: u64, head_bytes: u64, (n, begin, order): (u32, u32, HeadOrder)) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 1,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: u64::from(n) * head_bytes / 2,
        dtype_width: 2,
        alignment: 4096,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Heads {
            num_heads: n,
            head_begin: begin,
            order,
        },
    }
}

/// The same bytes per block without heads: regions of the common heads of 16 tokens.
fn plain(blocks: u64, head_bytes: u64) -> LayoutConfig {
    LayoutConfig {
        inner_dim: COMMON * head_bytes / 2,
        heads: Heads::OPAQUE,
        ..shape(blocks, head_bytes, (1, 0, HeadOrder::TokenMajor))
    }
}

fn new(ctx: &Context, c: LayoutConfig, kind: StorageKind) -> Result<Layout, String> {
    ctx.new_layout(c, &StorageSpec::new(kind)).map_err(err)
}

pub fn run(a: &TransformArgs) -> Result<(), String> {
    let ctx = if a.gpu {
        gpu_context("bench --gpu --transform")?.0
    } else {
        Context::new(kvxfer::ContextConfig {
            nixl_backends: kvxfer::Backends::empty(),
            ..Default::default()
        })
        .map_err(err)?
    };
    if a.peer {
        return peer(a);
    }
    let directions: &[(&str, StorageKind, StorageKind)] = if a.gpu {
        &[
            ("H2D", StorageKind::Pinned, StorageKind::Device),
            ("D2H", StorageKind::Device, StorageKind::Pinned),
            ("D2D", StorageKind::Device, StorageKind::Device),
        ]
    } else {
        &[("host", StorageKind::System, StorageKind::System)]
    };
    header(a, "head transforms");
    for head_bytes in SLICES {
        let Sizes {
            moved_per_block,
            blocks,
            src_ids: sb,
            dst_ids: db,
        } = Sizes::of(a, head_bytes);
        for &(dir, sk, dk) in directions {
            let (ps, pd) = (
                new(&ctx, plain(blocks, head_bytes), sk)?,
                new(&ctx, plain(blocks, head_bytes), dk)?,
            );
            for (case, s, d) in CASES {
                let (ts, td) = (
                    new(&ctx, shape(blocks, head_bytes, s), sk)?,
                    new(&ctx, shape(blocks, head_bytes, d), dk)?,
                );
                let opts = TransferOptions::default();
                let once = |src: &Layout, dst: &Layout| {
                    secs(|| {
                        ctx.submit(src, &sb, dst, &db, &opts)
                            .and_then(|t| t.wait(None))
                            .map_err(err)
                    })
                };
                let bytes = (blocks * moved_per_block) as f64;
                let row = Row {
                    dir,
                    case,
                    head_bytes,
                    bytes,
                };
                row.measure(a, || once(&ts, &td), || once(&ps, &pd))?;
            }
        }
    }
    footer(a);
    Ok(())
}

/// Writes and reads between this context's host memory and a second context's exported host
/// layouts over NIXL/UCX (the transport `UCX_TLS` picks): transformed (staged through the
/// bounce pool below 16 KiB pieces) against the same bytes between opaque layouts.
fn peer(a: &TransformArgs) -> Result<(), String> {
    let ctx = Context::new(kvxfer::ContextConfig::default()).map_err(err)?;
    let other = Context::new(kvxfer::ContextConfig::default()).map_err(err)?;
    header(a, "head transforms to and from a peer over UCX");
    for head_bytes in SLICES {
        let Sizes {
            moved_per_block,
            blocks,
            src_ids: sb,
            dst_ids: db,
        } = Sizes::of(a, head_bytes);
        let host = StorageKind::System;
        let plain_local = new(&ctx, plain(blocks, head_bytes), host)?;
        let plain_far = new(&other, plain(blocks, head_bytes), host)?;
        for (case, s, d) in CASES {
            let local = new(&ctx, shape(blocks, head_bytes, s), host)?;
            let far = new(&other, shape(blocks, head_bytes, d), host)?;
            let exported = other.export(&[&far, &plain_far]).map_err(err)?;
            let imported = ctx.import(&exported).map_err(err)?;
            let (remote, remote_plain) = (&imported.layouts()[0], &imported.layouts()[1]);
            for (dir, write) in [("peer_write", true), ("peer_read", false)] {
                let opts = TransferOptions::default();
                let once = |l: &Layout, r: &Layout| {
                    secs(|| {
                        let t = if write {
                            ctx.submit(l, &sb, r, &db, &opts)
                        } else {
                            ctx.submit(r, &db, l, &sb, &opts)
                        };
                        t.and_then(|t| t.wait(None)).map_err(err)
                    })
                };
                let bytes = (blocks * moved_per_block) as f64;
                let row = Row {
                    dir,
                    case,
                    head_bytes,
                    bytes,
                };
                row.measure(
                    a,
                    || once(&local, remote),
                    || once(&plain_local, remote_plain),
                )?;
            }
        }
    }
    footer(a);
    Ok(())
}

/// One row of the bench: a direction, a case and a head slice size moving `bytes`.
#[derive(Clone, Copy)]
struct Row {
    dir: &'static str,
    case: &'static str,
    head_bytes: u64,
    bytes: f64,
}

impl Row {
    /// Times `transformed` and `plain` alternately (round 0 warms up), prints the medians.
    fn measure(
        &self,
        a: &TransformArgs,
        mut transformed: impl FnMut() -> Result<f64, String>,
        mut plain: impl FnMut() -> Result<f64, String>,
    ) -> Result<(), String> {
        let (mut tt, mut pt) = (Vec::new(), Vec::new());
        for i in 0..=a.iters {
            let (x, y) = (transformed()?, plain()?);
            if i > 0 {
                tt.push(x);
                pt.push(y);
            }
        }
        let (gbps, plain_gbps) = (self.bytes / median(tt) / 1e9, self.bytes / median(pt) / 1e9);
        let ratio = gbps / plain_gbps;
        let Row {
            dir,
            case,
            head_bytes,
            bytes,
        } = *self;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "name": "transform", "direction": dir, "case": case,
                    "fragment_bytes": head_bytes, "bytes": bytes, "iters": a.iters,
                    "gbps": gbps, "plain_gbps": plain_gbps, "ratio": ratio,
                })
            );
        } else {
            println!(
                "{dir:<10} {case:<22} {head_bytes:>7} B {gbps:>9.2} {plain_gbps:>10.2} {ratio:>7.3}"
            );
        }
        Ok(())
    }
}

/// A row's sizes: bytes each block moves (the common heads of 16 tokens, K and V), blocks for
/// --total-mib, and shuffled source and destination ids.
struct Sizes {
    moved_per_block: u64,
    blocks: u64,
    src_ids: Vec<u64>,
    dst_ids: Vec<u64>,
}

impl Sizes {
    fn of(a: &TransformArgs, head_bytes: u64) -> Self {
        let moved_per_block = 2 * PAGE * COMMON * head_bytes;
        let blocks = ((a.total_mib << 20) / moved_per_block).max(1);
        let (src_ids, dst_ids) = shuffled_ids(blocks, head_bytes);
        Self {
            moved_per_block,
            blocks,
            src_ids,
            dst_ids,
        }
    }
}

/// The table's title and column heads (not with --json).
fn header(a: &TransformArgs, what: &str) {
    if !a.json {
        println!(
            "{what}, {} MiB moved per transfer, median of {}",
            a.total_mib, a.iters
        );
        println!(
            "{:<10} {:<22} {:>9} {:>9} {:>10} {:>7}",
            "dir", "case", "slice", "GB/s", "plain GB/s", "ratio"
        );
    }
}

/// The columns' legend (not with --json).
fn footer(a: &TransformArgs) {
    if !a.json {
        legend(&[
            (
                "slice",
                "bytes of one head of one token (head_dim x 2): the unit an NHD <-> HND transform moves",
            ),
            (
                "plain",
                "the same bytes per block moved between layouts without heads (whole regions)",
            ),
            ("ratio", "transformed GB/s / plain GB/s, same run"),
        ]);
    }
}
