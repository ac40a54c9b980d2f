//! GPU tests of device <-> disk (two-hop and GDS).
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use std::time::Duration;

use kvxfer::{
    Context, ContextConfig, Layout, LayoutConfig, LayoutKind, Plan, StorageKind, StorageSpec,
    Strategy, TransferOptions,
};

use common::all;
use common::gpu::*;

/// A context with CUDA and NIXL's POSIX backend. The GPU run carries NIXL (scripts/gpu-test):
/// without it these tests fail, they never pass untested.
fn ctx_disk() -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::Backends::POSIX,
        ..Default::default()
    })
    .expect("context with NIXL's POSIX backend (set KVX_NIXL_LIB_DIR)");
    assert!(c.has_cuda(), "these tests need a CUDA GPU and driver");
    c
}

/// Every block of `l` outside `written` still has the checksum it had in `before`.
fn assert_guards(ctx: &Context, l: &Layout, written: &[u64], before: &[u64], what: &str) {
    let after = ctx.checksum(l, &all(l.config().num_blocks)).unwrap();
    for b in 0..l.config().num_blocks {
        if !written.contains(&b) {
            assert_eq!(after[b as usize], before[b as usize], "{what} guard {b}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL: run scripts/gpu-test"]
fn device_disk_two_hop_round_trip_with_guards_and_layer_ranges() {
    let ctx = ctx_disk();
    // 128 blocks x 8 layers x 2 x 16 KiB = 32 MiB per layout: 24 MiB moved, two bounce chunks.
    // The 6000-byte regions cannot use O_DIRECT: they go through the buffered descriptor.
    for (inner, layers) in [(1024u64, 0..0u64), (1024, 2..5), (375, 0..0)] {
        let n = 128;
        let c = cfg(LayoutKind::LayerSeparateOuterFirst, n, 8, 4, inner, 4);
        let with = |kind| LayoutConfig { kind, ..c };
        let src = layout(&ctx, c, StorageKind::Pinned);
        let dev = layout(
            &ctx,
            with(LayoutKind::LayerSeparateBlockFirst),
            StorageKind::Device,
        );
        let disk = layout(&ctx, with(LayoutKind::FullyContiguous), StorageKind::Disk);
        let dev2 = layout(&ctx, with(LayoutKind::FullyContiguous), StorageKind::Device);
        let back = layout(&ctx, c, StorageKind::Pinned);
        ctx.fill(&src, &all(n), 1).unwrap();
        ctx.fill(&dev, &all(n), 2).unwrap();
        ctx.fill(&disk, &all(n), 3).unwrap();
        ctx.fill(&dev2, &all(n), 4).unwrap();
        ctx.fill(&back, &all(n), 5).unwrap();
        let disk_before = ctx.checksum(&disk, &all(n)).unwrap();
        let dev2_before = ctx.checksum(&dev2, &all(n)).unwrap();
        let opts = TransferOptions {
            layer_begin: layers.start,
            layer_end: layers.end,
            ..Default::default()
        };
        // src -> dev (all layers, identity), dev -> disk (reversed, 96 blocks), disk -> dev2
        // (shifted), dev2 -> back (identity): block b of src ends in block f(b) of back.
        let t = ctx.submit(&src, &all(n), &dev, &all(n), &TransferOptions::default());
        t.unwrap().wait(None).unwrap();
        let a: Vec<u64> = (0..96).collect();
        let on_disk: Vec<u64> = a.iter().map(|b| n - 1 - b).collect();
        let t = ctx.submit(&dev, &a, &disk, &on_disk, &opts).unwrap();
        assert!(
            matches!(t.stats().plan, Plan::TwoHop { .. }),
            "{}",
            t.stats().plan
        );
        t.wait(Some(Duration::from_secs(120))).unwrap();
        let on_dev2: Vec<u64> = a.iter().map(|b| (b + 7) % n).collect();
        let t = ctx.submit(&disk, &on_disk, &dev2, &on_dev2, &opts).unwrap();
        assert!(
            matches!(t.stats().plan, Plan::TwoHop { .. }),
            "{}",
            t.stats().plan
        );
        t.wait(Some(Duration::from_secs(120))).unwrap();
        // Guards: blocks that no transfer wrote keep their bytes, on disk and on the device.
        assert_guards(&ctx, &disk, &on_disk, &disk_before, "disk");
        assert_guards(&ctx, &dev2, &on_dev2, &dev2_before, "device");
        let t = ctx.submit(&dev2, &all(n), &back, &all(n), &TransferOptions::default());
        t.unwrap().wait(None).unwrap();
        let moved = if layers.is_empty() {
            0..8
        } else {
            layers.clone()
        };
        for (&s, &d) in a.iter().zip(&on_dev2) {
            for l in 0..8 {
                for o in 0..2 {
                    let same = bytes(&src, s, l, o) == bytes(&back, d, l, o);
                    assert_eq!(
                        same,
                        moved.contains(&l),
                        "inner {inner}: block {s} layer {l} outer {o} (layers {layers:?})"
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU, NIXL's GDS backend and cuFile: run scripts/gpu-test"]
fn gds_moves_device_blocks_or_is_refused_before_anything_moves() {
    // Where cuFile takes the file, blocks go device -> disk -> device directly and arrive
    // whole. Where it does not (no nvidia-fs and no compat mode, a file system it refuses, no
    // udev inside a container), the context says so when it is made (a probe file in its
    // disk folder), or submit for a file elsewhere, without hanging and without writing
    // anything. KVX_REQUIRE_GDS=1 makes the refusal a failure, for machines known to have GDS.
    // KVX_TEST_GDS_BACKEND=GDS_MT tries NIXL's multi-threaded GDS backend instead.
    let gds = match std::env::var("KVX_TEST_GDS_BACKEND").as_deref() {
        Ok("GDS_MT") => kvxfer::Backends::GDS_MT,
        _ => kvxfer::Backends::GDS,
    };
    let require = std::env::var_os("KVX_REQUIRE_GDS").is_some_and(|v| v == "1");
    let made = std::time::Instant::now();
    let ctx = match Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::Backends::POSIX | gds,
        capabilities: kvxfer::Capabilities {
            allow_gds: true,
            allow_gpu_rdma: false,
        },
        ..Default::default()
    }) {
        Ok(c) => c,
        // cuFile refuses the probe file: said when the context is made, with the reason.
        Err(kvxfer::Error::Unavailable(m)) if m.contains("GPUDirect Storage is not usable") => {
            assert!(!require, "GDS required but refused: {m}");
            assert!(
                made.elapsed() < Duration::from_secs(10),
                "refused, but slowly"
            );
            println!("GDS refused on this machine when the context was made: {m}");
            return;
        }
        Err(e) => panic!("a context with the GDS backend (cuFile and NIXL's GDS plugin): {e:?}"),
    };
    let n = 32;
    let c = cfg(LayoutKind::LayerSeparateOuterFirst, n, 4, 4, 1024, 4);
    let with = |kind| LayoutConfig { kind, ..c };
    let src = layout(&ctx, c, StorageKind::Pinned);
    let dev = layout(
        &ctx,
        with(LayoutKind::LayerSeparateBlockFirst),
        StorageKind::Device,
    );
    let disk = layout(&ctx, with(LayoutKind::FullyContiguous), StorageKind::Disk);
    let dev2 = layout(&ctx, c, StorageKind::Device);
    ctx.fill(&src, &all(n), 1).unwrap();
    ctx.fill(&disk, &all(n), 3).unwrap();
    ctx.fill(&dev2, &all(n), 4).unwrap();
    let disk_before = ctx.checksum(&disk, &all(n)).unwrap();
    let dev2_before = ctx.checksum(&dev2, &all(n)).unwrap();
    let one = TransferOptions::default();
    ctx.submit(&src, &all(n), &dev, &all(n), &one)
        .unwrap()
        .wait(None)
        .unwrap();
    // KVX_TEST_GDS_BLOCKS: how many blocks move (default 24, 8 pieces each).
    let moved = std::env::var("KVX_TEST_GDS_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24u64)
        .min(n);
    let a: Vec<u64> = (0..moved).collect();
    let on_disk: Vec<u64> = a.iter().map(|b| n - 1 - b).collect();
    let on_dev2: Vec<u64> = a.iter().map(|b| (b + 5) % n).collect();
    let started = std::time::Instant::now();
    let t = match ctx.submit(&dev, &a, &disk, &on_disk, &one) {
        Ok(t) => t,
        Err(e) => {
            assert!(!require, "GDS required but refused: {e}");
            assert!(
                matches!(&e, kvxfer::Error::Unavailable(m) if m.contains("GPUDirect Storage")),
                "a GDS refusal names GDS: {e:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "refused, but slowly"
            );
            assert_eq!(ctx.checksum(&disk, &all(n)).unwrap(), disk_before);
            println!("GDS refused on this machine (checked: nothing written): {e}");
            return;
        }
    };
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlWrite));
    // A GDS transfer must end, one way or the other, not hang.
    t.wait(Some(Duration::from_secs(60))).expect("GDS write");
    let t = ctx.submit(&disk, &on_disk, &dev2, &on_dev2, &one).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlRead));
    t.wait(Some(Duration::from_secs(60))).expect("GDS read");
    assert_eq!(
        ctx.checksum(&src, &a).unwrap(),
        ctx.checksum(&dev2, &on_dev2).unwrap()
    );
    assert_guards(&ctx, &disk, &on_disk, &disk_before, "disk");
    assert_guards(&ctx, &dev2, &on_dev2, &dev2_before, "device");
    // A file cuFile cannot take on a context that can use GDS (tmpfs has no O_DIRECT): refused
    // at submit, promptly, naming GDS, with nothing written.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        let path = shm.join(format!("kvx-gds-refused-{}", std::process::id()));
        let tmpfs = ctx
            .new_layout(
                with(LayoutKind::FullyContiguous),
                &StorageSpec {
                    kind: StorageKind::Disk,
                    device_id: 0,
                    path: Some(path.clone()),
                },
            )
            .unwrap();
        ctx.fill(&tmpfs, &all(n), 8).unwrap();
        let before = ctx.checksum(&tmpfs, &all(n)).unwrap();
        let started = std::time::Instant::now();
        let e = ctx
            .submit(&dev, &a, &tmpfs, &on_disk, &one)
            .map(|_| ())
            .expect_err("GDS to a tmpfs file");
        assert!(
            matches!(&e, kvxfer::Error::Unavailable(m) if m.contains("GPUDirect Storage")),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(ctx.checksum(&tmpfs, &all(n)).unwrap(), before);
        drop(tmpfs);
        let _ = std::fs::remove_file(path);
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL: run scripts/gpu-test"]
fn head_transforms_through_the_device_disk_two_hop() {
    use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
    let ctx = ctx_disk();
    let n = 32;
    let src = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 32, 8, 0, TokenMajor),
        StorageKind::Pinned,
    );
    ctx.fill(&src, &all(n), 11).unwrap();
    // A TP 2 rank on the device (heads 4..8, HND), offloaded to disk as a TP 4 rank (heads 4..6,
    // NHD), reloaded into a TP 4 rank on the device (HND), read back to pinned memory.
    let dev = layout(
        &ctx,
        heads_cfg(LayoutKind::LayerSeparateBlockFirst, 32, 4, 4, HeadMajor),
        StorageKind::Device,
    );
    let disk = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 32, 2, 4, TokenMajor),
        StorageKind::Disk,
    );
    let dev2 = layout(
        &ctx,
        heads_cfg(LayoutKind::LayerSeparateOuterFirst, 32, 2, 4, HeadMajor),
        StorageKind::Device,
    );
    let back = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 32, 2, 4, HeadMajor),
        StorageKind::Pinned,
    );
    let rev: Vec<u64> = (0..n).rev().collect();
    let run = |s: &Layout, sb: &[u64], d: &Layout, db: &[u64]| {
        let t = ctx
            .submit(s, sb, d, db, &TransferOptions::default())
            .unwrap();
        t.wait(Some(Duration::from_secs(60))).unwrap();
        t.stats()
    };
    run(&src, &all(n), &dev, &rev);
    let st = run(&dev, &rev, &disk, &all(n));
    assert!(matches!(st.plan, Plan::TwoHop { .. }), "{:?}", st.plan);
    let st = run(&disk, &all(n), &dev2, &rev);
    assert!(matches!(st.plan, Plan::TwoHop { .. }), "{:?}", st.plan);
    run(&dev2, &rev, &back, &all(n));
    // src block b -> dev 31-b -> disk b -> dev2 31-b -> back b: heads 4..6 of every token.
    for b in 0..n {
        for l in 0..2 {
            for o in 0..2 {
                for t in 0..16 {
                    for h in 4..6 {
                        assert_eq!(
                            common::head_slice(&back, b, l, o, t, h),
                            common::head_slice(&src, b, l, o, t, h),
                            "block {b} layer {l} outer {o} token {t} head {h}"
                        );
                    }
                }
            }
        }
    }
}
