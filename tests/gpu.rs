//! GPU tests. They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo
//! lists them as ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

use std::ffi::c_void;
use std::time::Duration;

use cudarc::driver::sys;
use kvxfer::{
    Context, ContextConfig, CopyMode, Layout, LayoutConfig, LayoutKind, Plan, StorageKind,
    StorageSpec, Strategy, TransferOptions, transfer::Mechanism,
};

fn ctx() -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: 0,
        ..Default::default()
    })
    .expect("context");
    assert!(c.has_cuda(), "these tests need a CUDA GPU and driver");
    c
}

fn cfg(
    kind: LayoutKind,
    blocks: u64,
    layers: u64,
    page: u64,
    inner: u64,
    width: u32,
) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim: 2,
        page_size: page,
        inner_dim: inner,
        dtype_width: width,
        alignment: 1,
        kind,
    }
}

fn layout(ctx: &Context, c: LayoutConfig, storage: StorageKind) -> Layout {
    ctx.new_layout(c, &StorageSpec::new(storage))
        .expect("layout")
}

fn all(n: u64) -> Vec<u64> {
    (0..n).collect()
}

/// Moves reversed, interleaved ids and checks the moved blocks and the untouched guards.
fn check_move(ctx: &Context, src: &Layout, dst: &Layout, opts: &TransferOptions) -> Mechanism {
    let n = src.config().num_blocks;
    ctx.fill(src, &all(n), 11).unwrap();
    ctx.fill(dst, &all(n), 22).unwrap();
    let before = ctx.checksum(dst, &all(n)).unwrap();
    let sb: Vec<u64> = (0..n / 2).map(|i| 2 * i).collect();
    let db: Vec<u64> = (0..n / 2).map(|i| n - 1 - 2 * i).collect();
    let t = ctx.submit(src, &sb, dst, &db, opts).expect("submit");
    t.wait(Some(Duration::from_secs(60))).expect("transfer");
    let layers = opts.layer_begin..if opts.layer_end == 0 {
        src.config().num_layers
    } else {
        opts.layer_end
    };
    if layers == (0..src.config().num_layers) {
        assert_eq!(
            ctx.checksum(src, &sb).unwrap(),
            ctx.checksum(dst, &db).unwrap()
        );
    }
    let after = ctx.checksum(dst, &all(n)).unwrap();
    for b in 0..n {
        if !db.contains(&b) {
            assert_eq!(
                after[b as usize], before[b as usize],
                "guard block {b} changed"
            );
        }
    }
    t.stats().mechanism
}

const KINDS: [LayoutKind; 3] = LayoutKind::ALL;

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
        let async_ = !matches!(
            strategy,
            Strategy::CudaBlockingH2D | Strategy::CudaBlockingD2H
        );
        for sk in KINDS {
            for dk in KINDS {
                for &(page, inner, width) in &shapes {
                    let src = layout(&ctx, cfg(sk, 16, 3, page, inner, width), ss);
                    let dst = layout(&ctx, cfg(dk, 16, 3, page, inner, width), ds);
                    assert_eq!(ctx.plan(&src, &dst).unwrap(), Plan::Direct(strategy));
                    let modes: &[CopyMode] = if async_ {
                        &[CopyMode::Auto, CopyMode::CopyEngine, CopyMode::Kernel]
                    } else {
                        &[CopyMode::Auto]
                    };
                    for &mode in modes {
                        let opts = TransferOptions {
                            copy_mode: mode,
                            ..Default::default()
                        };
                        let m = check_move(&ctx, &src, &dst, &opts);
                        match mode {
                            CopyMode::Kernel => assert_eq!(m, Mechanism::Kernel),
                            CopyMode::CopyEngine => assert_eq!(m, Mechanism::CopyEngine),
                            CopyMode::Auto if !async_ => assert_eq!(m, Mechanism::CopyEngine),
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

fn check(r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
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
    let region = |addr| kvxfer::memory::Region { addr, len: bytes };
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

#[test]
#[ignore = "needs a CUDA GPU: run scripts/gpu-test"]
fn callers_stream_waits_for_the_transfer_without_blocking_the_host() {
    let ctx = ctx();
    let c = cfg(LayoutKind::FullyContiguous, 16, 2, 16, 64, 2);
    let src = layout(&ctx, c, StorageKind::Pinned);
    let dst = layout(&ctx, c, StorageKind::Device);
    let readback = layout(&ctx, c, StorageKind::Pinned);
    ctx.fill(&src, &all(16), 3).unwrap();
    let (mut gate, mut consumer) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the context is current on this thread; both streams are destroyed below.
    unsafe {
        check(sys::cuStreamCreate(&mut gate, 1));
        check(sys::cuStreamCreate(&mut consumer, 1));
        check(sys::cuLaunchHostFunc(
            gate,
            Some(sleep_300ms),
            std::ptr::null_mut(),
        ));
    }
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
    // SAFETY: idle streams.
    unsafe {
        check(sys::cuStreamDestroy_v2(gate));
        check(sys::cuStreamDestroy_v2(consumer));
    }
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

/// A context with CUDA and NIXL's POSIX backend. The GPU run carries NIXL (scripts/gpu-test):
/// without it these tests fail, they never pass untested.
fn ctx_disk() -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::ffi::context::KVX_BACKEND_POSIX,
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

/// Bytes of (block, layer, outer) of a pinned layout.
fn bytes(l: &Layout, b: u64, layer: u64, o: u64) -> Vec<u8> {
    let r = l.region(b, layer, o).unwrap();
    // SAFETY: a region of a live pinned host layout.
    unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len as usize) }.to_vec()
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
        Ok("GDS_MT") => kvxfer::ffi::context::KVX_BACKEND_GDS_MT,
        _ => kvxfer::ffi::context::KVX_BACKEND_GDS,
    };
    let require = std::env::var_os("KVX_REQUIRE_GDS").is_some_and(|v| v == "1");
    let made = std::time::Instant::now();
    let ctx = match Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::ffi::context::KVX_BACKEND_POSIX | gds,
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

const RDMA_ROLE: &str = "KVX_TEST_GPU_RDMA_SERVER";
const RDMA_DEVICE: &str = "KVX_TEST_GPU_RDMA_DEVICE";

fn rdma_ctx(device: i32) -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 2,
        cuda_device: device,
        nixl_backends: kvxfer::ffi::context::KVX_BACKEND_UCX,
        capabilities: kvxfer::Capabilities {
            allow_gds: false,
            allow_gpu_rdma: true,
        },
        ..Default::default()
    })
    .expect("a context with NIXL's UCX backend (set KVX_NIXL_LIB_DIR)");
    assert!(c.has_cuda(), "these tests need a CUDA GPU and driver");
    c
}

fn wait_for(path: &std::path::Path, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server process of the GPU RDMA test: exports a filled device layout, waits for the
/// client's notification, then reports checksums of the blocks the client wrote.
fn gpu_rdma_server(dir: &std::path::Path, device: i32) {
    let ctx = rdma_ctx(device);
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 12, 4, 16, 128, 2);
    let pool = layout_on(&ctx, c, device);
    ctx.fill(&pool, &all(12), 42).unwrap();
    let tmp = dir.join("server.peer.tmp");
    std::fs::write(&tmp, ctx.export(&[&pool]).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("server.peer")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let msg = loop {
        if let Some(m) = ctx.next_notification(|_, m| Ok(m.to_vec())).unwrap() {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no notification");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(msg, b"wrote 0..6");
    let sums = ctx.checksum(&pool, &(0..6).collect::<Vec<_>>()).unwrap();
    let text: Vec<String> = sums.iter().map(|s| s.to_string()).collect();
    std::fs::write(dir.join("server.sums"), text.join(",")).unwrap();
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
#[ignore = "needs two CUDA GPUs and NIXL's UCX backend: run scripts/gpu-test on a two-GPU machine"]
fn two_gpus_rdma_between_processes_on_their_own_gpus() {
    gpu_rdma_between_processes("two_gpus_rdma_between_processes_on_their_own_gpus", 1);
}

/// Both halves of a GPU RDMA test: run as a test it is the client on device 0 and starts
/// itself again (`test`, with RDMA_ROLE naming the folder they share) as the server on
/// `server_device`.
fn gpu_rdma_between_processes(test: &str, server_device: i32) {
    if let Some(dir) = std::env::var_os(RDMA_ROLE) {
        let device = std::env::var(RDMA_DEVICE)
            .ok()
            .and_then(|d| d.parse().ok())
            .expect("the server's device");
        gpu_rdma_server(std::path::Path::new(&dir), device);
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvx-gpu-rdma-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--include-ignored", "--test-threads=1"])
        .env(RDMA_ROLE, &dir)
        .env(RDMA_DEVICE, server_device.to_string())
        .spawn()
        .unwrap();
    let peer_file = dir.join("server.peer");
    wait_for(&peer_file, "the server's export");
    let ctx = rdma_ctx(0);
    let peer = ctx.import(&std::fs::read(&peer_file).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    assert_eq!(remote.storage_kind(), StorageKind::Device);
    assert_eq!(remote.memory().device_id(), server_device);
    let c = cfg(LayoutKind::LayerSeparateOuterFirst, 12, 4, 16, 128, 2);
    let mine = layout(&ctx, c, StorageKind::Device);
    ctx.fill(&mine, &all(12), 7).unwrap();
    let back = layout(&ctx, c, StorageKind::Device);
    // Remote device -> local device (NixlReadFlipped), checked against the server's seed.
    let theirs: Vec<u64> = (6..12).collect();
    let t = ctx
        .submit(remote, &theirs, &back, &theirs, &TransferOptions::default())
        .unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlReadFlipped));
    t.wait(Some(Duration::from_secs(30))).unwrap();
    let expected = layout(&ctx, c, StorageKind::Pinned);
    ctx.fill(&expected, &theirs, 42).unwrap();
    assert_eq!(
        ctx.checksum(&back, &theirs).unwrap(),
        ctx.checksum(&expected, &theirs).unwrap()
    );
    // Local device -> remote device with a notification; the server reports what landed.
    let ours: Vec<u64> = (0..6).collect();
    let opts = TransferOptions {
        notify: Some(b"wrote 0..6".to_vec()),
        ..Default::default()
    };
    let t = ctx.submit(&mine, &ours, remote, &ours, &opts).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlWrite));
    t.wait(Some(Duration::from_secs(30))).unwrap();
    let sums_file = dir.join("server.sums");
    wait_for(&sums_file, "the server's checksums");
    let sent: Vec<String> = ctx
        .checksum(&mine, &ours)
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(std::fs::read_to_string(&sums_file).unwrap(), sent.join(","));
    assert!(
        server.wait().unwrap().success(),
        "the server process failed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layout on device `id`.
fn layout_on(ctx: &Context, c: LayoutConfig, id: i32) -> Layout {
    ctx.new_layout(
        c,
        &StorageSpec {
            kind: StorageKind::Device,
            device_id: id,
            path: None,
        },
    )
    .expect("device layout (two-GPU tests need two GPUs)")
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
