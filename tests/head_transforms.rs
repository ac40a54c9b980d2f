//! Head transforms on host memory (0.2): tensor-parallel splits and assemblies between layouts
//! that hold different slices of a layer's heads, NHD <-> HND, every layout kind, layer ranges,
//! permuted ids, FP8 and MLA widths, and refusals that write nothing. Every byte is checked
//! against an independent formula of where (token, head) lives in a region.

use kvxfer::{
    Context, ContextConfig, Error, HeadOrder, Heads, Layout, LayoutConfig, LayoutKind, StorageKind,
    StorageSpec, TransferOptions,
};

const HEADS: u32 = 8;
const PAGE: u64 = 4;
const HEAD_DIM: u64 = 16;

fn ctx() -> Context {
    Context::new(ContextConfig {
        worker_threads: 3,
        nixl_backends: kvxfer::Backends::empty(),
        ..Default::default()
    })
    .unwrap()
}

/// A layout holding `n` heads from `begin` on, in `order`.
fn layout(
    ctx: &Context,
    kind: LayoutKind,
    (n, begin, order): (u32, u32, HeadOrder),
    width: u32,
    blocks: u64,
) -> Layout {
    let c = LayoutConfig {
        num_blocks: blocks,
        num_layers: 3,
        outer_dim: 2,
        page_size: PAGE,
        inner_dim: u64::from(n) * HEAD_DIM,
        dtype_width: width,
        alignment: 64,
        kind,
        heads: Heads {
            num_heads: n,
            head_begin: begin,
            order,
        },
    };
    ctx.new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap()
}

/// The bytes of head `h` of token `t` in (block, layer, outer), by the layout's own formula.
fn slice(l: &Layout, b: u64, layer: u64, o: u64, t: u64, h: u32) -> Vec<u8> {
    let c = l.config();
    let hb = HEAD_DIM * u64::from(c.dtype_width);
    let (n, i) = (
        u64::from(c.heads.num_heads),
        u64::from(h - c.heads.head_begin),
    );
    let off = match c.heads.order {
        HeadOrder::TokenMajor => (t * n + i) * hb,
        HeadOrder::HeadMajor => (i * PAGE + t) * hb,
    };
    let r = l.region(b, layer, o).unwrap();
    // SAFETY: a region of a live System layout, `off + hb` inside it.
    unsafe { std::slice::from_raw_parts((r.addr + off) as *const u8, hb as usize) }.to_vec()
}

fn heads_of(l: &Layout) -> std::ops::Range<u32> {
    let h = l.config().heads;
    h.head_begin..h.head_begin + h.num_heads
}

/// After a transfer of `sb -> db` for `layers`: every common head of every token matches the
/// source, every other byte of `dst` is what it was (`before`).
fn check(
    src: &Layout,
    sb: &[u64],
    dst: &Layout,
    db: &[u64],
    layers: std::ops::Range<u64>,
    before: &[Vec<u8>],
) {
    let common: Vec<u32> = heads_of(dst)
        .filter(|h| heads_of(src).contains(h))
        .collect();
    let c = dst.config();
    let mut k = 0;
    for b in 0..c.num_blocks {
        for l in 0..c.num_layers {
            for o in 0..2 {
                for t in 0..PAGE {
                    for h in heads_of(dst) {
                        let now = slice(dst, b, l, o, t, h);
                        let moved = db
                            .iter()
                            .position(|&d| d == b)
                            .filter(|_| layers.contains(&l) && common.contains(&h));
                        match moved {
                            Some(i) => assert_eq!(
                                now,
                                slice(src, sb[i], l, o, t, h),
                                "block {b} layer {l} outer {o} token {t} head {h}"
                            ),
                            None => assert_eq!(now, before[k], "untouched {b} {l} {o} {t} {h}"),
                        }
                        k += 1;
                    }
                }
            }
        }
    }
}

/// Every head slice of `l`, in `check`'s order.
fn snapshot(l: &Layout) -> Vec<Vec<u8>> {
    let c = l.config();
    let mut v = Vec::new();
    for b in 0..c.num_blocks {
        for layer in 0..c.num_layers {
            for o in 0..2 {
                for t in 0..PAGE {
                    for h in heads_of(l) {
                        v.push(slice(l, b, layer, o, t, h));
                    }
                }
            }
        }
    }
    v
}

fn moved(
    ctx: &Context,
    src: &Layout,
    sb: &[u64],
    dst: &Layout,
    db: &[u64],
    layers: (u64, u64),
) -> kvxfer::Result<()> {
    let opts = TransferOptions {
        layer_begin: layers.0,
        layer_end: layers.1,
        ..Default::default()
    };
    ctx.submit(src, sb, dst, db, &opts)?.wait(None)
}

#[test]
fn tensor_parallel_splits_and_assemblies_in_every_order_and_kind() {
    use HeadOrder::*;
    let ctx = ctx();
    let all: Vec<u64> = (0..6).collect();
    for (sk, dk) in [
        (
            LayoutKind::FullyContiguous,
            LayoutKind::LayerSeparateBlockFirst,
        ),
        (
            LayoutKind::LayerSeparateOuterFirst,
            LayoutKind::FullyContiguous,
        ),
        (
            LayoutKind::LayerSeparateBlockFirst,
            LayoutKind::LayerSeparateOuterFirst,
        ),
    ] {
        for (so, d_o) in [
            (TokenMajor, HeadMajor),
            (HeadMajor, TokenMajor),
            (TokenMajor, TokenMajor),
            (HeadMajor, HeadMajor),
        ] {
            // Split: TP 1 -> 2, 4, 8 (each rank its own slice), permuted ids.
            let full = layout(&ctx, sk, (HEADS, 0, so), 2, 6);
            ctx.fill(&full, &all, 5).unwrap();
            for tp in [2u32, 4, 8] {
                let per = HEADS / tp;
                let mut ranks = Vec::new();
                for r in 0..tp {
                    let rank = layout(&ctx, dk, (per, r * per, d_o), 2, 6);
                    ctx.fill(&rank, &all, 9).unwrap();
                    let before = snapshot(&rank);
                    let (sb, db) = ([4u64, 0, 2], [1u64, 5, 3]);
                    moved(&ctx, &full, &sb, &rank, &db, (0, 0)).unwrap();
                    check(&full, &sb, &rank, &db, 0..3, &before);
                    ranks.push(rank);
                }
                // Assembly: every rank into one full layout of the other order and kind.
                let back = layout(&ctx, sk, (HEADS, 0, d_o), 2, 6);
                ctx.fill(&back, &all, 1).unwrap();
                for rank in &ranks {
                    moved(&ctx, rank, &[1, 5, 3], &back, &[4, 0, 2], (0, 0)).unwrap();
                }
                // Blocks 4, 0, 2 of `back` now hold exactly what `full` holds there.
                for b in [4u64, 0, 2] {
                    for l in 0..3 {
                        for o in 0..2 {
                            for t in 0..PAGE {
                                for h in 0..HEADS {
                                    assert_eq!(
                                        slice(&back, b, l, o, t, h),
                                        slice(&full, b, l, o, t, h),
                                        "TP {tp} assembly {sk:?}/{so:?} -> {dk:?}/{d_o:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn tp4_to_tp2_ranks_overlap_in_part_and_layer_ranges_hold() {
    use HeadOrder::*;
    let ctx = ctx();
    let all: Vec<u64> = (0..5).collect();
    // Prefill TP 4 rank 1 holds heads 2..4; decode TP 2 rank 0 holds 0..4 and rank 1 4..8.
    let prefill = layout(&ctx, LayoutKind::FullyContiguous, (2, 2, TokenMajor), 2, 5);
    ctx.fill(&prefill, &all, 3).unwrap();
    let decode0 = layout(
        &ctx,
        LayoutKind::LayerSeparateBlockFirst,
        (4, 0, HeadMajor),
        2,
        5,
    );
    ctx.fill(&decode0, &all, 4).unwrap();
    let before = snapshot(&decode0);
    moved(&ctx, &prefill, &[0, 1], &decode0, &[3, 2], (1, 3)).unwrap();
    check(&prefill, &[0, 1], &decode0, &[3, 2], 1..3, &before);
    // No common head with decode rank 1: refused, nothing written.
    let decode1 = layout(
        &ctx,
        LayoutKind::LayerSeparateBlockFirst,
        (4, 4, HeadMajor),
        2,
        5,
    );
    ctx.fill(&decode1, &all, 4).unwrap();
    let before = snapshot(&decode1);
    let e = moved(&ctx, &prefill, &[0], &decode1, &[0], (0, 0)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(snapshot(&decode1), before);
}

#[test]
fn fp8_and_mla_widths() {
    use HeadOrder::*;
    let ctx = ctx();
    let all: Vec<u64> = (0..4).collect();
    // FP8: one byte per element.
    let a = layout(&ctx, LayoutKind::FullyContiguous, (8, 0, TokenMajor), 1, 4);
    let b = layout(&ctx, LayoutKind::FullyContiguous, (4, 4, HeadMajor), 1, 4);
    ctx.fill(&a, &all, 2).unwrap();
    ctx.fill(&b, &all, 8).unwrap();
    let before = snapshot(&b);
    moved(&ctx, &a, &[3, 1], &b, &[0, 2], (0, 0)).unwrap();
    check(&a, &[3, 1], &b, &[0, 2], 0..3, &before);
    // MLA: one latent head that every rank holds whole (head 0 on both sides).
    let m1 = layout(
        &ctx,
        LayoutKind::LayerSeparateOuterFirst,
        (1, 0, TokenMajor),
        2,
        4,
    );
    let m2 = layout(&ctx, LayoutKind::FullyContiguous, (1, 0, HeadMajor), 2, 4);
    ctx.fill(&m1, &all, 6).unwrap();
    ctx.fill(&m2, &all, 7).unwrap();
    let before = snapshot(&m2);
    moved(&ctx, &m1, &[0, 1, 2, 3], &m2, &[3, 2, 1, 0], (0, 0)).unwrap();
    check(&m1, &[0, 1, 2, 3], &m2, &[3, 2, 1, 0], 0..3, &before);
}

#[test]
fn mismatched_shapes_are_refused_and_write_nothing() {
    use HeadOrder::*;
    let ctx = ctx();
    let all: Vec<u64> = (0..3).collect();
    let src = layout(&ctx, LayoutKind::FullyContiguous, (8, 0, TokenMajor), 2, 3);
    ctx.fill(&src, &all, 1).unwrap();
    // Other element width (same head bytes would need another head_dim).
    let w = layout(&ctx, LayoutKind::FullyContiguous, (4, 0, TokenMajor), 1, 3);
    // Other page size.
    let mut c = *src.config();
    c.page_size = 8;
    c.heads = Heads {
        num_heads: 4,
        head_begin: 0,
        order: HeadOrder::HeadMajor,
    };
    c.inner_dim = 4 * HEAD_DIM;
    let p = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    // Other head_dim: 8 heads in an inner_dim of 64 (head_dim 8).
    let mut c = *src.config();
    c.inner_dim = 64;
    let hd = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    // Only one side describes its heads, and the regions differ.
    let mut c = *src.config();
    c.heads = Heads::OPAQUE;
    c.inner_dim = 4 * HEAD_DIM;
    let opaque = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    for dst in [&w, &p, &hd, &opaque] {
        ctx.fill(dst, &all, 9).unwrap();
        let before = ctx.checksum(dst, &all).unwrap();
        let e = moved(&ctx, &src, &[0, 1], dst, &[1, 2], (0, 0)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(ctx.checksum(dst, &all).unwrap(), before, "{e}");
    }
    // Heads that do not divide inner_dim, and an unknown order, are refused at creation.
    let mut c = *src.config();
    c.heads.num_heads = 3;
    assert!(matches!(
        ctx.new_layout(c, &StorageSpec::new(StorageKind::System)),
        Err(Error::InvalidArgument(_))
    ));
}
