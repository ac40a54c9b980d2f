//! GPU tests of two GPUs (`two_gpus_*`: peer access, and GPU RDMA between processes on their own GPUs).
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use std::time::Duration;

use kvxfer::{CopyMode, LayoutConfig, LayoutKind, Mechanism, StorageKind, TransferOptions};

use common::all;
use common::gpu::*;

#[test]
#[ignore = "needs two CUDA GPUs and NIXL's UCX backend: run scripts/gpu-test on a two-GPU machine"]
fn two_gpus_rdma_between_processes_on_their_own_gpus() {
    gpu_rdma_between_processes("two_gpus_rdma_between_processes_on_their_own_gpus", 1);
}

#[test]
#[ignore = "needs two CUDA GPUs: run scripts/gpu-test on a two-GPU machine"]
fn two_gpus_d2d_every_layout_kind_and_copy_mode() {
    let ctx = ctx();
    for sk in KINDS {
        for dk in KINDS {
            for (from, to) in [(0, 1), (1, 0)] {
                let src = layout_on(&ctx, cfg(sk, 24, 3, 4, 64, 2), from);
                let dst = layout_on(&ctx, cfg(dk, 24, 3, 4, 64, 2), to);
                for mode in [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel] {
                    let opts = TransferOptions {
                        copy_mode: mode,
                        ..Default::default()
                    };
                    let m = check_move(&ctx, &src, &dst, &opts);
                    let want = match mode {
                        CopyMode::CopyEngine => Mechanism::CopyEngine,
                        _ => Mechanism::Kernel,
                    };
                    assert_eq!(m, want, "{sk:?} on {from} -> {dk:?} on {to}, {mode:?}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs two CUDA GPUs: run scripts/gpu-test on a two-GPU machine"]
fn two_gpus_layer_ranges_and_big_lists() {
    let ctx = ctx();
    // 4096 blocks of 32 KiB regions, one layer: the kernel's table path and the batch API.
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 4096, 1, 16, 1024, 2);
    let a = layout_on(&ctx, c, 0);
    let b = layout_on(
        &ctx,
        LayoutConfig {
            kind: LayoutKind::FullyContiguous,
            ..c
        },
        1,
    );
    let back = layout_on(&ctx, c, 0);
    ctx.fill(&a, &all(4096), 3).unwrap();
    let mut perm = all(4096);
    fastrand::Rng::with_seed(9).shuffle(&mut perm);
    for mode in [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel] {
        let opts = TransferOptions {
            copy_mode: mode,
            ..Default::default()
        };
        ctx.fill(&back, &all(4096), 0).unwrap();
        let t = ctx.submit(&a, &all(4096), &b, &perm, &opts).unwrap();
        t.wait(Some(Duration::from_secs(60))).unwrap();
        let t = ctx.submit(&b, &perm, &back, &all(4096), &opts).unwrap();
        t.wait(Some(Duration::from_secs(60))).unwrap();
        assert_eq!(
            ctx.checksum(&a, &all(4096)).unwrap(),
            ctx.checksum(&back, &all(4096)).unwrap(),
            "{mode:?}"
        );
    }
    // Layer range 1..3 of 4 across the two devices: only those layers move.
    let c = cfg(LayoutKind::LayerSeparateOuterFirst, 8, 4, 16, 64, 2);
    let src = layout(&ctx, c, StorageKind::Pinned);
    let mid0 = layout_on(&ctx, c, 0);
    let mid1 = layout_on(
        &ctx,
        LayoutConfig {
            kind: LayoutKind::FullyContiguous,
            ..c
        },
        1,
    );
    let back = layout(&ctx, c, StorageKind::Pinned);
    ctx.fill(&src, &all(8), 5).unwrap();
    ctx.fill(&mid1, &all(8), 6).unwrap();
    ctx.fill(&back, &all(8), 7).unwrap();
    let one = TransferOptions::default();
    ctx.submit(&src, &all(8), &mid0, &all(8), &one)
        .unwrap()
        .wait(None)
        .unwrap();
    let ranged = TransferOptions {
        layer_begin: 1,
        layer_end: 3,
        ..Default::default()
    };
    ctx.submit(&mid0, &[2], &mid1, &[5], &ranged)
        .unwrap()
        .wait(None)
        .unwrap();
    ctx.submit(&mid1, &[5], &back, &[1], &one)
        .unwrap()
        .wait(None)
        .unwrap();
    for l in 0..4 {
        for o in 0..2 {
            let same = bytes(&src, 2, l, o) == bytes(&back, 1, l, o);
            assert_eq!(same, (1..3).contains(&l), "layer {l} outer {o}");
        }
    }
}

/// TP 4 -> 2 with NHD -> HND between the two GPUs, both ways, in every copy mode: the kernel
/// reaches the other GPU's memory through peer access and moves the head slices (the copy
/// engines would take microseconds per slice), every slice checked on pinned copies.
#[test]
#[ignore = "needs two CUDA GPUs: run scripts/gpu-test on a two-GPU machine"]
fn two_gpus_head_transforms_between_the_gpus() {
    use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
    let ctx = ctx();
    let ids = all(8);
    let (src_ids, dst_ids) = ([0u64, 5, 7], [6u64, 1, 3]);
    let on = |c: LayoutConfig, storage| layout(&ctx, c, storage);
    for mode in [CopyMode::Auto, CopyMode::Kernel, CopyMode::CopyEngine] {
        let opts = TransferOptions {
            copy_mode: mode,
            ..Default::default()
        };
        for (from, to) in [(0, 1), (1, 0)] {
            // A prefill rank (heads 2..4, token-major) on `from`, a decode rank (heads 0..4,
            // head-major) on `to`.
            let prefill_cfg = heads_cfg(LayoutKind::FullyContiguous, 8, 2, 2, TokenMajor);
            let decode_cfg = heads_cfg(LayoutKind::LayerSeparateBlockFirst, 8, 4, 0, HeadMajor);
            let host = on(prefill_cfg, StorageKind::Pinned);
            ctx.fill(&host, &ids, 40 + from as u64).unwrap();
            let prefill = layout_on(&ctx, prefill_cfg, from);
            ctx.submit(&host, &ids, &prefill, &ids, &opts)
                .unwrap()
                .wait(Some(Duration::from_secs(30)))
                .unwrap();
            let decode = layout_on(&ctx, decode_cfg, to);
            let t = ctx
                .submit(&prefill, &src_ids, &decode, &dst_ids, &opts)
                .unwrap();
            t.wait(Some(Duration::from_secs(30))).unwrap();
            assert_eq!(
                t.stats().mechanism,
                Mechanism::Kernel,
                "{mode:?} {from}->{to}"
            );
            // Back the other way into a fresh prefill rank, then both to pinned memory.
            let again = layout_on(&ctx, prefill_cfg, from);
            ctx.submit(&decode, &dst_ids, &again, &src_ids, &opts)
                .unwrap()
                .wait(Some(Duration::from_secs(30)))
                .unwrap();
            let (seen, back) = (
                on(decode_cfg, StorageKind::Pinned),
                on(prefill_cfg, StorageKind::Pinned),
            );
            for (d, h) in [(&decode, &seen), (&again, &back)] {
                ctx.submit(d, &ids, h, &ids, &opts)
                    .unwrap()
                    .wait(Some(Duration::from_secs(30)))
                    .unwrap();
            }
            for (&s, &d) in src_ids.iter().zip(&dst_ids) {
                for l in 0..2 {
                    for o in 0..2 {
                        for tok in 0..16 {
                            for h in 2..4 {
                                let want = common::head_slice(&host, s, l, o, tok, h);
                                assert_eq!(common::head_slice(&seen, d, l, o, tok, h), want);
                                assert_eq!(common::head_slice(&back, s, l, o, tok, h), want);
                            }
                        }
                    }
                }
            }
        }
    }
}
