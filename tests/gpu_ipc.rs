//! GPU tests of same-host peers through CUDA IPC: two processes on one GPU (the second started
//! by the test itself). They need a CUDA GPU and NIXL's UCX backend, so they are `#[ignore]`d:
//! on a machine without them cargo lists them as ignored (never as passed). `scripts/gpu-test`
//! runs them with `--include-ignored` on a GPU machine.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::gpu::*;
use common::{SERVER_SEED, all, publish, sums_text, wait_for};
use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
use kvxfer::{
    Context, Error, IpcFallback, Layout, LayoutKind, Mechanism, StorageKind, TransferOptions,
};

const ROLE: &str = "KVX_TEST_IPC_SERVER";
const DEVICE: &str = "KVX_TEST_IPC_DEVICE";
const TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));

fn shape(kind: LayoutKind) -> kvxfer::LayoutConfig {
    cfg(kind, 12, 4, 16, 128, 2) // 4 KiB pieces
}

fn ipc_ctx(disable_ipc: bool) -> Context {
    rdma_ctx_with(0, disable_ipc)
}

fn tp2_rank() -> kvxfer::LayoutConfig {
    heads_cfg(LayoutKind::LayerSeparateOuterFirst, 8, 4, 0, HeadMajor)
}

/// A prefill rank of tensor parallelism 4: heads `begin..begin + 2`, token-major.
fn tp4_rank(begin: u32) -> kvxfer::LayoutConfig {
    heads_cfg(LayoutKind::FullyContiguous, 8, 2, begin, TokenMajor)
}

/// The exporting process: one device layout of each kind (layout k filled with SERVER_SEED +
/// k) and a TP 2 rank (layout 3), exported to `dir/server.peer`. It waits for the client's
/// notification and publishes checksums of layout 0's blocks 0..6, frees layout 2 when
/// `dir/free` appears (then publishes `freed`), and lives until `dir/exit` appears or it is
/// killed.
fn server(dir: &Path, device: i32) {
    let ctx = rdma_ctx_with(device, false);
    let mut pools: Vec<Layout> = KINDS
        .iter()
        .map(|&k| layout_on(&ctx, shape(k), device))
        .collect();
    for (i, p) in pools.iter().enumerate() {
        ctx.fill(p, &all(12), SERVER_SEED + i as u64).unwrap();
    }
    // A decode rank of tensor parallelism 2 (heads 0..4 of 4, head-major) for transforms.
    let rank = layout_on(&ctx, tp2_rank(), device);
    ctx.fill(&rank, &all(8), SERVER_SEED).unwrap();
    let mut refs: Vec<&Layout> = pools.iter().collect();
    refs.push(&rank);
    publish(dir, "server.peer", &ctx.export(&refs).unwrap());
    let (_, msg) =
        common::next_note(&ctx, Duration::from_secs(120)).expect("no notification from the client");
    assert_eq!(msg, common::NOTE);
    publish(
        dir,
        "server.sums",
        sums_text(&ctx, &pools[0], &all(6)).as_bytes(),
    );
    wait_for(&dir.join("free"), "the client's go to free layout 2");
    drop(pools.pop()); // revoked at the client, which acknowledges once it no longer uses it
    publish(dir, "freed", b"");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("exit").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes of every (block, layer, outer) of `ids` of a pinned layout, in order.
fn pieces(l: &Layout, ids: &[u64], layers: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for &b in ids {
        for layer in layers.clone() {
            for o in 0..2 {
                out.push(bytes(l, b, layer, o));
            }
        }
    }
    out
}

/// `seen` (the destination as read back) holds `written`'s blocks `src` as its blocks `dst` in
/// layers 1 and 2, and `untouched`'s in layers 0 and 3.
fn layers_1_and_2_moved(
    seen: &Layout,
    written: &Layout,
    untouched: &Layout,
    src: &[u64],
    dst: &[u64],
    what: &str,
) {
    for (&s, &d) in src.iter().zip(dst) {
        assert_eq!(
            pieces(seen, &[d], 1..3),
            pieces(written, &[s], 1..3),
            "{what} block {d}"
        );
        for l in [0..1, 3..4] {
            assert_eq!(pieces(seen, &[d], l.clone()), pieces(untouched, &[d], l));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn ipc_moves_device_blocks_between_two_processes_on_one_gpu() {
    between_processes(
        "ipc_moves_device_blocks_between_two_processes_on_one_gpu",
        0,
    );
}

#[test]
#[ignore = "needs two CUDA GPUs and NIXL's UCX backend: run scripts/gpu-test"]
fn two_gpus_ipc_moves_device_blocks_between_processes_on_two_gpus() {
    between_processes(
        "two_gpus_ipc_moves_device_blocks_between_processes_on_two_gpus",
        1,
    );
}

/// Both halves: run as a test it is the client on device 0 and starts itself again (`test`,
/// with ROLE naming the folder they share) as the exporting server on `server_device`.
fn between_processes(test: &str, server_device: i32) {
    if let Some(dir) = std::env::var_os(ROLE) {
        let device = std::env::var(DEVICE).ok().and_then(|d| d.parse().ok());
        server(Path::new(&dir), device.expect("the server's device"));
        return;
    }
    let dir = common::scratch_dir("gpu-ipc");
    let mut child = server_process(test, (ROLE, &dir), (DEVICE, server_device));
    common::wait_for_child(&dir.join("server.peer"), "the server's export", &mut child);
    let blob = std::fs::read(dir.join("server.peer")).unwrap();
    let ctx = ipc_ctx(false);
    let peer = ctx.import(&blob).unwrap();
    // The same layouts through NIXL only: a second look at what IPC wrote.
    let by_nixl = ipc_ctx(true);
    let nixl_peer = by_nixl.import(&blob).unwrap();
    let opts = TransferOptions::default();
    for (k, &kind) in KINDS.iter().enumerate() {
        let remote = &peer.layouts()[k];
        let seed = SERVER_SEED + k as u64;
        // Read the peer's blocks 11..6 into local blocks 6..12 of another layout kind.
        let other = shape(KINDS[(k + 1) % 3]);
        let back = layout(&ctx, other, StorageKind::Device);
        let (theirs, ours): (Vec<u64>, Vec<u64>) = ((6..12).rev().collect(), (6..12).collect());
        let t = ctx.submit(remote, &theirs, &back, &ours, &opts).unwrap();
        t.wait(TIMEOUT).unwrap();
        assert_eq!(t.stats().mechanism, Mechanism::Ipc, "read of kind {kind:?}");
        assert_eq!(t.stats().ipc_fallback, None);
        let expected = layout(&ctx, other, StorageKind::Pinned);
        ctx.fill(&expected, &theirs, seed).unwrap();
        assert_eq!(
            ctx.checksum(&back, &ours).unwrap(),
            ctx.checksum(&expected, &theirs).unwrap(),
            "read of kind {kind:?}"
        );
        // Write local blocks 0, 1, 2 into the peer's 5, 4, 3, layers 1..3 only.
        let mine = layout(&ctx, shape(kind), StorageKind::Device);
        ctx.fill(&mine, &all(12), 100 + k as u64).unwrap();
        let (src, dst) = ([0u64, 1, 2], [5u64, 4, 3]);
        let ranged = TransferOptions {
            layer_begin: 1,
            layer_end: 3,
            ..Default::default()
        };
        let t = ctx.submit(&mine, &src, remote, &dst, &ranged).unwrap();
        t.wait(TIMEOUT).unwrap();
        assert_eq!(
            t.stats().mechanism,
            Mechanism::Ipc,
            "write of kind {kind:?}"
        );
        // Read the peer's 3, 4, 5 through NIXL (IPC disabled there) and compare every piece.
        let nixl_dev = layout(&by_nixl, shape(kind), StorageKind::Device);
        let t = by_nixl
            .submit(&nixl_peer.layouts()[k], &dst, &nixl_dev, &dst, &opts)
            .unwrap();
        t.wait(TIMEOUT).unwrap();
        assert_eq!(t.stats().mechanism, Mechanism::Nixl);
        assert_eq!(t.stats().ipc_fallback, Some(IpcFallback::Disabled));
        let seen = layout(&by_nixl, shape(kind), StorageKind::Pinned);
        by_nixl
            .submit(&nixl_dev, &dst, &seen, &dst, &opts)
            .unwrap()
            .wait(TIMEOUT)
            .unwrap();
        let (written, untouched) = (
            layout(&ctx, shape(kind), StorageKind::Pinned),
            layout(&ctx, shape(kind), StorageKind::Pinned),
        );
        ctx.fill(&written, &all(12), 100 + k as u64).unwrap();
        ctx.fill(&untouched, &all(12), seed).unwrap();
        layers_1_and_2_moved(&seen, &written, &untouched, &src, &dst, "");
        // The other way round: NIXL (the peer's device arena: small device pieces) writes the
        // peer's blocks 11, 10, 9, and IPC reads them back.
        let from_nixl = layout(&by_nixl, shape(kind), StorageKind::Device);
        by_nixl.fill(&from_nixl, &all(12), 300 + k as u64).unwrap();
        let (src, dst) = ([6u64, 7, 8], [11u64, 10, 9]);
        let t = by_nixl
            .submit(&from_nixl, &src, &nixl_peer.layouts()[k], &dst, &opts)
            .unwrap();
        t.wait(TIMEOUT).unwrap();
        assert!(
            t.stats().bounced,
            "write of kind {kind:?} through the device arena"
        );
        let back = layout(&ctx, shape(kind), StorageKind::Device);
        let t = ctx.submit(remote, &dst, &back, &src, &opts).unwrap();
        t.wait(TIMEOUT).unwrap();
        assert_eq!(t.stats().mechanism, Mechanism::Ipc);
        let expected = layout(&ctx, shape(kind), StorageKind::Pinned);
        ctx.fill(&expected, &all(12), 300 + k as u64).unwrap();
        assert_eq!(
            ctx.checksum(&back, &src).unwrap(),
            ctx.checksum(&expected, &src).unwrap(),
            "device arena write of kind {kind:?}"
        );
    }
    // TP 4 -> 2 with NHD -> HND: two prefill ranks (heads 0..2 and 2..4) write their blocks
    // into the decode rank, through IPC; NIXL reads the rank back to compare every head slice,
    // and the first prefill rank reads its heads back through IPC.
    let rank = &peer.layouts()[3];
    let (src, dst) = ([0u64, 5, 7], [6u64, 1, 3]);
    let mut prefill = Vec::new();
    for (r, begin) in [0u32, 2].into_iter().enumerate() {
        let host = layout(&ctx, tp4_rank(begin), StorageKind::Pinned);
        ctx.fill(&host, &all(8), 200 + r as u64).unwrap();
        let dev = layout(&ctx, tp4_rank(begin), StorageKind::Device);
        ctx.submit(&host, &all(8), &dev, &all(8), &opts)
            .unwrap()
            .wait(TIMEOUT)
            .unwrap();
        let t = ctx.submit(&dev, &src, rank, &dst, &opts).unwrap();
        t.wait(TIMEOUT).unwrap();
        assert_eq!(t.stats().mechanism, Mechanism::Ipc, "transform write");
        prefill.push((host, dev, begin));
    }
    let seen_dev = layout(&by_nixl, tp2_rank(), StorageKind::Device);
    by_nixl
        .submit(&nixl_peer.layouts()[3], &dst, &seen_dev, &dst, &opts)
        .unwrap()
        .wait(TIMEOUT)
        .unwrap();
    let seen = layout(&by_nixl, tp2_rank(), StorageKind::Pinned);
    by_nixl
        .submit(&seen_dev, &dst, &seen, &dst, &opts)
        .unwrap()
        .wait(TIMEOUT)
        .unwrap();
    let (host0, _, _) = &prefill[0];
    let back_dev = layout(&ctx, tp4_rank(0), StorageKind::Device);
    let t = ctx.submit(rank, &dst, &back_dev, &src, &opts).unwrap();
    t.wait(TIMEOUT).unwrap();
    assert_eq!(t.stats().mechanism, Mechanism::Ipc, "transform read");
    let back = layout(&ctx, tp4_rank(0), StorageKind::Pinned);
    ctx.submit(&back_dev, &src, &back, &src, &opts)
        .unwrap()
        .wait(TIMEOUT)
        .unwrap();
    for (&s, &d) in src.iter().zip(&dst) {
        for l in 0..2 {
            for o in 0..2 {
                for tok in 0..16 {
                    for (host, _, begin) in &prefill {
                        for h in *begin..begin + 2 {
                            let want = common::head_slice(host, s, l, o, tok, h);
                            assert_eq!(common::head_slice(&seen, d, l, o, tok, h), want);
                        }
                    }
                    for h in 0..2 {
                        let want = common::head_slice(host0, s, l, o, tok, h);
                        assert_eq!(common::head_slice(&back, s, l, o, tok, h), want, "read");
                    }
                }
            }
        }
    }
    // A whole-block write with a notification: the server checks what landed once it has it.
    let mine = layout(&ctx, shape(KINDS[2]), StorageKind::Device);
    ctx.fill(&mine, &all(12), 7).unwrap();
    let notify = TransferOptions {
        notify: Some(common::NOTE.to_vec()),
        ..Default::default()
    };
    let t = ctx
        .submit(&mine, &all(6), &peer.layouts()[0], &all(6), &notify)
        .unwrap();
    t.wait(TIMEOUT).unwrap();
    assert_eq!(t.stats().mechanism, Mechanism::Ipc);
    wait_for(&dir.join("server.sums"), "the server's checksums");
    assert_eq!(
        std::fs::read_to_string(dir.join("server.sums")).unwrap(),
        sums_text(&ctx, &mine, &all(6))
    );
    // The server frees layout 2: it is revoked here, and no transfer touches it again.
    let revoked = &peer.layouts()[2];
    publish(&dir, "free", b"");
    wait_for(&dir.join("freed"), "the server freeing layout 2");
    let r = ctx
        .submit(&mine, &[0], revoked, &[0], &opts)
        .and_then(|t| t.wait(TIMEOUT));
    assert!(matches!(r, Err(Error::Peer(_))), "{r:?}");
    // The server dies while writes stream into its layout 1, through IPC and (another context
    // here) through its device arena: both fail with PEER soon after, and this process's GPU
    // work goes on.
    let remote = peer.layouts()[1].clone();
    let source = layout(&ctx, shape(KINDS[1]), StorageKind::Device);
    let arena_source = layout(&by_nixl, shape(KINDS[1]), StorageKind::Device);
    let start = Instant::now();
    std::thread::scope(|s| {
        let writers = [
            (
                s.spawn(|| stream_until_error(&ctx, &source, &remote, start)),
                "IPC",
            ),
            (
                s.spawn(|| {
                    stream_until_error(&by_nixl, &arena_source, &nixl_peer.layouts()[1], start)
                }),
                "device arena",
            ),
        ];
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap();
        let killed = start.elapsed();
        for (writer, path) in writers {
            let (done, err, timeline) = writer.join().unwrap();
            assert!(done > 0, "{path}: writes before the kill");
            assert!(matches!(err, Error::Peer(_)), "{path}: {err:?}");
            // The exit is seen (pidfd) once the process finished exiting, which includes the
            // driver's teardown of its GPU context. Under a second in four runs; one (session
            // 7, device run 9, before the timeline was printed) took ~20 s.
            assert!(
                start.elapsed() - killed < Duration::from_secs(30),
                "{path}: not failed in bounded time: killed at {killed:?}, the last transfers \
                 (start, submit, wait): {timeline:?}"
            );
        }
    });
    let _ = child.wait();
    let check = layout(&ctx, shape(KINDS[1]), StorageKind::Device);
    check_move(&ctx, &source, &check, &opts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whole-layout writes of `source` into `remote`, one after the other, until one fails: how
/// many succeeded, the error, and (start, submit's time, wait's time) of the last four.
fn stream_until_error(
    ctx: &Context,
    source: &Layout,
    remote: &Layout,
    start: Instant,
) -> (
    u32,
    Error,
    std::collections::VecDeque<(Duration, Duration, Duration)>,
) {
    let mut timeline = std::collections::VecDeque::new();
    let mut done = 0u32;
    loop {
        let t0 = start.elapsed();
        let t = ctx.submit(source, &all(12), remote, &all(12), &Default::default());
        let t1 = start.elapsed();
        let r = t.and_then(|t| t.wait(TIMEOUT));
        timeline.push_back((t0, t1 - t0, start.elapsed() - t1));
        if timeline.len() > 4 {
            timeline.pop_front();
        }
        match r {
            Ok(()) => done += 1,
            Err(e) => return (done, e, timeline),
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never failed");
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn another_context_of_this_process_stays_on_nixl() {
    let (exporter, importer) = (ipc_ctx(false), ipc_ctx(false));
    let pool = layout(
        &exporter,
        shape(LayoutKind::FullyContiguous),
        StorageKind::Device,
    );
    exporter.fill(&pool, &all(12), 3).unwrap();
    let peer = importer
        .import(&exporter.export(&[&pool]).unwrap())
        .unwrap();
    let back = layout(
        &importer,
        shape(LayoutKind::FullyContiguous),
        StorageKind::Device,
    );
    let t = importer
        .submit(
            &peer.layouts()[0],
            &all(12),
            &back,
            &all(12),
            &Default::default(),
        )
        .unwrap();
    t.wait(TIMEOUT).unwrap();
    assert_eq!(t.stats().mechanism, Mechanism::Nixl);
    assert_eq!(t.stats().ipc_fallback, Some(IpcFallback::SameProcess));
    let expected = layout(
        &importer,
        shape(LayoutKind::FullyContiguous),
        StorageKind::Pinned,
    );
    importer.fill(&expected, &all(12), 3).unwrap();
    assert_eq!(
        importer.checksum(&back, &all(12)).unwrap(),
        importer.checksum(&expected, &all(12)).unwrap()
    );
}

/// Small device pieces between two contexts that IPC cannot join (here: one process) go through
/// the exporter's landing arena in device memory: gathered by the importer's kernel, one NIXL
/// request per chunk, placed by the exporter's kernel; the notification after the bytes.
#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn small_device_pieces_go_through_the_peers_device_arena() {
    let (exporter, importer) = (ipc_ctx(false), ipc_ctx(false));
    for (k, &kind) in KINDS.iter().enumerate() {
        let pool = layout(&exporter, shape(kind), StorageKind::Device);
        exporter.fill(&pool, &all(12), 3).unwrap();
        let peer = importer
            .import(&exporter.export(&[&pool]).unwrap())
            .unwrap();
        let remote = &peer.layouts()[0];
        // Write local blocks 0..4 into the peer's 11..7, layers 1..3, with a notification.
        let other = shape(KINDS[(k + 1) % 3]);
        let mine = layout(&importer, other, StorageKind::Device);
        importer.fill(&mine, &all(12), 50).unwrap();
        let (src, dst): (Vec<u64>, Vec<u64>) = ((0..5).collect(), (7..12).rev().collect());
        let opts = TransferOptions {
            layer_begin: 1,
            layer_end: 3,
            notify: Some(common::NOTE.to_vec()),
            ..Default::default()
        };
        let t = importer.submit(&mine, &src, remote, &dst, &opts).unwrap();
        t.wait(TIMEOUT).unwrap();
        let stats = t.stats();
        assert_eq!(stats.mechanism, Mechanism::Nixl, "write of kind {kind:?}");
        assert!(stats.bounced, "write of kind {kind:?} through the arena");
        assert_eq!(stats.ipc_fallback, Some(IpcFallback::SameProcess));
        let (_, msg) = common::next_note(&exporter, Duration::from_secs(10))
            .expect("the write's notification");
        assert_eq!(msg, common::NOTE);
        // Every piece at the exporter: the written layers from `mine`, the others untouched.
        let seen = layout(&exporter, shape(kind), StorageKind::Pinned);
        exporter
            .submit(&pool, &all(12), &seen, &all(12), &Default::default())
            .unwrap()
            .wait(TIMEOUT)
            .unwrap();
        let (written, untouched) = (
            layout(&importer, other, StorageKind::Pinned),
            layout(&exporter, shape(kind), StorageKind::Pinned),
        );
        importer.fill(&written, &all(12), 50).unwrap();
        exporter.fill(&untouched, &all(12), 3).unwrap();
        layers_1_and_2_moved(
            &seen,
            &written,
            &untouched,
            &src,
            &dst,
            &format!("{kind:?}"),
        );
        for b in 0..7 {
            assert_eq!(pieces(&seen, &[b], 0..4), pieces(&untouched, &[b], 0..4));
        }
        // Read the peer's blocks 6..0 into local blocks 0..7, all layers.
        let back = layout(&importer, other, StorageKind::Device);
        let (theirs, ours): (Vec<u64>, Vec<u64>) = ((0..7).rev().collect(), (0..7).collect());
        let t = importer
            .submit(remote, &theirs, &back, &ours, &Default::default())
            .unwrap();
        t.wait(TIMEOUT).unwrap();
        assert!(t.stats().bounced, "read of kind {kind:?} through the arena");
        let expected = layout(&importer, other, StorageKind::Pinned);
        importer.fill(&expected, &theirs, 3).unwrap();
        assert_eq!(
            importer.checksum(&back, &ours).unwrap(),
            importer.checksum(&expected, &theirs).unwrap(),
            "read of kind {kind:?}"
        );
    }
}

/// Many transfers at once through one exporter's device arena, of which this importer is
/// granted a few slots: six threads each write their own blocks (twenty times) and read them
/// back into a layout of their own; every byte lands where it belongs.
#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn many_threads_share_a_peers_device_arena() {
    let (exporter, importer) = (ipc_ctx(false), ipc_ctx(false));
    let pool = layout(
        &exporter,
        shape(LayoutKind::LayerSeparateOuterFirst),
        StorageKind::Device,
    );
    let peer = importer
        .import(&exporter.export(&[&pool]).unwrap())
        .unwrap();
    let remote = &peer.layouts()[0];
    let mine_shape = shape(LayoutKind::LayerSeparateBlockFirst);
    let mine = layout(&importer, mine_shape, StorageKind::Device);
    importer.fill(&mine, &all(12), 70).unwrap();
    std::thread::scope(|s| {
        for th in 0..6u64 {
            let (importer, mine) = (&importer, &mine);
            s.spawn(move || {
                let ours = [2 * th, 2 * th + 1];
                let theirs = [11 - 2 * th, 10 - 2 * th];
                for _ in 0..20 {
                    let t = importer
                        .submit(mine, &ours, remote, &theirs, &Default::default())
                        .unwrap();
                    t.wait(TIMEOUT).unwrap();
                    assert!(t.stats().bounced, "thread {th}: through the arena");
                }
                let back = layout(importer, mine_shape, StorageKind::Device);
                let t = importer
                    .submit(remote, &theirs, &back, &ours, &Default::default())
                    .unwrap();
                t.wait(TIMEOUT).unwrap();
                assert!(t.stats().bounced, "thread {th}: read through the arena");
                assert_eq!(
                    importer.checksum(&back, &ours).unwrap(),
                    importer.checksum(mine, &ours).unwrap(),
                    "thread {th}"
                );
            });
        }
    });
}
