//! GPU tests of the local tiers (pinned, device, copy modes, streams).
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use std::ffi::c_void;
use std::time::Duration;

use cudarc::driver::sys;
use kvxfer::{
    CopyMode, LayoutConfig, LayoutKind, Mechanism, Plan, StorageKind, StorageSpec, Strategy,
    TransferOptions,
};

use common::all;
use common::gpu::*;

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn every_cuda_strategy_layout_kind_and_copy_mode() {
    let ctx = ctx();
    use StorageKind::*;
    let pairs = [
        (Pinned, Device, Strategy::CudaAsyncH2D),
        (Device, Pinned, Strategy::CudaAsyncD2H),
        (Device, Device, Strategy::CudaAsyncD2D),
        (System, Device, Strategy::CudaBlockingH2D),
        (Device, System, Strategy::CudaBlockingD2H),
    ];
    // 2 KiB bf16 regions (16-byte aligned) and 15-byte FP8 regions (the kernel's byte path).
    let shapes = [(16, 64, 2), (3, 5, 1)];
    for (ss, ds, strategy) in pairs {
        for sk in KINDS {
            for dk in KINDS {
                for &(page, inner, width) in &shapes {
                    let src = layout(&ctx, cfg(sk, 16, 3, page, inner, width), ss);
                    let dst = layout(&ctx, cfg(dk, 16, 3, page, inner, width), ds);
                    assert_eq!(ctx.plan(&src, &dst).unwrap(), Plan::Direct(strategy));
                    // Pageable memory's device hop (through the bounce pool) takes the copy
                    // mode too.
                    let modes = [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel];
                    for mode in modes {
                        let opts = TransferOptions {
                            copy_mode: mode,
                            ..Default::default()
                        };
                        let m = check_move(&ctx, &src, &dst, &opts);
                        match mode {
                            CopyMode::Kernel => assert_eq!(m, Mechanism::Kernel),
                            CopyMode::CopyEngine => assert_eq!(m, Mechanism::CopyEngine),
                            CopyMode::Auto => {}
                        }
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn auto_uses_the_kernel_for_small_fragments_and_engines_for_large() {
    let ctx = ctx();
    let small = cfg(LayoutKind::LayerSeparateBlockFirst, 64, 4, 16, 64, 2); // 2 KiB
    let src = layout(&ctx, small, StorageKind::Pinned);
    let dst = layout(&ctx, small, StorageKind::Device);
    let ids: Vec<u64> = (0..64).rev().collect();
    let t = ctx
        .submit(&src, &all(64), &dst, &ids, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    let s = t.stats();
    assert!(
        !s.kernel_fallback,
        "the kernel must build on a GPU machine with NVRTC"
    );
    assert_eq!(s.mechanism, Mechanism::Kernel);

    let big = cfg(LayoutKind::FullyContiguous, 8, 2, 256, 1024, 2); // 512 KiB regions
    let src = layout(&ctx, big, StorageKind::Pinned);
    let dst = layout(&ctx, big, StorageKind::Device);
    let t = ctx
        .submit(&src, &[7, 3], &dst, &[0, 1], &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(t.stats().mechanism, Mechanism::CopyEngine);
    assert_eq!(
        ctx.checksum(&src, &[7, 3]).unwrap(),
        ctx.checksum(&dst, &[0, 1]).unwrap()
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn layer_ranges_on_the_gpu() {
    let ctx = ctx();
    let c = cfg(LayoutKind::LayerSeparateOuterFirst, 8, 4, 16, 64, 2);
    let src = layout(&ctx, c, StorageKind::Pinned);
    let mid = layout(
        &ctx,
        LayoutConfig {
            kind: LayoutKind::FullyContiguous,
            ..c
        },
        StorageKind::Device,
    );
    let back = layout(&ctx, c, StorageKind::Pinned);
    for mode in [CopyMode::CopyEngine, CopyMode::Kernel] {
        ctx.fill(&src, &all(8), 5).unwrap();
        ctx.fill(&mid, &all(8), 6).unwrap();
        ctx.fill(&back, &all(8), 7).unwrap();
        let opts = TransferOptions {
            layer_begin: 1,
            layer_end: 3,
            copy_mode: mode,
            ..Default::default()
        };
        let t = ctx.submit(&src, &[2], &mid, &[5], &opts).unwrap();
        t.wait(None).unwrap();
        assert_eq!(t.stats().fragments, 2 * 2);
        let t = ctx.submit(&mid, &[5], &back, &[1], &opts).unwrap();
        t.wait(None).unwrap();
        for l in 0..4 {
            for o in 0..2 {
                let a = src.region(2, l, o).unwrap();
                let b = back.region(1, l, o).unwrap();
                // SAFETY: both are regions of live pinned host layouts.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(a.addr as *const u8, a.len as usize),
                        std::slice::from_raw_parts(b.addr as *const u8, b.len as usize),
                    )
                };
                assert_eq!(
                    a == b,
                    (1..3).contains(&l),
                    "layer {l} outer {o} with {mode:?}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn wrapped_device_and_host_memory() {
    let ctx = ctx();
    let c = cfg(LayoutKind::FullyContiguous, 32, 2, 16, 64, 2);
    let bytes = c.validate().unwrap().allocation_len;
    // A runtime's own KV pool: device memory from cuMemAlloc, host memory from malloc.
    let mut dptr = 0;
    // SAFETY: ctx made the primary context current on this thread.
    check(unsafe { sys::cuMemAlloc_v2(&mut dptr, bytes as usize) });
    let mut host = vec![0u8; bytes as usize + 4096];
    let haddr = (host.as_mut_ptr() as u64).next_multiple_of(4096);
    let dev_spec = StorageSpec {
        kind: StorageKind::Device,
        device_id: 0,
        path: None,
    };
    let pin_spec = StorageSpec::new(StorageKind::Pinned);
    let region = |addr| kvxfer::Region { addr, len: bytes };
    let dev = ctx.wrap_layout(c, &dev_spec, &[region(dptr)]).unwrap();
    let pinned = ctx.wrap_layout(c, &pin_spec, &[region(haddr)]).unwrap();
    // Outside any allocation: refused.
    assert!(
        ctx.wrap_layout(c, &dev_spec, &[region(dptr + 4096)])
            .is_err()
    );
    for mode in [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel] {
        let opts = TransferOptions {
            copy_mode: mode,
            ..Default::default()
        };
        check_move(&ctx, &pinned, &dev, &opts);
        check_move(&ctx, &dev, &pinned, &opts);
    }
    drop((dev, pinned));
    // kvxfer never frees wrapped memory: the caller still can.
    // SAFETY: allocated above, freed once.
    check(unsafe { sys::cuMemFree_v2(dptr) });
    drop(host);
}

extern "C" fn sleep_300ms(_: *mut c_void) {
    std::thread::sleep(Duration::from_millis(300));
}

extern "C" fn sleep_500ms(_: *mut c_void) {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn transfer_starts_after_work_queued_on_the_callers_stream() {
    let ctx = ctx();
    let c = cfg(LayoutKind::FullyContiguous, 16, 2, 16, 64, 2);
    for (ss, ds, mode) in [
        (StorageKind::Pinned, StorageKind::Device, CopyMode::Kernel),
        (
            StorageKind::Pinned,
            StorageKind::Device,
            CopyMode::CopyEngine,
        ),
        (StorageKind::System, StorageKind::Device, CopyMode::Auto),
        (StorageKind::Pinned, StorageKind::System, CopyMode::Auto),
    ] {
        let src = layout(&ctx, c, ss);
        let dst = layout(&ctx, c, ds);
        ctx.fill(&src, &all(16), 1).unwrap();
        let mut stream = std::ptr::null_mut();
        // SAFETY: the context is current on this thread; the stream is destroyed below.
        check(unsafe { sys::cuStreamCreate(&mut stream, 1) });
        // Long work on the caller's stream: the transfer must not start before it ends.
        let queued = std::time::Instant::now();
        // SAFETY: a host function with no captured state.
        check(unsafe { sys::cuLaunchHostFunc(stream, Some(sleep_500ms), std::ptr::null_mut()) });
        let opts = TransferOptions {
            cuda_stream: Some(stream as usize),
            copy_mode: mode,
            ..Default::default()
        };
        let t = ctx.submit(&src, &all(16), &dst, &all(16), &opts).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let early = t.poll();
        assert!(
            early.is_none(),
            "{ss}->{ds} {mode:?}: done ({early:?}, {:?}) {:?} after queueing the stream's work",
            t.stats(),
            queued.elapsed()
        );
        t.wait(Some(Duration::from_secs(30))).unwrap();
        assert!(queued.elapsed() >= Duration::from_millis(500));
        assert_eq!(
            ctx.checksum(&src, &all(16)).unwrap(),
            ctx.checksum(&dst, &all(16)).unwrap()
        );
        // SAFETY: the stream is idle now.
        check(unsafe { sys::cuStreamDestroy_v2(stream) });
    }
}

/// Two streams of the current context: `gate`, held back 300 ms by a host function, and
/// `consumer`; `destroy_streams` frees them.
fn gate_and_consumer() -> (sys::CUstream, sys::CUstream) {
    let (mut gate, mut consumer) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the context is current on this thread; the out pointers are locals.
    unsafe {
        check(sys::cuStreamCreate(&mut gate, 1));
        check(sys::cuStreamCreate(&mut consumer, 1));
        check(sys::cuLaunchHostFunc(
            gate,
            Some(sleep_300ms),
            std::ptr::null_mut(),
        ));
    }
    (gate, consumer)
}

fn destroy_streams(streams: &[sys::CUstream]) {
    for &s in streams {
        // SAFETY: a stream made by this test, idle now.
        check(unsafe { sys::cuStreamDestroy_v2(s) });
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn callers_stream_waits_for_the_transfer_without_blocking_the_host() {
    let ctx = ctx();
    let c = cfg(LayoutKind::FullyContiguous, 16, 2, 16, 64, 2);
    let src = layout(&ctx, c, StorageKind::Pinned);
    let dst = layout(&ctx, c, StorageKind::Device);
    let readback = layout(&ctx, c, StorageKind::Pinned);
    ctx.fill(&src, &all(16), 3).unwrap();
    let (gate, consumer) = gate_and_consumer();
    // The transfer is held back 300 ms by `gate`; `consumer` must wait for it.
    let opts = TransferOptions {
        cuda_stream: Some(gate as usize),
        ..Default::default()
    };
    let t = ctx.submit(&src, &all(16), &dst, &all(16), &opts).unwrap();
    let started = std::time::Instant::now();
    t.stream_wait(consumer as usize).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "stream_wait blocked the host"
    );
    let bytes = c.validate().unwrap().allocation_len as usize;
    let (d, r) = (
        dst.region(0, 0, 0).unwrap().addr,
        readback.region(0, 0, 0).unwrap().addr,
    );
    // SAFETY: both layouts hold `bytes` bytes from their first region on (FC, one allocation).
    unsafe {
        check(sys::cuMemcpyAsync(r, d, bytes, consumer));
        check(sys::cuStreamSynchronize(consumer));
    }
    assert_eq!(
        ctx.checksum(&src, &all(16)).unwrap(),
        ctx.checksum(&readback, &all(16)).unwrap()
    );
    t.wait(None).unwrap();
    destroy_streams(&[gate, consumer]);
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn a_consumer_stream_waits_for_each_layer_without_blocking_the_host() {
    // 32 pieces per layer: fewer than the default launch's warps (the stream waits for each
    // layer's event, recorded after the counters of the layers before it) and more than one
    // block's eight (the stream waits for the layer's counter itself).
    for max_sms in [0, 1] {
        consumer_stream_waits_for_each_layer(&ctx_with_sms(max_sms));
    }
}

fn consumer_stream_waits_for_each_layer(ctx: &kvxfer::Context) {
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 16, 4, 16, 64, 2);
    let src = layout(ctx, c, StorageKind::Pinned);
    let dst = layout(ctx, c, StorageKind::Device);
    let back = layout(ctx, c, StorageKind::Pinned);
    ctx.fill(&src, &all(16), 11).unwrap();
    let (gate, consumer) = gate_and_consumer();
    // Layers 1..4, held back 300 ms by `gate`; the consumer reads each layer after its wait.
    let opts = TransferOptions {
        cuda_stream: Some(gate as usize),
        layer_begin: 1,
        layer_end: 4,
        ..Default::default()
    };
    let t = ctx.submit(&src, &all(16), &dst, &all(16), &opts).unwrap();
    assert!(matches!(
        t.layer_stream_wait(0, consumer as usize),
        Err(kvxfer::Error::OutOfRange(_))
    ));
    let started = std::time::Instant::now();
    let per_layer = c.validate().unwrap().allocation_len as usize;
    for l in 1..4 {
        t.layer_stream_wait(l, consumer as usize).unwrap();
        let (d, r) = (
            dst.region(0, l, 0).unwrap().addr,
            back.region(0, l, 0).unwrap().addr,
        );
        // SAFETY: a layer-separate layout holds each layer in one allocation of `per_layer`
        // bytes that starts with block 0, outer 0.
        unsafe { check(sys::cuMemcpyAsync(r, d, per_layer, consumer)) };
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "layer_stream_wait blocked the host"
    );
    // SAFETY: the stream belongs to this context.
    unsafe { check(sys::cuStreamSynchronize(consumer)) };
    for b in 0..16 {
        for o in 0..2 {
            assert!(
                bytes(&back, b, 0, o).iter().all(|&x| x == 0),
                "layer 0 moved"
            );
            for l in 1..4 {
                assert_eq!(bytes(&back, b, l, o), bytes(&src, b, l, o), "{b} {l} {o}");
            }
        }
    }
    t.wait(None).unwrap();
    destroy_streams(&[gate, consumer]);
}

/// A caller's stream of another CUDA context than the device's primary one (where kvxfer's
/// layer counters live) waits for one layer through an event: it does not pass while the
/// transfer is held back, and passes once the layer is in place.
#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn a_stream_of_another_cuda_context_waits_for_a_layer() {
    let ctx = ctx();
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 16, 4, 16, 64, 2);
    let src = layout(&ctx, c, StorageKind::Pinned);
    let dst = layout(&ctx, c, StorageKind::Device);
    ctx.fill(&src, &all(16), 5).unwrap();
    let (gate, consumer) = gate_and_consumer();
    let (mut other_ctx, mut other, mut passed) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: out pointers are locals; the new context is pushed, used, then popped, so the
    // primary context is current again.
    unsafe {
        let mut dev = 0;
        check(sys::cuDeviceGet(&mut dev, 0));
        check(sys::cuCtxCreate_v2(&mut other_ctx, 0, dev));
        check(sys::cuStreamCreate(&mut other, 1));
        check(sys::cuEventCreate(
            &mut passed,
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
        ));
        let mut popped = std::ptr::null_mut();
        check(sys::cuCtxPopCurrent_v2(&mut popped));
    }
    // Held back 300 ms by `gate`.
    let opts = TransferOptions {
        cuda_stream: Some(gate as usize),
        ..Default::default()
    };
    let t = ctx.submit(&src, &all(16), &dst, &all(16), &opts).unwrap();
    t.layer_stream_wait(2, other as usize).unwrap();
    // SAFETY: the stream and event belong to `other_ctx`, current while they are used.
    unsafe {
        check(sys::cuCtxPushCurrent_v2(other_ctx));
        check(sys::cuEventRecord(passed, other));
        assert_eq!(
            sys::cuEventQuery(passed),
            sys::CUresult::CUDA_ERROR_NOT_READY,
            "the other context's stream passed before the layer"
        );
    }
    t.layer_wait(2, Some(Duration::from_secs(10))).unwrap();
    // SAFETY: as above.
    unsafe {
        check(sys::cuEventSynchronize(passed));
        check(sys::cuEventDestroy_v2(passed));
        check(sys::cuStreamDestroy_v2(other));
        let mut popped = std::ptr::null_mut();
        check(sys::cuCtxPopCurrent_v2(&mut popped));
        check(sys::cuCtxDestroy_v2(other_ctx));
    }
    t.wait(None).unwrap();
    destroy_streams(&[gate, consumer]);
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn lists_of_1k_to_16k_blocks() {
    let ctx = ctx();
    for blocks in [1024u64, 4096, 16384] {
        // Llama-like layer slice: 16 tokens x 8 heads x 128 x bf16 = 32 KiB regions, 1 layer.
        let c = cfg(LayoutKind::LayerSeparateBlockFirst, blocks, 1, 16, 1024, 2);
        let host = layout(&ctx, c, StorageKind::Pinned);
        let dev = layout(
            &ctx,
            LayoutConfig {
                kind: LayoutKind::LayerSeparateOuterFirst,
                ..c
            },
            StorageKind::Device,
        );
        let back = layout(&ctx, c, StorageKind::Pinned);
        ctx.fill(&host, &all(blocks), blocks).unwrap();
        let mut perm = all(blocks);
        fastrand::Rng::with_seed(blocks).shuffle(&mut perm);
        for mode in [CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel] {
            let opts = TransferOptions {
                copy_mode: mode,
                ..Default::default()
            };
            let t = ctx.submit(&host, &all(blocks), &dev, &perm, &opts).unwrap();
            t.wait(None).unwrap();
            let t = ctx.submit(&dev, &perm, &back, &all(blocks), &opts).unwrap();
            t.wait(None).unwrap();
            assert_eq!(
                ctx.checksum(&host, &all(blocks)).unwrap(),
                ctx.checksum(&back, &all(blocks)).unwrap(),
                "{blocks} blocks, {mode:?}"
            );
            ctx.fill(&back, &all(blocks), 0).unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn many_concurrent_transfers_all_complete() {
    let ctx = std::sync::Arc::new(ctx());
    let c = cfg(LayoutKind::FullyContiguous, 256, 2, 16, 64, 2);
    let src = std::sync::Arc::new(layout(&ctx, c, StorageKind::Pinned));
    let dst = std::sync::Arc::new(layout(&ctx, c, StorageKind::Device));
    ctx.fill(&src, &all(256), 9).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (ctx, src, dst) = (ctx.clone(), src.clone(), dst.clone());
            std::thread::spawn(move || {
                let ids: Vec<u64> = (t * 32..t * 32 + 32).collect();
                // Many in flight at once, then all waited: none may be lost.
                let pending: Vec<_> = (0..100)
                    .map(|_| {
                        ctx.submit(&src, &ids, &dst, &ids, &TransferOptions::default())
                            .unwrap()
                    })
                    .collect();
                for p in pending {
                    p.wait(Some(Duration::from_secs(60))).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        ctx.checksum(&src, &all(256)).unwrap(),
        ctx.checksum(&dst, &all(256)).unwrap()
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn wide_block_ids_reach_the_kernel_whole() {
    // The kernel's table holds ids in 2, 4 or 8 bytes, the narrowest that fits the layouts.
    // One-byte blocks, so that ids past u16::MAX and u32::MAX fit in device memory (4 GiB).
    let ctx = ctx();
    for hi in [1u64 << 16, 1u64 << 32] {
        let c = LayoutConfig {
            num_blocks: hi + 64,
            num_layers: 1,
            outer_dim: 1,
            page_size: 1,
            inner_dim: 1,
            dtype_width: 1,
            alignment: 1,
            kind: LayoutKind::FullyContiguous,
            heads: Default::default(),
        };
        let big = layout(&ctx, c, StorageKind::Device);
        let sb = [hi + 3, 5, hi + 60, 7, hi + 1, 13, hi + 40, 17];
        let db = [9, hi + 10, 11, hi + 61, 19, hi + 20, 23, hi + 62];
        let guards = [hi + 2, hi + 63, 8, 10, 12, 0];
        let touched: Vec<u64> = sb.iter().chain(&db).chain(&guards).copied().collect();
        ctx.fill(&big, &touched, 77).unwrap();
        let guard_before = ctx.checksum(&big, &guards).unwrap();
        let src_before = ctx.checksum(&big, &sb).unwrap();
        assert_ne!(src_before, ctx.checksum(&big, &db).unwrap());
        let opts = TransferOptions {
            copy_mode: CopyMode::Kernel,
            ..Default::default()
        };
        let t = ctx.submit(&big, &sb, &big, &db, &opts).expect("submit");
        t.wait(Some(Duration::from_secs(60))).expect("transfer");
        assert_eq!(t.stats().mechanism, Mechanism::Kernel);
        assert_eq!(
            ctx.checksum(&big, &db).unwrap(),
            src_before,
            "ids past {hi}"
        );
        assert_eq!(ctx.checksum(&big, &sb).unwrap(), src_before);
        assert_eq!(ctx.checksum(&big, &guards).unwrap(), guard_before);
    }
}

/// A context whose copy kernel may take `max_sms` SMs.
fn ctx_with_sms(max_sms: u32) -> kvxfer::Context {
    kvxfer::Context::new(kvxfer::ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::Backends::empty(),
        max_sms,
        ..Default::default()
    })
    .expect("context")
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn layers_complete_one_by_one_and_their_bytes_are_in_place() {
    // One SM: 256 MiB take several milliseconds, so that layer 0 lands long before the last.
    let ctx = ctx_with_sms(1);
    let (layers, blocks) = (32u64, 64u64);
    // 64 KiB regions: 8 MiB per layer.
    let c = cfg(
        LayoutKind::LayerSeparateBlockFirst,
        blocks,
        layers,
        32,
        1024,
        2,
    );
    let per_layer = c.validate().unwrap().allocation_len as usize;
    let host = layout(&ctx, c, StorageKind::Pinned);
    let gpu = layout(&ctx, c, StorageKind::Device);
    let back = layout(&ctx, c, StorageKind::Pinned);
    let expect = layout(&ctx, c, StorageKind::Pinned);
    let sb = all(blocks);
    let db: Vec<u64> = sb.iter().rev().copied().collect();
    // SAFETY: the context is current on this thread; the out pointer is a local.
    let consumer = {
        let mut s = std::ptr::null_mut();
        check(unsafe { sys::cuStreamCreate(&mut s, 1) });
        s
    };
    for mode in [CopyMode::Kernel, CopyMode::CopyEngine] {
        for to_device in [true, false] {
            let seed = 40 + u64::from(to_device);
            let (src, dst) = if to_device {
                (&host, &gpu)
            } else {
                (&gpu, &host)
            };
            ctx.fill(src, &sb, seed).unwrap();
            ctx.fill(&expect, &sb, seed).unwrap();
            ctx.fill(dst, &sb, 7).unwrap();
            let opts = TransferOptions {
                copy_mode: mode,
                ..Default::default()
            };
            let t = ctx.submit(src, &sb, dst, &db, &opts).unwrap();
            if to_device {
                // The engine's side: each layer read on its stream right after its wait.
                for l in 0..layers {
                    t.layer_stream_wait(l, consumer as usize).unwrap();
                    let (d, r) = (
                        gpu.region(0, l, 0).unwrap().addr,
                        back.region(0, l, 0).unwrap().addr,
                    );
                    // SAFETY: a layer-separate layout holds each layer in one allocation of
                    // `per_layer` bytes starting with block 0, outer 0.
                    unsafe { check(sys::cuMemcpyAsync(r, d, per_layer, consumer)) };
                }
            }
            t.layer_wait(0, Some(Duration::from_secs(60))).unwrap();
            let first_early = t.poll().is_none();
            for l in 0..layers {
                t.layer_wait(l, Some(Duration::from_secs(60))).unwrap();
                if !to_device {
                    // The host sees a layer's bytes as soon as its wait returns.
                    for (s, d) in sb.iter().zip(&db) {
                        for o in 0..2 {
                            assert!(
                                bytes(&host, *d, l, o) == bytes(&expect, *s, l, o),
                                "{mode:?} D2H layer {l} block {d} outer {o} not in place"
                            );
                        }
                    }
                }
            }
            t.wait(Some(Duration::from_secs(60))).unwrap();
            let stats = t.stats();
            if mode == CopyMode::Kernel {
                assert_eq!(stats.mechanism, Mechanism::Kernel);
                assert_eq!(stats.sms, 1, "max_sms = 1");
                assert!(
                    first_early,
                    "{mode:?} to_device={to_device}: layer 0 completed only with the transfer"
                );
            } else {
                assert_eq!(stats.mechanism, Mechanism::CopyEngine);
                assert_eq!(stats.sms, 0);
            }
            if to_device {
                // SAFETY: the stream belongs to this context.
                unsafe { check(sys::cuStreamSynchronize(consumer)) };
                for (s, d) in sb.iter().zip(&db) {
                    for l in 0..layers {
                        for o in 0..2 {
                            assert!(
                                bytes(&back, *d, l, o) == bytes(&expect, *s, l, o),
                                "{mode:?} H2D: the consumer read layer {l} of block {d} too early"
                            );
                        }
                    }
                }
            }
        }
    }
    destroy_streams(&[consumer]);
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn the_kernel_takes_the_sms_its_budget_allows() {
    // 4 KiB regions; 2048 pairs x 2 layers x 2 outer: more warps' work than one full wave.
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 4096, 2, 16, 128, 2);
    for max_sms in [0u32, 3] {
        let ctx = ctx_with_sms(max_sms);
        let sm_count = kvxfer::baseline::sm_count(ctx.cuda_device().unwrap());
        let [h2d, d2h, d2d] = ctx.copy_kernel_sms().expect("the copy kernel");
        if max_sms == 3 {
            assert_eq!([h2d, d2h, d2d], [3, 3, 3]);
        } else {
            assert_eq!(d2d, sm_count, "device <-> device: one full wave");
            assert!((1..sm_count).contains(&h2d) && (1..sm_count).contains(&d2h));
        }
        let pinned = layout(&ctx, c, StorageKind::Pinned);
        let a = layout(&ctx, c, StorageKind::Device);
        let b = layout(&ctx, c, StorageKind::Device);
        let opts = TransferOptions {
            copy_mode: CopyMode::Kernel,
            ..Default::default()
        };
        for (src, dst, what) in [(&pinned, &a, "H2D"), (&a, &pinned, "D2H"), (&a, &b, "D2D")] {
            let stats = check_move_stats(&ctx, src, dst, &opts);
            assert_eq!(stats.mechanism, Mechanism::Kernel, "{what}");
            assert!(stats.sms >= 1, "{what}: {} SMs", stats.sms);
            match (max_sms, what) {
                // One full wave on every SM (the transfer has more warps' work than that).
                (0, "D2D") => assert_eq!(stats.sms, sm_count, "D2D takes every SM"),
                // The link needs a few SMs, not all of them.
                (0, _) => assert!(stats.sms < sm_count, "{what}: {} SMs", stats.sms),
                (3, "D2D") => assert_eq!(stats.sms, 3, "D2D under max_sms = 3"),
                _ => assert!(stats.sms <= 3, "{what}: {} SMs over max_sms = 3", stats.sms),
            }
        }
    }
}

/// A layout of 16 blocks, 3 layers, 16 tokens, heads of 128 bf16, holding `n` heads from
/// `begin` in `order`.
fn heads_layout(
    ctx: &kvxfer::Context,
    kind: LayoutKind,
    (n, begin, order): (u32, u32, kvxfer::HeadOrder),
    storage: StorageKind,
) -> kvxfer::Layout {
    let c = LayoutConfig {
        num_blocks: 16,
        num_layers: 3,
        outer_dim: 2,
        page_size: 16,
        inner_dim: u64::from(n) * 128,
        dtype_width: 2,
        alignment: 256,
        kind,
        heads: kvxfer::Heads {
            num_heads: n,
            head_begin: begin,
            order,
        },
    };
    layout(ctx, c, storage)
}

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn head_transforms_on_every_gpu_direction_and_copy_mode() {
    use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
    let ctx = ctx();
    let all: Vec<u64> = (0..16).collect();
    let rev: Vec<u64> = (0..16).rev().collect();
    for mode in [CopyMode::Auto, CopyMode::Kernel, CopyMode::CopyEngine] {
        let opts = TransferOptions {
            copy_mode: mode,
            ..Default::default()
        };
        // TP 1 (pinned, NHD) -> TP 2 rank 1 (device, HND, heads 4..8), ids reversed.
        let full = heads_layout(
            &ctx,
            LayoutKind::FullyContiguous,
            (8, 0, TokenMajor),
            StorageKind::Pinned,
        );
        ctx.fill(&full, &all, 21).unwrap();
        let rank = heads_layout(
            &ctx,
            LayoutKind::LayerSeparateBlockFirst,
            (4, 4, HeadMajor),
            StorageKind::Device,
        );
        let t = ctx.submit(&full, &all, &rank, &rev, &opts).unwrap();
        t.wait(None).unwrap();
        // Pieces of one head of one token: the kernel moves them in every mode (copy engines
        // would take microseconds per piece), and stats say so.
        assert_eq!(t.stats().mechanism, Mechanism::Kernel, "{mode:?}");
        assert_eq!(t.stats().bytes, 16 * 3 * 2 * 16 * 4 * 256);
        // D2D: TP 2 rank 1 -> TP 4 rank 2 (heads 4..6, NHD), layers 1..3.
        let quarter = heads_layout(
            &ctx,
            LayoutKind::LayerSeparateOuterFirst,
            (2, 4, TokenMajor),
            StorageKind::Device,
        );
        let opts_layers = TransferOptions {
            layer_begin: 1,
            layer_end: 3,
            ..opts.clone()
        };
        ctx.submit(&rank, &rev, &quarter, &all, &opts_layers)
            .unwrap()
            .wait(None)
            .unwrap();
        // D2H: both back to pinned layouts of the same heads and order (regions whole).
        let rank_back = heads_layout(
            &ctx,
            LayoutKind::FullyContiguous,
            (4, 4, HeadMajor),
            StorageKind::Pinned,
        );
        let quarter_back = heads_layout(
            &ctx,
            LayoutKind::FullyContiguous,
            (2, 4, TokenMajor),
            StorageKind::Pinned,
        );
        ctx.fill(&quarter_back, &all, 3).unwrap();
        ctx.submit(&rank, &all, &rank_back, &all, &opts)
            .unwrap()
            .wait(None)
            .unwrap();
        let s = ctx
            .submit(&quarter, &all, &quarter_back, &all, &opts_layers)
            .unwrap();
        s.wait(None).unwrap();
        for b in 0..16u64 {
            for l in 0..3 {
                for o in 0..2 {
                    for t in 0..16 {
                        for h in 4..8 {
                            assert_eq!(
                                common::head_slice(&rank_back, 15 - b, l, o, t, h),
                                common::head_slice(&full, b, l, o, t, h),
                                "{mode:?} H2D block {b} layer {l} outer {o} token {t} head {h}"
                            );
                        }
                        if l >= 1 {
                            for h in 4..6 {
                                assert_eq!(
                                    common::head_slice(&quarter_back, b, l, o, t, h),
                                    common::head_slice(&full, b, l, o, t, h),
                                    "{mode:?} D2D block {b} layer {l} outer {o} token {t} head {h}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
