//! GPU tests of pageable host memory (System) <-> device through the pinned bounce pool.
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use std::time::Duration;

use common::all;
use common::gpu::*;
use kvxfer::{Layout, LayoutConfig, LayoutKind, Plan, StorageKind, Strategy, TransferOptions};

/// 128 blocks of 1 MiB (32 layers x K,V x 16 KiB): 128 MiB, four chunks of the pool's 32 MiB
/// buffers, twice what a pair holds.
fn big(kind: LayoutKind) -> LayoutConfig {
    cfg(kind, 128, 32, 16, 512, 2)
}

/// Moves reversed, interleaved ids between `src` and `dst`, layers `layers`, checks the
/// moved pieces and the guard blocks (`check_move_stats`), and that the pool carried it.
fn moved_through_the_pool(ctx: &kvxfer::Context, src: &Layout, dst: &Layout, layers: (u64, u64)) {
    let opts = TransferOptions {
        layer_begin: layers.0,
        layer_end: layers.1,
        ..Default::default()
    };
    let s = check_move_stats(ctx, src, dst, &opts);
    assert!(s.bounced, "{s:?}");
    assert!(matches!(
        s.plan,
        Plan::Direct(Strategy::CudaBlockingH2D | Strategy::CudaBlockingD2H)
    ));
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn pageable_to_and_from_device_in_every_kind_pair_with_guards() {
    let ctx = ctx();
    for hk in KINDS {
        for dk in KINDS {
            let host = layout(&ctx, big(hk), StorageKind::System);
            let dev = layout(&ctx, big(dk), StorageKind::Device);
            moved_through_the_pool(&ctx, &host, &dev, (0, 0));
            moved_through_the_pool(&ctx, &dev, &host, (0, 0));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn pageable_layer_ranges() {
    let ctx = ctx();
    let host = layout(
        &ctx,
        big(LayoutKind::LayerSeparateOuterFirst),
        StorageKind::System,
    );
    let dev = layout(&ctx, big(LayoutKind::FullyContiguous), StorageKind::Device);
    moved_through_the_pool(&ctx, &host, &dev, (3, 17));
    moved_through_the_pool(&ctx, &dev, &host, (0, 1));
}

const FAULT_ROLE: &str = "KVX_TEST_BOUNCE_FAULT_ROLE";

/// A failure in the middle of a transfer through the pool (chunk 1 of 4, injected) fails that
/// transfer, gives both buffers back, and leaves the context working: two transfers at once
/// (each needs a pair of buffers of its own) then complete.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn a_failure_in_the_middle_leaves_the_pool_and_context_working() {
    if std::env::var_os(FAULT_ROLE).is_some() {
        let ctx = ctx();
        let host = layout(&ctx, big(LayoutKind::FullyContiguous), StorageKind::System);
        let dev = layout(&ctx, big(LayoutKind::FullyContiguous), StorageKind::Device);
        ctx.fill(&host, &all(128), 5).unwrap();
        let failed = ctx
            .submit(
                &host,
                &all(128),
                &dev,
                &all(128),
                &TransferOptions::default(),
            )
            .and_then(|t| t.wait(Some(Duration::from_secs(60))));
        assert!(
            matches!(&failed, Err(kvxfer::Error::Internal(m)) if m.contains("injected")),
            "{failed:?}"
        );
        // Small transfers have chunk 0 only, which the fault leaves alone.
        let small = cfg(LayoutKind::FullyContiguous, 8, 4, 16, 512, 2); // 8 x 128 KiB
        let (h, d) = (
            layout(&ctx, small, StorageKind::System),
            layout(&ctx, small, StorageKind::Device),
        );
        let (h2, d2) = (
            layout(&ctx, small, StorageKind::System),
            layout(&ctx, small, StorageKind::Device),
        );
        ctx.fill(&h, &all(8), 6).unwrap();
        ctx.fill(&h2, &all(8), 7).unwrap();
        let opts = TransferOptions::default();
        let t1 = ctx.submit(&h, &all(8), &d, &all(8), &opts).unwrap();
        let t2 = ctx.submit(&h2, &all(8), &d2, &all(8), &opts).unwrap();
        t1.wait(Some(Duration::from_secs(30))).unwrap();
        t2.wait(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            ctx.checksum(&d, &all(8)).unwrap(),
            ctx.checksum(&h, &all(8)).unwrap()
        );
        assert_eq!(
            ctx.checksum(&d2, &all(8)).unwrap(),
            ctx.checksum(&h2, &all(8)).unwrap()
        );
        assert!(ctx.stats().bounce_buffers <= 4);
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_failure_in_the_middle_leaves_the_pool_and_context_working",
            "--include-ignored",
        ])
        .env(FAULT_ROLE, "1")
        .env("KVX_FAULT_BOUNCE_CHUNK", "1")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the child with the injected fault failed: {status}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn many_pageable_transfers_from_many_threads() {
    let ctx = ctx();
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 16, 8, 16, 256, 2); // 16 x 128 KiB
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let ctx = &ctx;
            s.spawn(move || {
                let host = layout(ctx, c, StorageKind::System);
                let dev = layout(ctx, c, StorageKind::Device);
                let back = layout(ctx, c, StorageKind::System);
                for round in 0..4 {
                    ctx.fill(&host, &all(16), t * 10 + round).unwrap();
                    let rev: Vec<u64> = (0..16).rev().collect();
                    ctx.submit(&host, &all(16), &dev, &rev, &TransferOptions::default())
                        .and_then(|x| x.wait(Some(Duration::from_secs(60))))
                        .unwrap();
                    ctx.submit(&dev, &rev, &back, &all(16), &TransferOptions::default())
                        .and_then(|x| x.wait(Some(Duration::from_secs(60))))
                        .unwrap();
                    assert_eq!(
                        ctx.checksum(&back, &all(16)).unwrap(),
                        ctx.checksum(&host, &all(16)).unwrap()
                    );
                }
            });
        }
    });
}
