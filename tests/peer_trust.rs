//! What a hostile or buggy peer can and cannot do to a process, through kvxfer's peer
//! exports: with a peer key nothing unauthenticated reaches NIXL; forged metadata that does
//! reach it is checked first where kvxfer can; peers keep what they use alive. Tests that hand
//! forged bytes to an importing context run in a child process inside a network namespace of
//! its own with only loopback up (common::enter_private_network): UCX connects at once to
//! whatever addresses a blob holds. Without NIXL every test reports itself skipped.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::harness::{self, Role, skip};
use kvxfer::{
    Context, ContextConfig, Error, Layout, LayoutConfig, LayoutKind, PeerKey, StorageKind,
    StorageSpec, TransferOptions,
};
use xxhash_rust::xxh3::xxh3_64;

const SECRET: &[u8] = b"kvxfer test deployment secret";
/// Bytes of the export header: magic, version, flags, length, checksum.
const HEADER: usize = 24;
const MAC_LEN: usize = 32;

fn keyed(secret: Option<&[u8]>) -> Context {
    Context::new(ContextConfig {
        peer_key: secret.map(|s| PeerKey::new(s).unwrap()),
        ..Default::default()
    })
    .unwrap()
}

fn config(blocks: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 2,
        outer_dim: 2,
        page_size: 4,
        inner_dim: 256,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Default::default(),
    }
}

fn host(ctx: &Context, blocks: u64) -> Layout {
    ctx.new_layout(config(blocks), &StorageSpec::new(StorageKind::System))
        .unwrap()
}

fn go(ctx: &Context, src: &Layout, dst: &Layout, ids: &[u64]) -> kvxfer::Result<()> {
    ctx.submit(src, ids, dst, ids, &TransferOptions::default())?
        .wait(Some(Duration::from_secs(30)))
}

/// Recomputes length and checksum of a (mutated) export, as anyone can; `mac` says whether the
/// blob ends in a MAC, which is left as it is.
fn reseal(b: &mut [u8], mac: bool) {
    let total = b.len() as u32;
    b[12..16].copy_from_slice(&total.to_le_bytes());
    let end = b.len() - if mac { MAC_LEN } else { 0 };
    let sum = xxh3_64(&b[HEADER..end]);
    b[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// Two contexts with the same key exchange blocks; a context with another key, or none, and
/// a keyed context given an unkeyed export, refuse with Error::Peer.
fn keyed_contexts_trust_only_each_other() {
    let (a, b) = (keyed(Some(SECRET)), keyed(Some(SECRET)));
    let pool = host(&a, 4);
    let all = common::all(4);
    a.fill(&pool, &all, 3).unwrap();
    let blob = a.export(&[&pool]).unwrap();
    let peer = b.import(&blob).unwrap();
    let mine = host(&b, 4);
    go(&b, &peer.layouts()[0], &mine, &all).unwrap();
    assert_eq!(
        b.checksum(&mine, &all).unwrap(),
        a.checksum(&pool, &all).unwrap()
    );
    let other = keyed(Some(b"another deployment's secret"));
    let none = keyed(None);
    for (who, ctx) in [("another key", &other), ("no key", &none)] {
        match ctx.import(&blob) {
            Err(Error::Peer(m)) => assert!(m.contains("peer_key"), "{who}: {m}"),
            r => panic!("{who}: {r:?}"),
        }
    }
    let plain = none.export(&[&host(&none, 4)]).unwrap();
    assert!(matches!(b.import(&plain), Err(Error::Peer(_))));
    assert!(matches!(
        PeerKey::new(b"short"),
        Err(Error::InvalidArgument(_))
    ));
}

const FORGE_ROLE: &str = "KVX_TEST_FORGE_ROLE";
/// Forged exports a keyed importer is given.
const FORGERIES: u64 = 1_000_000;

/// A MAC as kvxfer makes it (peer.rs), under a key the importer does not have.
fn mac_with(secret: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    let key = blake3::derive_key("kvxfer peer export MAC, version 1", secret);
    *blake3::keyed_hash(&key, data).as_bytes()
}

/// FORGE_ROLE (in a private network namespace): a keyed importer is given FORGERIES exports
/// made from a real keyed one: one to four bytes changed, then length and checksum
/// recomputed as anyone can, and the MAC kept, dropped (an unkeyed export), or remade under the
/// attacker's own key. None is accepted; none crashes or hangs the process.
fn forge(dir: &Path) {
    common::enter_private_network();
    let (a, b) = (keyed(Some(SECRET)), keyed(Some(SECRET)));
    let pool = host(&a, 4);
    let real = a.export(&[&pool]).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x6b7678);
    let started = Instant::now();
    let (mut refused, mut slowest) = (0u64, Duration::ZERO);
    for i in 0..FORGERIES {
        let mut m = real.clone();
        // Anywhere but length and checksum, which resealing recomputes (a change only there
        // would give back the real export).
        let mut at: Vec<usize> = (0..rng.usize(1..=4))
            .map(|_| match rng.usize(..m.len() - 12) {
                at if at < 12 => at,
                at => at + 12,
            })
            .collect();
        at.sort_unstable();
        at.dedup();
        for at in at {
            m[at] ^= rng.u8(1..);
        }
        match i % 3 {
            // The original MAC, now over other bytes.
            0 => reseal(&mut m, true),
            // No MAC: an unkeyed export.
            1 => {
                m.truncate(m.len() - MAC_LEN);
                m[10..12].copy_from_slice(&0u16.to_le_bytes());
                reseal(&mut m, false);
            }
            // A MAC under the attacker's own key.
            _ => {
                m[10..12].copy_from_slice(&1u16.to_le_bytes());
                reseal(&mut m, true);
                let signed = m.len() - MAC_LEN;
                let tag = mac_with(b"the attacker's own secret", &m[..signed]);
                m[signed..].copy_from_slice(&tag);
            }
        }
        let t = Instant::now();
        match b.import(&m) {
            Err(Error::Peer(_)) => refused += 1,
            other => panic!("forgery {i} was not refused: {other:?}"),
        }
        slowest = slowest.max(t.elapsed());
    }
    assert_eq!(refused, FORGERIES);
    // The real export still imports: the refusals were about the forgeries.
    assert!(b.import(&real).is_ok());
    let line = format!(
        "{FORGERIES} forged exports refused in {:.1} s, slowest import {} us",
        started.elapsed().as_secs_f64(),
        slowest.as_micros()
    );
    std::fs::write(dir.join("forge.txt"), line).unwrap();
}

fn a_million_forged_exports_are_refused_before_nixl() {
    let dir = common::scratch_dir("forge");
    let started = Instant::now();
    if !common::run_role(FORGE_ROLE, &dir) {
        return skip("cannot make a network namespace here (needs root)");
    }
    let report = std::fs::read_to_string(dir.join("forge.txt")).unwrap();
    println!(
        "  {report} ({:.1} s with start-up)",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const NAME_ROLE: &str = "KVX_TEST_FORGED_NAME_ROLE";

/// NAME_ROLE (in a private network namespace): an unkeyed importer is given exports whose NIXL
/// metadata names its agent in bytes that are not UTF-8 (which nixl-sys unwraps into a panic),
/// with a NUL, or other than the export says; resealed, so only the metadata is wrong. Each is
/// Error::Peer, and the importer keeps working.
fn forged_names(_: &Path) {
    common::enter_private_network();
    let (a, b) = (keyed(None), keyed(None));
    let pool = host(&a, 4);
    let real = a.export(&[&pool]).unwrap();
    // Body: agent name (u16 length, bytes), NIXL metadata (u32 length, bytes), layouts.
    let name_len = u16::from_le_bytes([real[HEADER], real[HEADER + 1]]) as usize;
    let md_at = HEADER + 2 + name_len + 4;
    let md_name_at = md_at + b"nixlSerDes|Agent".len() + 8;
    assert_eq!(
        &real[md_name_at..md_name_at + name_len],
        a.name().as_bytes()
    );
    for forged in [&b"\xff"[..], b"\0", b"Z"] {
        let mut m = real.clone();
        m[md_name_at..md_name_at + forged.len()].copy_from_slice(forged);
        reseal(&mut m, false);
        match b.import(&m) {
            Err(Error::Peer(msg)) => assert!(msg.contains("agent"), "{msg}"),
            other => panic!("{forged:?} in the metadata's agent name: {other:?}"),
        }
    }
    let peer = b.import(&real).unwrap();
    let mine = host(&b, 4);
    go(&b, &mine, &peer.layouts()[0], &common::all(4)).unwrap();
}

fn a_forged_agent_name_in_nixl_metadata_is_refused() {
    let dir = common::scratch_dir("forged-name");
    if !common::run_role(NAME_ROLE, &dir) {
        return skip("cannot make a network namespace here (needs root)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two imports of one peer (the same export twice, and a later export): each peer handle keeps
/// the peer's metadata loaded for as long as it lives, whatever the others do.
fn each_import_keeps_the_peers_metadata_alive() {
    let (a, b) = (keyed(None), keyed(None));
    let (l1, l2) = (host(&a, 4), host(&a, 4));
    let (first, second) = (a.export(&[&l1]).unwrap(), a.export(&[&l2]).unwrap());
    let all = common::all(4);
    let mine = host(&b, 4);
    b.fill(&mine, &all, 8).unwrap();
    let p1 = b.import(&first).unwrap();
    let p2 = b.import(&first).unwrap();
    let p3 = b.import(&second).unwrap();
    let (r2, r3) = (p2.layouts()[0].clone(), p3.layouts()[0].clone());
    drop(p1);
    go(&b, &mine, &r2, &all).unwrap();
    drop(p2);
    go(&b, &mine, &r3, &all).unwrap();
    assert_eq!(
        a.checksum(&l1, &all).unwrap(),
        b.checksum(&mine, &all).unwrap()
    );
    assert_eq!(
        a.checksum(&l2, &all).unwrap(),
        b.checksum(&mine, &all).unwrap()
    );
    // With the last peer handle gone, the metadata is unloaded: layouts of the dropped peers
    // are refused by NIXL, never written through stale metadata.
    drop(p3);
    assert!(matches!(go(&b, &mine, &r3, &all), Err(Error::Peer(_))));
    // And a new import loads it again.
    let p4 = b.import(&second).unwrap();
    go(&b, &mine, &p4.layouts()[0], &all).unwrap();
}

const STALE_SERVER: &str = "KVX_TEST_STALE_SERVER_ROLE";
const STALE_CLIENT: &str = "KVX_TEST_STALE_CLIENT_ROLE";

/// 16 blocks of 128 KiB, one contiguous allocation.
fn stale_config() -> LayoutConfig {
    LayoutConfig {
        num_blocks: 16,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: 64 << 10,
        dtype_width: 2,
        alignment: 1,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    }
}

/// STALE_SERVER: exports L, frees it once the client wrote, makes L2 of the same config (in
/// the same place where the allocator gives it back) and fills it; after the client's stale
/// write, L2 must be as it was.
fn stale_server(dir: &Path) {
    let ctx = keyed(None);
    let all = common::all(16);
    let l = ctx
        .new_layout(stale_config(), &StorageSpec::new(StorageKind::System))
        .unwrap();
    let first = l.region(0, 0, 0).unwrap().addr;
    common::publish(dir, "a.peer", &ctx.export(&[&l]).unwrap());
    common::wait_for(&dir.join("b.wrote"), "the client's first write");
    let freeing = Instant::now();
    drop(l);
    let freed_in = freeing.elapsed();
    let l2 = ctx
        .new_layout(stale_config(), &StorageSpec::new(StorageKind::System))
        .unwrap();
    let same_place = l2.region(0, 0, 0).unwrap().addr == first;
    ctx.fill(&l2, &all, 2).unwrap();
    let before = ctx.checksum(&l2, &all).unwrap();
    common::publish(
        dir,
        "a.freed",
        format!(
            "freed in {} us, L2 at L's address: {same_place}",
            freed_in.as_micros()
        )
        .as_bytes(),
    );
    common::wait_for(&dir.join("b.done"), "the client's stale write");
    assert_eq!(ctx.checksum(&l2, &all).unwrap(), before, "L2 was written");
}

/// STALE_CLIENT: imports L, writes it once, then after the server freed it writes again:
/// Error::Peer, at submit or at wait.
fn stale_client(dir: &Path) {
    common::wait_for(&dir.join("a.peer"), "the server's export");
    let ctx = keyed(None);
    let peer = ctx
        .import(&std::fs::read(dir.join("a.peer")).unwrap())
        .unwrap();
    let remote = &peer.layouts()[0];
    let mine = ctx
        .new_layout(stale_config(), &StorageSpec::new(StorageKind::System))
        .unwrap();
    let all = common::all(16);
    ctx.fill(&mine, &all, 9).unwrap();
    go(&ctx, &mine, remote, &all).unwrap();
    common::publish(dir, "b.wrote", b"");
    common::wait_for(&dir.join("a.freed"), "the server's free");
    let stale = go(&ctx, &mine, remote, &all);
    assert!(matches!(stale, Err(Error::Peer(_))), "{stale:?}");
    let stale = go(&ctx, remote, &mine, &all);
    assert!(matches!(stale, Err(Error::Peer(_))), "{stale:?}");
    common::publish(dir, "b.done", b"");
}

/// A frees an exported layout and makes another of the same config; B's transfers through its
/// stale import fail with Error::Peer and A's new layout is untouched: over UCX's default
/// (shared-memory) transports, which need no registration to write, and over TCP.
fn a_freed_export_is_never_written_by_its_importers() {
    let exe = std::env::current_exe().unwrap();
    for tls in [None, Some("tcp,self")] {
        let dir = common::scratch_dir("stale");
        let spawn = |role: &str| {
            let mut c = std::process::Command::new(&exe);
            c.env(role, &dir);
            if let Some(t) = tls {
                c.env("UCX_TLS", t);
            }
            c.spawn().unwrap()
        };
        let mut server = spawn(STALE_SERVER);
        let client = spawn(STALE_CLIENT).wait().unwrap();
        let server = server.wait().unwrap();
        let how = tls.unwrap_or("UCX's defaults");
        assert!(client.success(), "client over {how} failed: {client}");
        assert!(server.success(), "server over {how} failed: {server}");
        let report = std::fs::read_to_string(dir.join("a.freed")).unwrap_or_default();
        println!("  over {how}: {report}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// An importer that is gone by the time the exporter frees its layout delays the free by at
/// most the dead-peer time, and the free completes.
fn a_dead_importer_delays_a_free_by_at_most_five_seconds() {
    let (a, b) = (keyed(None), keyed(None));
    let l = host(&a, 4);
    let peer = b.import(&a.export(&[&l]).unwrap()).unwrap();
    let mine = host(&b, 4);
    go(&b, &mine, &peer.layouts()[0], &common::all(4)).unwrap();
    // B's agent goes away without giving the import up (as a killed process would).
    std::mem::forget(peer);
    drop(b);
    let t = Instant::now();
    drop(l);
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
}

fn main() {
    let roles: [Role; 4] = [
        (FORGE_ROLE, forge),
        (NAME_ROLE, forged_names),
        (STALE_SERVER, stale_server),
        (STALE_CLIENT, stale_client),
    ];
    let tests = tests![
        keyed_contexts_trust_only_each_other,
        a_million_forged_exports_are_refused_before_nixl,
        a_forged_agent_name_in_nixl_metadata_is_refused,
        each_import_keeps_the_peers_metadata_alive,
        a_freed_export_is_never_written_by_its_importers,
        a_dead_importer_delays_a_free_by_at_most_five_seconds,
    ];
    harness::main(&roles, &tests);
}
