//! GPU tests of device memory of a peer process through GPU RDMA.
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use common::gpu::*;

/// A peer context of this process with NIXL's UCX backend and no GPU work of its own.
fn host_exporter() -> kvxfer::Context {
    kvxfer::Context::new(kvxfer::ContextConfig {
        nixl_backends: kvxfer::Backends::UCX,
        ..Default::default()
    })
    .expect("a context with NIXL's UCX backend")
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn gpu_rdma_between_two_processes_moves_device_blocks_both_ways() {
    gpu_rdma_between_processes(
        "gpu_rdma_between_two_processes_moves_device_blocks_both_ways",
        0,
    );
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn head_transforms_between_device_memory_and_a_peer_go_through_the_bounce_pool() {
    use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
    use kvxfer::{LayoutKind, StorageKind, StorageSpec, TransferOptions};
    let exporter = host_exporter();
    let ctx = rdma_ctx(0);
    let all = common::all(8);
    // The peer's TP 2 rank (heads 0..4, HND) in host memory; this side's TP 4 rank (heads 2..4,
    // NHD) on the device, filled from a pinned copy.
    let pool = exporter
        .new_layout(
            heads_cfg(LayoutKind::FullyContiguous, 8, 4, 0, HeadMajor),
            &StorageSpec::new(StorageKind::Pinned),
        )
        .unwrap();
    exporter.fill(&pool, &all, 1).unwrap();
    let peer = ctx.import(&exporter.export(&[&pool]).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    let src = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 8, 2, 2, TokenMajor),
        StorageKind::Pinned,
    );
    ctx.fill(&src, &all, 2).unwrap();
    let dev = layout(
        &ctx,
        heads_cfg(LayoutKind::LayerSeparateBlockFirst, 8, 2, 2, TokenMajor),
        StorageKind::Device,
    );
    let opts = TransferOptions::default();
    ctx.submit(&src, &all, &dev, &all, &opts)
        .unwrap()
        .wait(None)
        .unwrap();
    let (sb, db) = ([0u64, 5, 7], [6u64, 1, 3]);
    let t = ctx.submit(&dev, &sb, remote, &db, &opts).unwrap();
    t.wait(Some(std::time::Duration::from_secs(60))).unwrap();
    assert!(t.stats().bounced, "staged through the bounce pool");
    // Read the same heads back into another device rank, then to pinned memory to look.
    let dev2 = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 8, 2, 2, HeadMajor),
        StorageKind::Device,
    );
    let t = ctx.submit(remote, &db, &dev2, &sb, &opts).unwrap();
    t.wait(Some(std::time::Duration::from_secs(60))).unwrap();
    assert!(t.stats().bounced);
    let back = layout(
        &ctx,
        heads_cfg(LayoutKind::FullyContiguous, 8, 2, 2, HeadMajor),
        StorageKind::Pinned,
    );
    ctx.submit(&dev2, &all, &back, &all, &opts)
        .unwrap()
        .wait(None)
        .unwrap();
    for (&s, &d) in sb.iter().zip(&db) {
        for l in 0..2 {
            for o in 0..2 {
                for tok in 0..16 {
                    for h in 2..4 {
                        let want = common::head_slice(&src, s, l, o, tok, h);
                        assert_eq!(common::head_slice(&pool, d, l, o, tok, h), want, "write");
                        assert_eq!(common::head_slice(&back, s, l, o, tok, h), want, "read");
                    }
                }
            }
        }
    }
}

/// A transfer to a peer's host layout that goes through its landing arena answers
/// `stream_wait` on a context with CUDA like any other peer transfer (waited for on the host:
/// its work is host copies and NIXL requests).
#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn an_aggregated_peer_transfer_answers_stream_wait() {
    use kvxfer::{LayoutKind, StorageKind, StorageSpec};
    let exporter = host_exporter();
    let ctx = rdma_ctx(0);
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 12, 4, 16, 128, 2); // 4 KiB pieces
    let spec = StorageSpec::new(StorageKind::System);
    let pool = exporter.new_layout(c, &spec).unwrap();
    let peer = ctx.import(&exporter.export(&[&pool]).unwrap()).unwrap();
    let src = ctx.new_layout(c, &spec).unwrap();
    ctx.fill(&src, &common::all(12), 4).unwrap();
    let rev: Vec<u64> = (0..12).rev().collect();
    let t = ctx
        .submit(
            &src,
            &common::all(12),
            &peer.layouts()[0],
            &rev,
            &Default::default(),
        )
        .unwrap();
    // The default stream: the host waits for the transfer, the stream has nothing to wait on.
    t.stream_wait(0).unwrap();
    assert!(t.stats().bounced, "through the landing arena");
    assert_eq!(
        exporter.checksum(&pool, &rev).unwrap(),
        ctx.checksum(&src, &common::all(12)).unwrap()
    );
}

extern "C" fn sleep_500ms(_: *mut std::ffi::c_void) {
    std::thread::sleep(std::time::Duration::from_millis(500));
}

/// `cuda_stream` holds back transfers to and from peers too: per piece (1 MiB pieces), through
/// the peer's landing arena (4 KiB pieces), writes and reads. An engine that writes KV blocks
/// on its stream and submits their transfer with that stream must never send stale bytes.
#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn peer_transfers_start_after_work_queued_on_the_callers_stream() {
    use cudarc::driver::sys;
    use kvxfer::{LayoutKind, StorageKind, StorageSpec, TransferOptions};
    use std::time::{Duration, Instant};
    let exporter = host_exporter();
    let ctx = rdma_ctx(0);
    let spec = StorageSpec::new(StorageKind::System);
    let ids = common::all(8);
    let rev: Vec<u64> = ids.iter().rev().copied().collect();
    for (what, c, aggregated) in [
        (
            "4 KiB pieces",
            cfg(LayoutKind::LayerSeparateBlockFirst, 8, 4, 16, 128, 2),
            true,
        ),
        (
            "1 MiB pieces",
            cfg(LayoutKind::FullyContiguous, 8, 1, 16, 16384, 2),
            false,
        ),
    ] {
        let pool = exporter.new_layout(c, &spec).unwrap();
        let peer = ctx.import(&exporter.export(&[&pool]).unwrap()).unwrap();
        let (src, back) = (
            ctx.new_layout(c, &spec).unwrap(),
            ctx.new_layout(c, &spec).unwrap(),
        );
        ctx.fill(&src, &ids, 8).unwrap();
        for write in [true, false] {
            let mut stream = std::ptr::null_mut();
            // SAFETY: the context is current on this thread; the stream is destroyed below.
            check(unsafe { sys::cuStreamCreate(&mut stream, 1) });
            let queued = Instant::now();
            // SAFETY: a host function with no captured state.
            check(unsafe {
                sys::cuLaunchHostFunc(stream, Some(sleep_500ms), std::ptr::null_mut())
            });
            let opts = TransferOptions {
                cuda_stream: Some(stream as usize),
                ..Default::default()
            };
            let t = match write {
                true => ctx.submit(&src, &ids, &peer.layouts()[0], &rev, &opts),
                false => ctx.submit(&peer.layouts()[0], &rev, &back, &ids, &opts),
            }
            .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                t.poll().is_none(),
                "{what}, write {write}: done before the stream's work"
            );
            t.wait(Some(Duration::from_secs(30))).unwrap();
            assert!(
                queued.elapsed() >= Duration::from_millis(500),
                "{what}, write {write}"
            );
            assert_eq!(t.stats().bounced, aggregated, "{what}, write {write}");
            // SAFETY: the stream is idle now.
            check(unsafe { sys::cuStreamDestroy_v2(stream) });
        }
        assert_eq!(
            exporter.checksum(&pool, &rev).unwrap(),
            ctx.checksum(&src, &ids).unwrap()
        );
        assert_eq!(
            ctx.checksum(&back, &ids).unwrap(),
            ctx.checksum(&src, &ids).unwrap()
        );
    }
}
