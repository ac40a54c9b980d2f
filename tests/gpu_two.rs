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
