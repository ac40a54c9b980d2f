//! Host transfers through the core API on real memory: every layout-kind pair, both host
//! tiers, permuted ids, layer ranges, refusals that write nothing, many threads.

use std::sync::Arc;
use std::time::Duration;

use kvxfer::{
    Context, ContextConfig, Error, Layout, LayoutConfig, LayoutKind, Plan, StorageKind,
    StorageSpec, Strategy, TransferOptions,
};

fn ctx() -> Context {
    Context::new(ContextConfig {
        worker_threads: 3,
        nixl_backends: kvxfer::Backends::empty(), // host transfers need no NIXL
        ..Default::default()
    })
    .unwrap()
}

fn config(kind: LayoutKind, blocks: u64, layers: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim: 2,
        page_size: 4,
        inner_dim: 32,
        dtype_width: 2,
        alignment: 256,
        kind,
        heads: Default::default(),
    }
}

fn layout(ctx: &Context, kind: LayoutKind, storage: StorageKind, blocks: u64) -> Layout {
    ctx.new_layout(config(kind, blocks, 3), &StorageSpec::new(storage))
        .unwrap()
}

fn ids(n: u64) -> Vec<u64> {
    (0..n).collect()
}

#[test]
fn every_layout_pair_and_host_tier_moves_exact_bytes() {
    let ctx = ctx();
    for sk in LayoutKind::ALL {
        for dk in LayoutKind::ALL {
            for (ss, ds) in [
                (StorageKind::System, StorageKind::Pinned),
                (StorageKind::Pinned, StorageKind::System),
            ] {
                let src = layout(&ctx, sk, ss, 16);
                let dst = layout(&ctx, dk, ds, 20);
                ctx.fill(&src, &ids(16), 42).unwrap();
                ctx.fill(&dst, &ids(20), 7).unwrap();
                let guard_before = ctx.checksum(&dst, &ids(20)).unwrap();
                // Reversed and shifted ids: src i -> dst 17 - i for i in 2..10.
                let sb: Vec<u64> = (2..10).collect();
                let db: Vec<u64> = sb.iter().map(|i| 17 - i).collect();
                let t = ctx
                    .submit(&src, &sb, &dst, &db, &TransferOptions::default())
                    .unwrap();
                t.wait(None).unwrap();
                let s = t.stats();
                assert_eq!(s.plan, Plan::Direct(Strategy::Memcpy));
                assert_eq!(s.fragments, 8 * 3 * 2);
                assert_eq!(s.bytes, 8 * 3 * 2 * 256);
                assert_eq!(
                    ctx.checksum(&src, &sb).unwrap(),
                    ctx.checksum(&dst, &db).unwrap(),
                    "{sk:?} -> {dk:?}"
                );
                // Every block that was not a destination is untouched.
                let after = ctx.checksum(&dst, &ids(20)).unwrap();
                for b in 0..20u64 {
                    if !db.contains(&b) {
                        assert_eq!(after[b as usize], guard_before[b as usize], "guard {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn checksums_agree_across_layout_kinds_for_equal_content() {
    let ctx = ctx();
    let sums: Vec<Vec<u64>> = LayoutKind::ALL
        .iter()
        .map(|&k| {
            let l = layout(&ctx, k, StorageKind::System, 4);
            ctx.fill(&l, &ids(4), 99).unwrap();
            ctx.checksum(&l, &ids(4)).unwrap()
        })
        .collect();
    assert_eq!(sums[0], sums[1]);
    assert_eq!(sums[0], sums[2]);
    let mut distinct = sums[0].clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "different blocks must differ");
}

#[test]
fn layer_range_moves_only_those_layers() {
    let ctx = ctx();
    let src = layout(&ctx, LayoutKind::FullyContiguous, StorageKind::System, 4);
    let dst = layout(
        &ctx,
        LayoutKind::LayerSeparateOuterFirst,
        StorageKind::System,
        4,
    );
    ctx.fill(&src, &ids(4), 1).unwrap();
    let opts = TransferOptions {
        layer_begin: 1,
        layer_end: 2,
        ..Default::default()
    };
    let t = ctx.submit(&src, &[3], &dst, &[0], &opts).unwrap();
    t.wait(None).unwrap();
    assert_eq!(t.stats().fragments, 2);
    for l in 0..3 {
        for o in 0..2 {
            let a = src.region(3, l, o).unwrap();
            let b = dst.region(0, l, o).unwrap();
            // SAFETY: both regions lie in live host memory of these layouts.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(a.addr as *const u8, a.len as usize),
                    std::slice::from_raw_parts(b.addr as *const u8, b.len as usize),
                )
            };
            if l == 1 {
                assert_eq!(a, b);
            } else {
                assert!(b.iter().all(|&x| x == 0), "layer {l} must stay zero");
            }
        }
    }
}

#[test]
fn each_layer_of_a_transfer_can_be_waited_for() {
    // Without CUDA, also on a GPU machine: stream waits are then refused.
    let ctx = Context::new(ContextConfig {
        worker_threads: 2,
        nixl_backends: kvxfer::Backends::empty(),
        cuda_device: -1,
        ..Default::default()
    })
    .unwrap();
    let src = layout(
        &ctx,
        LayoutKind::LayerSeparateBlockFirst,
        StorageKind::System,
        8,
    );
    let dst = layout(&ctx, LayoutKind::FullyContiguous, StorageKind::Pinned, 8);
    ctx.fill(&src, &ids(8), 5).unwrap();
    let opts = TransferOptions {
        layer_begin: 1,
        layer_end: 3,
        ..Default::default()
    };
    let t = ctx
        .submit(&src, &[7, 2, 5], &dst, &[0, 1, 2], &opts)
        .unwrap();
    // A layer the transfer does not move is refused before anything waits.
    for l in [0, 3, u64::MAX] {
        assert!(
            matches!(t.layer_wait(l, None), Err(Error::OutOfRange(_))),
            "layer {l}"
        );
        assert!(matches!(
            t.layer_stream_wait(l, 1),
            Err(Error::OutOfRange(_))
        ));
    }
    for l in 1..3 {
        t.layer_wait(l, Some(Duration::from_secs(10))).unwrap();
        // Once its wait returns, the layer's bytes are in place.
        for (s, d) in [(7, 0), (2, 1), (5, 2)] {
            for o in 0..2 {
                let a = src.region(s, l, o).unwrap();
                let b = dst.region(d, l, o).unwrap();
                // SAFETY: both regions lie in live host memory of these layouts.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(a.addr as *const u8, a.len as usize),
                        std::slice::from_raw_parts(b.addr as *const u8, b.len as usize),
                    )
                };
                assert_eq!(a, b, "block {s} -> {d}, layer {l}, outer {o}");
            }
        }
    }
    // A context without CUDA cannot order a stream, for a layer as for the whole transfer.
    assert!(matches!(
        t.layer_stream_wait(1, 1),
        Err(Error::Unavailable(_))
    ));
    t.wait(None).unwrap();
}

#[test]
fn refused_requests_write_nothing() {
    let ctx = ctx();
    let src = layout(&ctx, LayoutKind::FullyContiguous, StorageKind::System, 8);
    let dst = layout(
        &ctx,
        LayoutKind::LayerSeparateBlockFirst,
        StorageKind::System,
        8,
    );
    ctx.fill(&src, &ids(8), 5).unwrap();
    ctx.fill(&dst, &ids(8), 6).unwrap();
    let before = ctx.checksum(&dst, &ids(8)).unwrap();
    let o = TransferOptions::default();
    let cases: Vec<(Vec<u64>, Vec<u64>, TransferOptions)> = vec![
        (vec![0, 1, 8], vec![0, 1, 2], o.clone()), // source id out of range, last
        (vec![0, 1, 2], vec![0, 1, 9], o.clone()), // destination out of range, last
        (vec![0, 1, 2], vec![4, 5, 4], o.clone()), // duplicate destination
        (
            vec![0],
            vec![0],
            TransferOptions {
                layer_end: 4,
                ..o.clone()
            },
        ),
        (
            vec![0],
            vec![0],
            TransferOptions {
                notify: Some(b"x".to_vec()),
                ..o.clone()
            },
        ),
    ];
    for (sb, db, opts) in cases {
        assert!(
            ctx.submit(&src, &sb, &dst, &db, &opts).is_err(),
            "{sb:?} {db:?}"
        );
    }
    let other_shape = ctx
        .new_layout(
            LayoutConfig {
                inner_dim: 64,
                ..config(LayoutKind::FullyContiguous, 8, 3)
            },
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    assert!(matches!(
        ctx.submit(&src, &[0], &other_shape, &[0], &o),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ctx.submit(&dst, &[1, 2], &dst, &[2, 3], &o),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(ctx.checksum(&dst, &ids(8)).unwrap(), before);
}

#[test]
fn layouts_of_another_context_are_refused() {
    let (a, b) = (ctx(), ctx());
    let la = layout(&a, LayoutKind::FullyContiguous, StorageKind::System, 2);
    let lb = layout(&b, LayoutKind::FullyContiguous, StorageKind::System, 2);
    let e = a
        .submit(&la, &[0], &lb, &[0], &TransferOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(m) if m.contains("another context")));
}

#[test]
fn device_storage_needs_a_gpu_and_disk_needs_nixl() {
    let ctx = ctx();
    let c = config(LayoutKind::FullyContiguous, 2, 1);
    let device = ctx.new_layout(c, &StorageSpec::new(StorageKind::Device));
    if kvxfer::device_count().is_ok() {
        assert!(ctx.has_cuda());
        device.expect("a machine with a GPU makes device layouts");
    } else {
        assert!(!ctx.has_cuda());
        assert!(matches!(device, Err(Error::Unavailable(m)) if m.contains("CUDA")));
    }
    let disk = ctx.new_layout(c, &StorageSpec::new(StorageKind::Disk));
    assert!(matches!(disk, Err(Error::Unavailable(m)) if m.contains("NIXL")));
}

#[test]
fn large_transfer_is_split_and_coalesced() {
    let ctx = ctx();
    let cfg = LayoutConfig {
        num_blocks: 64,
        num_layers: 4,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 1024,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    }; // 32 KiB regions, 256 KiB blocks, 16 MiB in all
    let sys = StorageSpec::new(StorageKind::System);
    let src = ctx.new_layout(cfg, &sys).unwrap();
    let dst = ctx.new_layout(cfg, &sys).unwrap();
    ctx.fill(&src, &ids(64), 3).unwrap();
    let t = ctx
        .submit(&src, &ids(64), &dst, &ids(64), &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(
        t.stats().copies,
        1,
        "consecutive FC blocks coalesce into one copy"
    );
    assert_eq!(
        ctx.checksum(&src, &ids(64)).unwrap(),
        ctx.checksum(&dst, &ids(64)).unwrap()
    );
}

#[test]
fn many_threads_share_a_context_and_layouts() {
    let ctx = Arc::new(ctx());
    let src = Arc::new(layout(
        &ctx,
        LayoutKind::FullyContiguous,
        StorageKind::Pinned,
        64,
    ));
    let dst = Arc::new(layout(
        &ctx,
        LayoutKind::LayerSeparateBlockFirst,
        StorageKind::System,
        64,
    ));
    ctx.fill(&src, &ids(64), 11).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (ctx, src, dst) = (ctx.clone(), src.clone(), dst.clone());
            std::thread::spawn(move || {
                // Each thread owns 8 destination blocks; 50 rounds of submit + wait.
                let sb: Vec<u64> = (0..8).map(|i| (t * 8 + i + 5) % 64).collect();
                let db: Vec<u64> = (0..8).map(|i| t * 8 + i).collect();
                for _ in 0..50 {
                    let tr = ctx
                        .submit(&src, &sb, &dst, &db, &TransferOptions::default())
                        .unwrap();
                    tr.wait(Some(Duration::from_secs(60))).unwrap();
                }
                assert_eq!(
                    ctx.checksum(&src, &sb).unwrap(),
                    ctx.checksum(&dst, &db).unwrap()
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn objects_can_be_dropped_in_any_order() {
    let ctx = ctx();
    let src = layout(&ctx, LayoutKind::FullyContiguous, StorageKind::System, 256);
    let dst = layout(&ctx, LayoutKind::FullyContiguous, StorageKind::System, 256);
    let t = ctx
        .submit(
            &src,
            &ids(256),
            &dst,
            &ids(256),
            &TransferOptions::default(),
        )
        .unwrap();
    drop(src);
    drop(dst);
    drop(ctx);
    t.wait(None).unwrap();
    drop(t);
}

#[test]
fn allow_gds_without_a_gds_backend_is_refused_when_the_context_is_made() {
    let e = Context::new(ContextConfig {
        nixl_backends: kvxfer::Backends::POSIX,
        capabilities: kvxfer::Capabilities {
            allow_gds: true,
            allow_gpu_rdma: false,
        },
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("GDS")),
        "{e:?}"
    );
    // Without NIXL the planner can still be asked what allow_gds would do.
    let ctx = Context::new(ContextConfig {
        nixl_backends: kvxfer::Backends::empty(),
        capabilities: kvxfer::Capabilities {
            allow_gds: true,
            allow_gpu_rdma: false,
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        ctx.plan_locations(
            kvxfer::Location {
                kind: StorageKind::Device,
                remote: false
            },
            kvxfer::Location {
                kind: StorageKind::Disk,
                remote: false
            }
        )
        .unwrap(),
        Plan::Direct(Strategy::NixlWrite)
    );
}
