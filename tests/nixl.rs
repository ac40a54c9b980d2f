//! NIXL loading and agents. Without NIXL these tests report themselves skipped (not passed);
//! with KVX_REQUIRE_NIXL set (the project's test command sets it) a missing NIXL fails them.

mod common;

use std::path::Path;
use std::process::Command;

use common::harness::{self, Role, skip};
use kvxfer::Backends;
use kvxfer::{
    Context, ContextConfig, Error, LayoutConfig, LayoutKind, Plan, StorageKind, StorageSpec,
    Strategy, TransferOptions,
};

fn default_context_makes_an_agent_with_ucx_and_posix() {
    let ctx = Context::new(ContextConfig::default()).expect("context with UCX and POSIX");
    assert_eq!(ctx.nixl_backends(), ["UCX", "POSIX"]);
}

fn generated_agent_names_are_unique() {
    let (a, b) = (
        Context::new(ContextConfig::default()).unwrap(),
        Context::new(ContextConfig::default()).unwrap(),
    );
    assert_ne!(a.name(), b.name());
    let named = Context::new(ContextConfig {
        agent_name: Some("prefill-7".into()),
        nixl_backends: Backends::POSIX,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(named.name(), "prefill-7");
    assert_eq!(named.nixl_backends(), ["POSIX"]);
}

/// GDS needs cuFile and a GPU: where it cannot be created, the error names it.
fn a_backend_that_cannot_be_created_is_named() {
    let r = Context::new(ContextConfig {
        nixl_backends: Backends::POSIX | Backends::GDS,
        ..Default::default()
    });
    match r {
        Ok(ctx) => assert_eq!(ctx.nixl_backends(), ["POSIX", "GDS"]),
        Err(Error::Unavailable(m)) => assert!(m.contains("GDS"), "{m}"),
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

/// Run in a child process (this test binary again, as NO_NIXL_ROLE) with every NIXL location
/// hidden: the context is refused with instructions, and the process does not abort
/// (nixl-sys's stubs would abort it).
fn missing_nixl_is_unavailable_not_an_abort() {
    let empty = common::scratch_dir("no-nixl");
    let out = Command::new(std::env::current_exe().unwrap())
        .env(NO_NIXL_ROLE, &empty)
        .env("KVX_NIXL_LIB_DIR", empty.join("nothing-here"))
        .env("KVX_NIXL_ONLY_LIB_DIR", "1")
        .env("HOME", &empty)
        .env("XDG_DATA_HOME", &empty)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run the test binary as NO_NIXL_ROLE");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("NIXL is not available"), "{stdout}");
    assert!(
        stdout.contains("pip install --no-deps --target"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&empty);
}

/// NO_NIXL_ROLE: a default context (UCX | POSIX) must be refused as Unavailable; the reason
/// goes to stdout for the parent to check.
fn no_nixl_child(_: &Path) {
    match Context::new(ContextConfig::default()) {
        Err(Error::Unavailable(m)) => println!("{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let without = Context::new(ContextConfig {
        nixl_backends: Backends::empty(),
        ..Default::default()
    });
    assert!(
        without.is_ok(),
        "a context without NIXL backends needs no NIXL"
    );
}

/// Two agents in one process: B imports what A exported and sees A's layouts as remote.
fn export_and_import_between_two_contexts() {
    let a = Context::new(ContextConfig::default()).unwrap();
    let b = Context::new(ContextConfig::default()).unwrap();
    let c = LayoutConfig {
        num_blocks: 16,
        num_layers: 4,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 64,
        dtype_width: 2,
        alignment: 256,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Default::default(),
    };
    let fc = LayoutConfig {
        kind: LayoutKind::FullyContiguous,
        ..c
    };
    let a_sys = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let a_pin = a
        .new_layout(fc, &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    let bytes = a.export(&[&a_sys, &a_pin]).unwrap();
    let peer = b.import(&bytes).unwrap();
    assert_eq!(peer.agent(), a.name());
    assert_eq!(peer.layouts().len(), 2);
    let remote = &peer.layouts()[1];
    assert!(remote.is_remote());
    assert_eq!(remote.config(), a_pin.config());
    assert_eq!(
        remote.region(3, 1, 1).unwrap(),
        a_pin.region(3, 1, 1).unwrap()
    );
    // The planner sees a remote location: local host -> peer host is a NIXL write.
    let local = b
        .new_layout(fc, &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    assert_eq!(
        b.plan(&local, remote).unwrap(),
        Plan::Direct(Strategy::NixlWrite)
    );
    assert_eq!(
        b.plan(remote, &local).unwrap(),
        Plan::Direct(Strategy::NixlReadFlipped)
    );
    // Local access to a peer's memory is refused, never attempted.
    assert!(matches!(
        b.checksum(remote, &[0]),
        Err(Error::Unavailable(_))
    ));
    assert!(matches!(
        b.fill(remote, &[0], 1),
        Err(Error::Unavailable(_))
    ));
    // A peer's layout belongs to the context that imported it.
    assert!(a.plan(&a_pin, remote).is_err());
    // Exporting needs local layouts of this context.
    assert!(matches!(
        b.export(&[remote]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.export(&[&a_pin]),
        Err(Error::InvalidArgument(_))
    ));
    // Importing one's own export is refused; dropping the peer unloads it, so it can be
    // imported again.
    assert!(matches!(a.import(&bytes), Err(Error::Peer(_))));
    drop(peer);
    let again = b.import(&bytes).unwrap();
    assert_eq!(again.layouts().len(), 2);
}

/// Malformed, truncated and foreign bytes are refused with Error::Peer by a real context.
fn malformed_imports_are_refused() {
    let a = Context::new(ContextConfig::default()).unwrap();
    let b = Context::new(ContextConfig::default()).unwrap();
    let c = LayoutConfig {
        num_blocks: 4,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: 512,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    };
    let l = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let bytes = a.export(&[&l]).unwrap();
    for n in [0, 1, 8, 23, 24, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            matches!(b.import(&bytes[..n]), Err(Error::Peer(_))),
            "length {n}"
        );
    }
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    assert!(matches!(b.import(&flipped), Err(Error::Peer(_))));
    assert!(matches!(
        b.import(b"GET / HTTP/1.1\r\n\r\n"),
        Err(Error::Peer(_))
    ));
    assert_eq!(b.import(&bytes).unwrap().layouts().len(), 1);
}

fn disk_config(kind: LayoutKind) -> LayoutConfig {
    LayoutConfig {
        num_blocks: 12,
        num_layers: 3,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 64,
        dtype_width: 2,
        alignment: 1,
        kind,
        heads: Default::default(),
    }
}

/// Layouts of 1, 2 and 3 blocks, every layout kind pair, host -> disk -> host (direct NIXL)
/// and disk -> disk (two-hop): one block of a fully contiguous layout is one piece that
/// coalesces across a layer-separate disk layout's back-to-back layer allocations, which NIXL
/// refused as a descriptor spanning registrations.
fn few_blocks_to_and_from_disk_in_every_kind_pair() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    for n in 1..=3u64 {
        let ids: Vec<u64> = (0..n).collect();
        let rev: Vec<u64> = ids.iter().rev().copied().collect();
        for hk in LayoutKind::ALL {
            for dk in LayoutKind::ALL {
                let shape = |kind| LayoutConfig {
                    num_blocks: n,
                    ..disk_config(kind)
                };
                let what = format!("{n} block(s), host {hk:?}, disk {dk:?}");
                let new = |kind, storage| {
                    ctx.new_layout(shape(kind), &StorageSpec::new(storage))
                        .unwrap()
                };
                let host = new(hk, StorageKind::Pinned);
                let disk = new(dk, StorageKind::Disk);
                let disk2 = new(hk, StorageKind::Disk);
                let back = new(dk, StorageKind::System);
                ctx.fill(&host, &ids, 9).unwrap();
                let go = |src: &kvxfer::Layout, sb: &[u64], dst: &kvxfer::Layout, db: &[u64]| {
                    ctx.submit(src, sb, dst, db, &TransferOptions::default())
                        .and_then(|t| t.wait(None))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                };
                go(&host, &ids, &disk, &rev);
                go(&disk, &rev, &disk2, &ids);
                go(&disk2, &ids, &back, &ids);
                assert_eq!(
                    ctx.checksum(&back, &ids).unwrap(),
                    ctx.checksum(&host, &ids).unwrap(),
                    "{what}"
                );
            }
        }
    }
}

/// Host -> disk -> host with reversed ids, in every layout kind; guard blocks untouched.
fn host_disk_host_with_reversed_ids() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let all: Vec<u64> = (0..12).collect();
    for kind in LayoutKind::ALL {
        let c = disk_config(kind);
        let host = ctx
            .new_layout(
                disk_config(LayoutKind::FullyContiguous),
                &StorageSpec::new(StorageKind::Pinned),
            )
            .unwrap();
        let disk = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Disk))
            .unwrap();
        let back = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::System))
            .unwrap();
        assert_eq!(
            ctx.plan(&host, &disk).unwrap(),
            Plan::Direct(Strategy::NixlWrite)
        );
        assert_eq!(
            ctx.plan(&disk, &back).unwrap(),
            Plan::Direct(Strategy::NixlReadFlipped)
        );
        ctx.fill(&host, &all, 5).unwrap();
        ctx.fill(&disk, &all, 6).unwrap();
        let guards = ctx.checksum(&disk, &all).unwrap();
        let src: Vec<u64> = (0..6).collect();
        let mid: Vec<u64> = (0..6).map(|i| 11 - i).collect();
        let t = ctx
            .submit(&host, &src, &disk, &mid, &TransferOptions::default())
            .unwrap();
        t.wait(None).unwrap();
        assert_eq!(
            ctx.checksum(&host, &src).unwrap(),
            ctx.checksum(&disk, &mid).unwrap()
        );
        let now = ctx.checksum(&disk, &all).unwrap();
        for b in 0..6 {
            assert_eq!(
                now[b], guards[b],
                "guard block {b} of the disk layout changed"
            );
        }
        let t = ctx
            .submit(&disk, &mid, &back, &src, &TransferOptions::default())
            .unwrap();
        t.wait(None).unwrap();
        assert_eq!(
            ctx.checksum(&host, &src).unwrap(),
            ctx.checksum(&back, &src).unwrap(),
            "{kind:?}"
        );
    }
}

/// A disk layout at a path keeps its data: a new layout of the same config reads it back.
fn disk_layout_persists_across_reopen() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("kvx-persist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pool.kv");
    let c = disk_config(LayoutKind::LayerSeparateBlockFirst);
    let spec = StorageSpec {
        kind: StorageKind::Disk,
        device_id: 0,
        path: Some(path.clone()),
    };
    let all: Vec<u64> = (0..12).collect();
    let host = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    ctx.fill(&host, &all, 77).unwrap();
    let expected = ctx.checksum(&host, &all).unwrap();
    {
        let disk = ctx.new_layout(c, &spec).unwrap();
        let t = ctx
            .submit(&host, &all, &disk, &all, &TransferOptions::default())
            .unwrap();
        t.wait(None).unwrap();
    } // layout freed; the file stays
    assert!(path.exists());
    let reopened = ctx.new_layout(c, &spec).unwrap();
    assert_eq!(ctx.checksum(&reopened, &all).unwrap(), expected);
    let fresh = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let t = ctx
        .submit(&reopened, &all, &fresh, &all, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(ctx.checksum(&fresh, &all).unwrap(), expected);
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
}

/// B writes into A's exported layout with a notification, A sees the data and the message,
/// then B reads it back: the seed's NixlWrite and NixlReadFlipped over UCX, in one process.
fn write_to_and_read_from_a_peer_with_a_notification() {
    let a = Context::new(ContextConfig::default()).unwrap();
    let b = Context::new(ContextConfig::default()).unwrap();
    let c = disk_config(LayoutKind::LayerSeparateOuterFirst);
    let all: Vec<u64> = (0..12).collect();
    let a_pool = a
        .new_layout(c, &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    a.fill(&a_pool, &all, 1).unwrap();
    let a_before = a.checksum(&a_pool, &all).unwrap();
    let peer = b.import(&a.export(&[&a_pool]).unwrap()).unwrap();
    let remote = &peer.layouts()[0];

    let src = b
        .new_layout(
            disk_config(LayoutKind::FullyContiguous),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    b.fill(&src, &all, 2).unwrap();
    let sb: Vec<u64> = (0..5).collect();
    let db: Vec<u64> = (0..5).map(|i| 11 - i).collect();
    let opts = TransferOptions {
        notify: Some(b"blocks 7..11 ready".to_vec()),
        ..Default::default()
    };
    let t = b.submit(&src, &sb, remote, &db, &opts).unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlWrite));
    assert!(t.stats().bounced, "2 KiB pieces land in A's arena");
    // A's memory holds B's blocks at the destination ids, the rest untouched.
    assert_eq!(
        a.checksum(&a_pool, &db).unwrap(),
        b.checksum(&src, &sb).unwrap()
    );
    let now = a.checksum(&a_pool, &all).unwrap();
    for blk in 0..7 {
        assert_eq!(now[blk], a_before[blk], "guard block {blk}");
    }
    // A receives the notification (it may trail the data by a moment).
    let mut got = None;
    for _ in 0..2000 {
        let too_small = a.next_notification(|_, msg| {
            if msg.len() > 4 {
                Err(Error::InvalidArgument("buffer too small".into()))
            } else {
                Ok(())
            }
        });
        if too_small.is_err() {
            // Refused for size: it must still be there for a large enough buffer.
            got = a
                .next_notification(|who, msg| Ok((who.to_string(), msg.to_vec())))
                .unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        got,
        Some((b.name().to_string(), b"blocks 7..11 ready".to_vec()))
    );
    assert_eq!(a.next_notification(|_, _| Ok(())).unwrap(), None);
    // And back: B reads A's blocks into a fresh layout (host memory stays NIXL's local side).
    let back = b
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let t = b
        .submit(remote, &db, &back, &sb, &TransferOptions::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlReadFlipped));
    assert!(t.stats().bounced, "gathered in A's arena");
    assert_eq!(
        b.checksum(&back, &sb).unwrap(),
        b.checksum(&src, &sb).unwrap()
    );
    // Notifications belong to writes to a peer only.
    let bad = b.submit(remote, &db, &back, &sb, &opts);
    assert!(matches!(bad, Err(Error::InvalidArgument(_))));
}

/// Many writes and reads of small pieces at once from several threads to one peer: they share
/// the slots the peer granted (one transfer at a time holds them), and every byte lands.
fn many_small_piece_transfers_to_one_peer_at_once() {
    let a = Context::new(ContextConfig::default()).unwrap();
    let b = Context::new(ContextConfig::default()).unwrap();
    let c = LayoutConfig {
        num_blocks: 64,
        ..disk_config(LayoutKind::LayerSeparateOuterFirst)
    };
    let pool = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let peer = b.import(&a.export(&[&pool]).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (b, remote) = (&b, remote);
            s.spawn(move || {
                let mine = b
                    .new_layout(c, &StorageSpec::new(StorageKind::Pinned))
                    .unwrap();
                let back = b
                    .new_layout(c, &StorageSpec::new(StorageKind::System))
                    .unwrap();
                // This thread's eight blocks of the peer's 64, interleaved with the others'.
                let theirs: Vec<u64> = (0..8).map(|i| i * 8 + t).collect();
                let ours: Vec<u64> = (0..8).rev().collect();
                for round in 0..5 {
                    b.fill(&mine, &ours, 100 * t + round).unwrap();
                    let w = b.submit(&mine, &ours, remote, &theirs, &Default::default());
                    let w = w.unwrap();
                    w.wait(Some(std::time::Duration::from_secs(30))).unwrap();
                    assert!(w.stats().bounced);
                    let r = b.submit(remote, &theirs, &back, &ours, &Default::default());
                    r.unwrap()
                        .wait(Some(std::time::Duration::from_secs(30)))
                        .unwrap();
                    assert_eq!(
                        b.checksum(&back, &ours).unwrap(),
                        b.checksum(&mine, &ours).unwrap(),
                        "thread {t} round {round}"
                    );
                }
            });
        }
    });
}

/// A layout of 6 blocks, 2 layers, 4 tokens of heads of 16 bf16, holding `n` heads from
/// `begin` in `order`.
fn heads_config(kind: LayoutKind, n: u32, begin: u32, order: kvxfer::HeadOrder) -> LayoutConfig {
    LayoutConfig {
        num_blocks: 6,
        num_layers: 2,
        outer_dim: 2,
        page_size: 4,
        inner_dim: u64::from(n) * 16,
        dtype_width: 2,
        alignment: 64,
        kind,
        heads: kvxfer::Heads {
            num_heads: n,
            head_begin: begin,
            order,
        },
    }
}

/// Head transforms to and from a peer and a disk: B writes its TP 4 rank (heads 2..4, NHD) into
/// A's exported TP 2 rank (heads 0..4, HND), reads A's heads 2..4 back into a TP 4 rank of the
/// other order, and offloads to disk and back with a transform each way; every head of every
/// token checked. The export carries the heads (format version 3).
fn head_transforms_to_and_from_a_peer_and_a_disk() {
    use kvxfer::HeadOrder::{HeadMajor, TokenMajor};
    let a = Context::new(ContextConfig::default()).unwrap();
    let b = Context::new(ContextConfig::default()).unwrap();
    let all: Vec<u64> = (0..6).collect();
    let a_pool = a
        .new_layout(
            heads_config(LayoutKind::LayerSeparateBlockFirst, 4, 0, HeadMajor),
            &StorageSpec::new(StorageKind::Pinned),
        )
        .unwrap();
    a.fill(&a_pool, &all, 1).unwrap();
    let peer = b.import(&a.export(&[&a_pool]).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    assert_eq!(remote.config().heads, a_pool.config().heads);
    let rank = b
        .new_layout(
            heads_config(LayoutKind::FullyContiguous, 2, 2, TokenMajor),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    b.fill(&rank, &all, 2).unwrap();
    let before: Vec<Vec<u8>> = (0..6)
        .flat_map(|blk| (0..4u32).map(move |h| (blk, h)))
        .map(|(blk, h)| common::head_slice(&a_pool, blk, 0, 0, 0, h))
        .collect();
    let (sb, db) = ([0u64, 3, 5], [4u64, 1, 2]);
    let opts = TransferOptions {
        notify: Some(b"heads 2..4 of blocks 4, 1, 2".to_vec()),
        ..Default::default()
    };
    let t = b.submit(&rank, &sb, remote, &db, &opts).unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlWrite));
    // Heads of 32 bytes: staged through the bounce pool, one run per region on the wire.
    assert!(t.stats().bounced);
    let note = common::next_note(&a, std::time::Duration::from_secs(10));
    assert_eq!(
        note,
        Some((
            b.name().to_string(),
            b"heads 2..4 of blocks 4, 1, 2".to_vec()
        ))
    );
    for (i, (&s, &d)) in sb.iter().zip(&db).enumerate() {
        for layer in 0..2 {
            for o in 0..2 {
                for tok in 0..4 {
                    for h in 2..4 {
                        assert_eq!(
                            common::head_slice(&a_pool, d, layer, o, tok, h),
                            common::head_slice(&rank, s, layer, o, tok, h),
                            "write {i}: block {d} layer {layer} outer {o} token {tok} head {h}"
                        );
                    }
                }
            }
        }
        // Heads 0 and 1 of the written blocks are A's own still.
        for h in 0..2u32 {
            assert_eq!(
                common::head_slice(&a_pool, d, 0, 0, 0, h),
                before[(d * 4) as usize + h as usize]
            );
        }
    }
    // Read A's heads 2..4 back into a head-major TP 4 rank.
    let back = b
        .new_layout(
            heads_config(LayoutKind::LayerSeparateOuterFirst, 2, 2, HeadMajor),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    let t = b
        .submit(remote, &db, &back, &sb, &TransferOptions::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlReadFlipped));
    assert!(t.stats().bounced);
    // To disk and back, transformed each way: a TP 2 rank on disk, HND.
    let disk = b
        .new_layout(
            heads_config(LayoutKind::FullyContiguous, 4, 0, HeadMajor),
            &StorageSpec::new(StorageKind::Disk),
        )
        .unwrap();
    b.submit(&back, &sb, &disk, &db, &TransferOptions::default())
        .and_then(|t| t.wait(Some(std::time::Duration::from_secs(30))))
        .unwrap();
    let again = b
        .new_layout(
            heads_config(LayoutKind::FullyContiguous, 2, 2, TokenMajor),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    b.submit(&disk, &db, &again, &sb, &TransferOptions::default())
        .and_then(|t| t.wait(Some(std::time::Duration::from_secs(30))))
        .unwrap();
    for &s in &sb {
        for layer in 0..2 {
            for o in 0..2 {
                for tok in 0..4 {
                    for h in 2..4 {
                        let want = common::head_slice(&rank, s, layer, o, tok, h);
                        assert_eq!(common::head_slice(&back, s, layer, o, tok, h), want, "read");
                        assert_eq!(
                            common::head_slice(&again, s, layer, o, tok, h),
                            want,
                            "disk"
                        );
                    }
                }
            }
        }
    }
}

/// Contexts with `allow_gpu_rdma` run NIXL's UCX backend with dedicated worker threads that
/// split descriptor lists (kvxfer's GPU RDMA setup). Host blocks through it: a list of 3 x 2048
/// descriptors, past the 1024 a thread takes at once, written with a notification and read
/// back, both ways checked block by block.
fn gpu_rdma_setup_splits_long_lists_over_ucx_threads() {
    let rdma = || {
        Context::new(ContextConfig {
            capabilities: kvxfer::Capabilities {
                allow_gds: false,
                allow_gpu_rdma: true,
            },
            ..Default::default()
        })
        .expect("a context with kvxfer's GPU RDMA UCX parameters")
    };
    let (a, b) = (rdma(), rdma());
    let c = LayoutConfig {
        num_blocks: 2048,
        num_layers: 3,
        outer_dim: 1,
        page_size: 4,
        inner_dim: 32,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Default::default(),
    };
    let all: Vec<u64> = (0..2048).collect();
    let a_pool = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    a.fill(&a_pool, &all, 1).unwrap();
    let peer = b.import(&a.export(&[&a_pool]).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    let fc = LayoutConfig {
        kind: LayoutKind::FullyContiguous,
        ..c
    };
    let src = b
        .new_layout(fc, &StorageSpec::new(StorageKind::System))
        .unwrap();
    b.fill(&src, &all, 2).unwrap();
    let mut db = all.clone();
    fastrand::Rng::with_seed(5).shuffle(&mut db);
    let (sb, db) = (&all[..2000], &db[..2000]);
    let untouched: Vec<u64> = all.iter().copied().filter(|i| !db.contains(i)).collect();
    let before = a.checksum(&a_pool, &untouched).unwrap();
    let opts = TransferOptions {
        notify: Some(b"2000 blocks".to_vec()),
        ..Default::default()
    };
    let t = b.submit(&src, sb, remote, db, &opts).unwrap();
    t.wait(Some(std::time::Duration::from_secs(60))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlWrite));
    assert!(t.stats().copies > 3 * 1024, "{:?}", t.stats());
    assert_eq!(
        a.checksum(&a_pool, db).unwrap(),
        b.checksum(&src, sb).unwrap()
    );
    assert_eq!(a.checksum(&a_pool, &untouched).unwrap(), before);
    let got = common::next_note(&a, std::time::Duration::from_secs(10));
    assert_eq!(got, Some((b.name().to_string(), b"2000 blocks".to_vec())));
    let back = b
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let t = b
        .submit(remote, db, &back, sb, &TransferOptions::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(60))).unwrap();
    assert_eq!(t.stats().plan, Plan::Direct(Strategy::NixlReadFlipped));
    assert_eq!(
        b.checksum(&back, sb).unwrap(),
        b.checksum(&src, sb).unwrap()
    );
}

const NO_NIXL_ROLE: &str = "KVX_TEST_NO_NIXL_ROLE";
const ROLE: &str = "KVX_TEST_PEER_ROLE";
const HOLD_ROLE: &str = "KVX_TEST_HOLD_ROLE";
const CLIENT_ROLE: &str = "KVX_TEST_CLIENT_ROLE";
const HOLD_ROLE_BIG: &str = "KVX_TEST_HOLD_BIG_ROLE";

/// The server half of `two_processes_move_data_both_ways` (common::serve on host memory).
fn peer_server(dir: &Path) {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let c = disk_config(LayoutKind::LayerSeparateBlockFirst);
    let pool = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    common::serve(&ctx, &pool, dir);
}

/// The client half of the peer tests (common::exchange, pinned and host memory here).
fn peer_client(dir: &Path) {
    let peer_file = dir.join("server.peer");
    common::wait_for(&peer_file, "the server's export");
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let peer = ctx.import(&std::fs::read(&peer_file).unwrap()).unwrap();
    // Another kind than the server's: no two pieces are neighbours on both sides.
    let c = disk_config(LayoutKind::LayerSeparateOuterFirst);
    let new = |kind| ctx.new_layout(c, &StorageSpec::new(kind)).unwrap();
    let (mine, back, expected) = (
        new(StorageKind::Pinned),
        new(StorageKind::System),
        new(StorageKind::System),
    );
    let layouts = common::ClientLayouts {
        mine: &mine,
        back: &back,
        expected: &expected,
    };
    let (read, write) = common::exchange(&ctx, &peer.layouts()[0], layouts, dir);
    // 2 KiB pieces: both ways through the server's landing arena.
    assert!(read.bounced && write.bounced, "{read:?} {write:?}");
    assert_eq!(read.plan, Plan::Direct(Strategy::NixlReadFlipped));
    assert_eq!(write.plan, Plan::Direct(Strategy::NixlWrite));
}

/// Two processes exchange metadata through files and move data both ways, with a notification.
fn two_processes_move_data_both_ways() {
    let dir = common::scratch_dir("2proc");
    let mut server = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, &dir)
        .spawn()
        .unwrap();
    peer_client(&dir);
    let status = server.wait().unwrap();
    assert!(status.success(), "server failed: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The same exchange between two network namespaces joined by a veth pair, UCX over TCP only:
/// kvxfer between hosts, not through shared memory.
fn two_hosts_over_tcp_in_network_namespaces() {
    let id = std::process::id() % 200 + 20;
    let (na, nb) = (format!("kvxa{id}"), format!("kvxb{id}"));
    let (va, vb) = (format!("kvxva{id}"), format!("kvxvb{id}"));
    let (aa, ab) = (format!("10.231.{id}.1"), format!("10.231.{id}.2"));
    if !ip(&["netns", "add", &na]) {
        return skip("cannot create network namespaces here (needs root and iproute2)");
    }
    let setup = ip(&["netns", "add", &nb])
        && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
        && ip(&["link", "set", &va, "netns", &na])
        && ip(&["link", "set", &vb, "netns", &nb])
        && ip(&["-n", &na, "addr", "add", &format!("{aa}/24"), "dev", &va])
        && ip(&["-n", &nb, "addr", "add", &format!("{ab}/24"), "dev", &vb])
        && ip(&["-n", &na, "link", "set", &va, "up"])
        && ip(&["-n", &nb, "link", "set", &vb, "up"])
        && ip(&["-n", &na, "link", "set", "lo", "up"])
        && ip(&["-n", &nb, "link", "set", "lo", "up"]);
    let dir = std::env::temp_dir().join(format!("kvx-netns-{}", std::process::id()));
    let result = std::panic::catch_unwind(|| {
        assert!(setup, "setting up the veth pair failed");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let run = |ns: &str, dev: &str, role: &str| {
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&exe)
                .env(role, &dir)
                .env("UCX_TLS", "tcp,self")
                .env("UCX_NET_DEVICES", dev)
                .spawn()
                .unwrap()
        };
        let mut server = run(&na, &va, ROLE);
        let client = run(&nb, &vb, CLIENT_ROLE).wait().unwrap();
        let server = server.wait().unwrap();
        assert!(client.success(), "client in {nb} failed: {client}");
        assert!(server.success(), "server in {na} failed: {server}");
    });
    ip(&["netns", "del", &na]);
    ip(&["netns", "del", &nb]);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Server role that exports a layout and then waits to be killed.
fn peer_holder(dir: &Path) {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let c = disk_config(LayoutKind::FullyContiguous);
    let pool = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    common::publish(dir, "holder.peer", &ctx.export(&[&pool]).unwrap());
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// The export id of the first layout of an export (format 4, read by hand).
fn first_export_id(blob: &[u8]) -> u64 {
    let u16_at = |at: usize| u16::from_le_bytes([blob[at], blob[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
    let mut at = 24; // magic, version, flags, length, checksum
    at += 2 + u16_at(at); // agent name
    at += 4 + u32_at(at); // NIXL metadata
    at += 16 + 4 + 8 + 20 + 24 + 4; // host, pid, start, arenas (host, device), layout count
    u64::from_le_bytes(blob[at..at + 8].try_into().unwrap())
}

/// A landing request as kvxfer's control messages frame it (without a peer key).
fn scatter_message(slot: u32, id: u64, pieces: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut m = b"\0kvxfer-control\0".to_vec();
    m.push(6); // SCATTER
    m.extend_from_slice(&slot.to_le_bytes());
    m.extend_from_slice(&7u64.to_le_bytes());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for &(off, addr, len) in pieces {
        for v in [off, addr, len] {
            m.extend_from_slice(&v.to_le_bytes());
        }
    }
    m.extend_from_slice(&0u32.to_le_bytes());
    m
}

/// Landing requests an exporter must refuse, sent by a peer that imported the layout: another
/// importer's slot, pieces outside the layout or the slot, an id it never exported, a layout
/// the sender did not import, a truncated message. Nothing is written; a real transfer then
/// still lands.
fn forged_landing_requests_write_nothing() {
    let a = Context::new(ContextConfig::default()).unwrap();
    let c = disk_config(LayoutKind::FullyContiguous);
    let pool = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let other = a
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let all: Vec<u64> = (0..12).collect();
    a.fill(&pool, &all, 5).unwrap();
    a.fill(&other, &all, 6).unwrap();
    let (before, other_before) = (
        a.checksum(&pool, &all).unwrap(),
        a.checksum(&other, &all).unwrap(),
    );
    let blob = a.export(&[&pool]).unwrap();
    let id = first_export_id(&blob);
    let other_id = first_export_id(&a.export(&[&other]).unwrap());
    // The first importer holds slots 0..4, the forger the next four.
    let b = Context::new(ContextConfig::default()).unwrap();
    let b_peer = b.import(&blob).unwrap();
    let forger = Context::new(ContextConfig::default()).unwrap();
    let _forger_peer = forger.import(&blob).unwrap();
    let at = pool.region(0, 0, 0).unwrap();
    let slot_bytes = 4u64 << 20;
    let mut truncated = scatter_message(4, id, &[(0, at.addr, 64)]);
    truncated.truncate(truncated.len() - 6);
    let forged = [
        scatter_message(0, id, &[(0, at.addr, 64)]), // the first importer's slot
        scatter_message(4, id, &[(0, at.addr - 64, 64)]), // before the layout
        scatter_message(4, id, &[(0, at.addr + at.len * 12 * 3 * 2, 64)]), // past it
        scatter_message(4, id, &[(slot_bytes - 8, at.addr, 64)]), // past the slot
        scatter_message(4, id ^ 1, &[(0, at.addr, 64)]), // an id never exported
        scatter_message(4, other_id, &[(0, other.region(0, 0, 0).unwrap().addr, 64)]), // not imported
        scatter_message(99, id, &[(0, at.addr, 64)]), // no such slot
        truncated,
    ];
    let agent = forger.nixl_agent().unwrap();
    for m in &forged {
        agent.send_notification(a.name(), m, None).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        a.checksum(&pool, &all).unwrap(),
        before,
        "a forged request wrote"
    );
    assert_eq!(a.checksum(&other, &all).unwrap(), other_before);
    // The same framing with the forger's own slot and a piece inside the layout it imported is
    // placed (64 zero bytes of its slot into block 0): the refusals above were not for form.
    agent
        .send_notification(a.name(), &scatter_message(4, id, &[(0, at.addr, 64)]), None)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while a.checksum(&pool, &[0]).unwrap()[0] == before[0] {
        assert!(
            std::time::Instant::now() < deadline,
            "a well-formed request was not placed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The first importer's own transfer still lands.
    let src = b
        .new_layout(
            disk_config(LayoutKind::LayerSeparateOuterFirst),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    b.fill(&src, &all, 9).unwrap();
    let rev: Vec<u64> = all.iter().rev().copied().collect();
    let t = b
        .submit(&src, &all, &b_peer.layouts()[0], &rev, &Default::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    assert!(t.stats().bounced);
    assert_eq!(
        a.checksum(&pool, &rev).unwrap(),
        b.checksum(&src, &all).unwrap()
    );
}

const ARENA_ROLE: &str = "KVX_TEST_ARENA_IMPORTER_ROLE";

/// An importer that takes its share of the exporter's landing arena and waits to be killed.
fn arena_importer(dir: &Path) {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let peer = ctx.import(&std::fs::read(dir.join("arena.peer")).unwrap());
    let _peer = peer.unwrap();
    common::publish(dir, &format!("imported.{}", std::process::id()), b"");
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// Whether a write of 2 KiB pieces from a new importer goes through the exporter's arena.
fn lands(blob: &[u8]) -> bool {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let peer = ctx.import(blob).unwrap();
    let src = ctx
        .new_layout(
            disk_config(LayoutKind::LayerSeparateOuterFirst),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    let ids: Vec<u64> = (0..12).collect();
    let rev: Vec<u64> = ids.iter().rev().copied().collect();
    let t = ctx
        .submit(&src, &ids, &peer.layouts()[0], &rev, &Default::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    t.stats().bounced
}

/// The exporter's landing arena is shared out to importers; once it is taken, more importers
/// write piece by piece, and the slots of importers that died come back within seconds.
fn landing_slots_of_dead_importers_come_back() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let pool = ctx
        .new_layout(
            disk_config(LayoutKind::FullyContiguous),
            &StorageSpec::new(StorageKind::System),
        )
        .unwrap();
    let blob = ctx.export(&[&pool]).unwrap();
    let dir = common::scratch_dir("arena");
    common::publish(&dir, "arena.peer", &blob);
    // Four importers take the sixteen slots.
    let mut children: Vec<std::process::Child> = (0..4)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env(ARENA_ROLE, &dir)
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &children {
        common::wait_for(&dir.join(format!("imported.{}", c.id())), "an importer");
    }
    assert!(!lands(&blob), "a fifth importer finds the arena taken");
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lands(&blob) {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead importers' slots never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a peer dies, transfers to and from it fail with Error::Peer within 5 s, and nothing
/// hangs: submit, wait and free all return.
fn a_dead_peer_fails_within_five_seconds() {
    let dir = common::scratch_dir("dead");
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .env(HOLD_ROLE, &dir)
        .spawn()
        .unwrap();
    let peer_file = dir.join("holder.peer");
    common::wait_for_child(&peer_file, "the holder's export", &mut holder);
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let peer = ctx.import(&std::fs::read(&peer_file).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    let c = disk_config(LayoutKind::FullyContiguous);
    let mine = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    let live = ctx
        .submit(&mine, &[0], remote, &[0], &TransferOptions::default())
        .unwrap();
    live.wait(Some(std::time::Duration::from_secs(30))).unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let started = std::time::Instant::now();
    let remote: &kvxfer::Layout = remote;
    for (src, dst) in [(&mine, remote), (remote, &mine)] {
        let outcome = ctx
            .submit(src, &[1], dst, &[1], &TransferOptions::default())
            .and_then(|t| t.wait(Some(std::time::Duration::from_secs(5))));
        assert!(matches!(outcome, Err(Error::Peer(_))), "{outcome:?}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(peer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Host -> disk -> disk -> host with reversed ids; the disk -> disk hop goes through the
/// context's pinned bounce buffers in several pipelined chunks (16 MiB against 8 MiB chunks).
fn host_disk_disk_host_with_reversed_ids() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let c = LayoutConfig {
        num_blocks: 64,
        num_layers: 4,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 1024,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Default::default(),
    };
    let all: Vec<u64> = (0..64).collect();
    let rev: Vec<u64> = (0..64).rev().collect();
    let host = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    let d1 = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::Disk))
        .unwrap();
    let fc = LayoutConfig {
        kind: LayoutKind::FullyContiguous,
        ..c
    };
    let d2 = ctx
        .new_layout(fc, &StorageSpec::new(StorageKind::Disk))
        .unwrap();
    let back = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    ctx.fill(&host, &all, 31).unwrap();
    let want = ctx.checksum(&host, &all).unwrap();
    let plan = ctx.plan(&d1, &d2).unwrap();
    assert!(matches!(plan, Plan::TwoHop { .. }), "{plan:?}");
    let t = ctx
        .submit(&host, &all, &d1, &rev, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    let t = ctx
        .submit(&d1, &rev, &d2, &all, &TransferOptions::default())
        .unwrap();
    t.wait(Some(std::time::Duration::from_secs(60))).unwrap();
    assert_eq!(t.stats().plan, plan);
    assert!(t.stats().bounced);
    assert_eq!(ctx.checksum(&d2, &all).unwrap(), want);
    let t = ctx
        .submit(&d2, &all, &back, &rev, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(ctx.checksum(&back, &rev).unwrap(), want);
    // Two at once share the bounded pool.
    let a = ctx
        .submit(
            &d1,
            &rev[..32],
            &d2,
            &all[..32],
            &TransferOptions::default(),
        )
        .unwrap();
    let b = ctx
        .submit(
            &d1,
            &rev[32..],
            &d2,
            &all[32..],
            &TransferOptions::default(),
        )
        .unwrap();
    a.wait(None).unwrap();
    b.wait(None).unwrap();
    assert_eq!(ctx.checksum(&d2, &all).unwrap(), want);
}

/// A disk layout on a 1 MiB tmpfs: writing 4 MiB into it fails with Error::Io, not success.
fn a_full_disk_is_an_io_error() {
    let mnt = std::env::temp_dir().join(format!("kvx-full-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let _ = std::fs::remove_dir(&mnt);
        return skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)");
    }
    let result = std::panic::catch_unwind(|| {
        let ctx = Context::new(ContextConfig {
            disk_dir: Some(mnt.clone()),
            ..Default::default()
        })
        .unwrap();
        let c = LayoutConfig {
            num_blocks: 16,
            num_layers: 1,
            outer_dim: 2,
            page_size: 16,
            inner_dim: 4096,
            dtype_width: 2,
            alignment: 1,
            kind: LayoutKind::FullyContiguous,
            heads: Default::default(),
        }; // 16 blocks of 256 KiB: 4 MiB on a 1 MiB file system
        let all: Vec<u64> = (0..16).collect();
        let host = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::System))
            .unwrap();
        let disk = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Disk))
            .unwrap();
        ctx.fill(&host, &all, 3).unwrap();
        let outcome = ctx
            .submit(&host, &all, &disk, &all, &TransferOptions::default())
            .and_then(|t| t.wait(Some(std::time::Duration::from_secs(30))));
        assert!(matches!(outcome, Err(Error::Io(_))), "{outcome:?}");
        // The failure is counted against NIXL and the write strategy, the fill's bytes not.
        let s = ctx.stats();
        let (nixl, write) = (
            s.by_mechanism[kvxfer::Mechanism::Nixl as usize],
            s.by_strategy[kvxfer::Strategy::NixlWrite as usize],
        );
        assert_eq!((nixl.transfers, nixl.errors), (1, 1), "{s:?}");
        assert_eq!(
            (write.transfers, write.errors, write.bytes),
            (1, 1, 4 << 20),
            "{s:?}"
        );
    });
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

const INFLIGHT_ROLE: &str = "KVX_TEST_INFLIGHT_ROLE";
/// How long the in-flight client lets its transfer run before killing the peer, in ms.
const KILL_AFTER_MS: &str = "KVX_TEST_KILL_AFTER_MS";
/// Exit code of the in-flight client when the transfer finished before the kill.
const TOO_FAST: i32 = 3;

/// With this set, the in-flight test moves 4 KiB pieces (through the peer's landing arena).
const SMALL_PIECES: &str = "KVX_TEST_SMALL_PIECES";

fn big_config() -> LayoutConfig {
    let small = std::env::var_os(SMALL_PIECES).is_some();
    LayoutConfig {
        num_blocks: if small { 4096 } else { 512 },
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: if small { 128 } else { 1024 },
        dtype_width: 2,
        alignment: 1,
        kind: if small {
            LayoutKind::LayerSeparateBlockFirst
        } else {
            LayoutKind::FullyContiguous
        },
        heads: Default::default(),
    } // 1 GiB
}

/// Holder for the in-flight test: exports 1 GiB, records its pid, waits to be killed.
fn inflight_holder(dir: &Path) {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let pool = ctx
        .new_layout(big_config(), &StorageSpec::new(StorageKind::System))
        .unwrap();
    std::fs::write(dir.join("holder.pid"), std::process::id().to_string()).unwrap();
    common::publish(dir, "big.peer", &ctx.export(&[&pool]).unwrap());
    std::thread::sleep(std::time::Duration::from_secs(120));
}

/// Client for the in-flight test: starts a 1 GiB write, kills the holder while it runs, and
/// expects Error::Peer within 5 s and a free that returns.
fn inflight_client(dir: &Path) {
    common::wait_for(&dir.join("big.peer"), "the holder's export");
    let pid: i32 = std::fs::read_to_string(dir.join("holder.pid"))
        .unwrap()
        .parse()
        .unwrap();
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let peer = ctx
        .import(&std::fs::read(dir.join("big.peer")).unwrap())
        .unwrap();
    let remote = &peer.layouts()[0];
    let mine = ctx
        .new_layout(big_config(), &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    let all: Vec<u64> = (0..big_config().num_blocks).collect();
    // Reversed destinations: the pieces stay apart, whatever the layout.
    let rev: Vec<u64> = all.iter().rev().copied().collect();
    let t = ctx
        .submit(&mine, &all, remote, &rev, &TransferOptions::default())
        .unwrap();
    let kill_after: u64 = std::env::var(KILL_AFTER_MS).unwrap().parse().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(kill_after));
    if t.poll().is_some() {
        std::process::exit(TOO_FAST);
    }
    // SAFETY: sending SIGKILL to the holder process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    let outcome = t.wait(Some(std::time::Duration::from_secs(5)));
    assert!(matches!(outcome, Err(Error::Peer(_))), "{outcome:?}");
    assert!(killed.elapsed() < std::time::Duration::from_secs(5));
    let freeing = std::time::Instant::now();
    drop(t);
    drop(peer);
    assert!(freeing.elapsed() < std::time::Duration::from_secs(5));
}

/// A peer killed while a transfer to it is in flight, over TCP and over UCX's default
/// transports (shared memory on one machine, where UCX copies inside the post: the submitting
/// thread must not be the one that waits for it): the transfer fails with Error::Peer within
/// 5 s and freeing it does not hang.
fn a_peer_killed_mid_transfer_fails_within_five_seconds() {
    let exe = std::env::current_exe().unwrap();
    // (UCX_TLS, when to kill, 4 KiB pieces): shared memory moves the 1 GiB in well under a
    // second; 4 KiB pieces go through the holder's landing arena.
    for (tls, kill_after, small) in [
        (Some("tcp,self"), "100", false),
        (None, "10", false),
        (Some("tcp,self"), "100", true),
        (None, "20", true),
    ] {
        let dir = common::scratch_dir("inflight");
        let spawn = |role: &str| {
            let mut c = Command::new(&exe);
            c.env(role, &dir).env(KILL_AFTER_MS, kill_after);
            if let Some(tls) = tls {
                c.env("UCX_TLS", tls);
            }
            if small {
                c.env(SMALL_PIECES, "1");
            }
            c.spawn().unwrap()
        };
        let mut holder = spawn(HOLD_ROLE_BIG);
        let client = spawn(INFLIGHT_ROLE).wait().unwrap();
        let _ = holder.kill();
        let _ = holder.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let transports = format!(
            "{}{}",
            tls.unwrap_or("UCX's defaults"),
            if small { ", 4 KiB pieces" } else { "" }
        );
        if client.code() == Some(TOO_FAST) {
            skip(&format!(
                "over {transports} the transfer finished before the peer could be killed"
            ));
            continue;
        }
        assert!(
            client.success(),
            "in-flight client over {transports} failed: {client}"
        );
    }
}

/// Aligned transfers use the file's O_DIRECT descriptor where the file system allows it; the
/// data is the same through the buffered descriptor (fill and checksum use that one).
fn o_direct_where_the_file_system_allows() {
    let ctx = Context::new(ContextConfig::default()).unwrap();
    let c = LayoutConfig {
        num_blocks: 16,
        num_layers: 2,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 128,
        dtype_width: 2,
        alignment: 4096,
        kind: LayoutKind::LayerSeparateOuterFirst,
        heads: Default::default(),
    }; // 4 KiB regions: every copy is O_DIRECT-aligned
    let disk = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::Disk))
        .unwrap();
    let file = disk.memory().disk_file().unwrap();
    if file.direct_fd().is_none() {
        return skip("this file system refuses O_DIRECT");
    }
    let all: Vec<u64> = (0..16).collect();
    let rev: Vec<u64> = (0..16).rev().collect();
    let host = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::Pinned))
        .unwrap();
    let back = ctx
        .new_layout(c, &StorageSpec::new(StorageKind::System))
        .unwrap();
    ctx.fill(&host, &all, 11).unwrap();
    let t = ctx
        .submit(&host, &all, &disk, &rev, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(
        ctx.checksum(&disk, &rev).unwrap(),
        ctx.checksum(&host, &all).unwrap()
    );
    // And a buffered write (fill) read back through O_DIRECT.
    ctx.fill(&disk, &all, 12).unwrap();
    let t = ctx
        .submit(&disk, &all, &back, &all, &TransferOptions::default())
        .unwrap();
    t.wait(None).unwrap();
    assert_eq!(
        ctx.checksum(&back, &all).unwrap(),
        ctx.checksum(&disk, &all).unwrap()
    );
}

fn main() {
    // Child processes of the tests: the role named in the environment, nothing else.
    let roles: [Role; 7] = [
        (ARENA_ROLE, arena_importer),
        (NO_NIXL_ROLE, no_nixl_child),
        (HOLD_ROLE_BIG, inflight_holder),
        (INFLIGHT_ROLE, inflight_client),
        (CLIENT_ROLE, peer_client),
        (HOLD_ROLE, peer_holder),
        (ROLE, peer_server),
    ];
    let tests = tests![
        default_context_makes_an_agent_with_ucx_and_posix,
        generated_agent_names_are_unique,
        a_backend_that_cannot_be_created_is_named,
        missing_nixl_is_unavailable_not_an_abort,
        export_and_import_between_two_contexts,
        malformed_imports_are_refused,
        host_disk_host_with_reversed_ids,
        few_blocks_to_and_from_disk_in_every_kind_pair,
        disk_layout_persists_across_reopen,
        write_to_and_read_from_a_peer_with_a_notification,
        many_small_piece_transfers_to_one_peer_at_once,
        landing_slots_of_dead_importers_come_back,
        forged_landing_requests_write_nothing,
        head_transforms_to_and_from_a_peer_and_a_disk,
        gpu_rdma_setup_splits_long_lists_over_ucx_threads,
        two_processes_move_data_both_ways,
        a_dead_peer_fails_within_five_seconds,
        host_disk_disk_host_with_reversed_ids,
        a_full_disk_is_an_io_error,
        two_hosts_over_tcp_in_network_namespaces,
        a_peer_killed_mid_transfer_fails_within_five_seconds,
        o_direct_where_the_file_system_allows,
    ];
    harness::main(&roles, &tests);
}
