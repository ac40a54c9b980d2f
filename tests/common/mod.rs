//! Helpers the integration tests share: scratch folders, files two processes exchange, and
//! both halves of the peer exchange the NIXL and GPU tests run between two processes.
// Each test crate uses some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvxfer::{Context, Layout, TransferOptions, TransferStats};

/// The bytes of head `h` of token `t` in (block, layer, outer) of a host-addressable layout
/// that describes its heads, by the layout's own formula (NHD: `[page][head][dim]`, HND:
/// `[head][page][dim]`), independent of kvxfer's transform code.
pub fn head_slice(l: &Layout, b: u64, layer: u64, o: u64, t: u64, h: u32) -> Vec<u8> {
    let c = l.config();
    let hb = c.inner_dim / u64::from(c.heads.num_heads) * u64::from(c.dtype_width);
    let (n, i) = (
        u64::from(c.heads.num_heads),
        u64::from(h - c.heads.head_begin),
    );
    let off = match c.heads.order {
        kvxfer::HeadOrder::TokenMajor => (t * n + i) * hb,
        kvxfer::HeadOrder::HeadMajor => (i * c.page_size + t) * hb,
    };
    let r = l.region(b, layer, o).unwrap();
    // SAFETY: a region of a live host layout (System or Pinned); `off + hb` lies inside it.
    unsafe { std::slice::from_raw_parts((r.addr + off) as *const u8, hb as usize) }.to_vec()
}

/// Block ids 0..n.
pub fn all(n: u64) -> Vec<u64> {
    (0..n).collect()
}

/// An empty folder of this process named after `what`.
pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvx-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits up to a minute for another process to publish `path`.
pub fn wait_for(path: &Path, what: &str) {
    wait_for_file(path, what, None);
}

/// As `wait_for`, for a file `child` writes: fails at once, with its exit status, if the child
/// ended without writing it (a server that panicked would otherwise cost the whole minute).
pub fn wait_for_child(path: &Path, what: &str, child: &mut std::process::Child) {
    wait_for_file(path, what, Some(child));
}

fn wait_for_file(path: &Path, what: &str, mut child: Option<&mut std::process::Child>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            assert!(
                path.exists(),
                "{what} never appeared: the process ended ({status})"
            );
        }
        assert!(Instant::now() < deadline, "{what} never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `bytes` to `dir/name` so that a reader never sees half of it.
pub fn publish(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub fn sums_text(ctx: &Context, l: &Layout, ids: &[u64]) -> String {
    let sums = ctx.checksum(l, ids).unwrap();
    let text: Vec<String> = sums.iter().map(|s| s.to_string()).collect();
    text.join(",")
}

/// Seed of the server's blocks; the client checks what it reads against it.
pub const SERVER_SEED: u64 = 42;
/// The notification the client's write carries.
pub const NOTE: &[u8] = b"wrote 0..6";

/// The next notification `ctx` receives, (sender, message), waiting at most `timeout`.
pub fn next_note(ctx: &Context, timeout: Duration) -> Option<(String, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let note = ctx
            .next_notification(|who, msg| Ok((who.to_string(), msg.to_vec())))
            .unwrap();
        if note.is_some() || Instant::now() >= deadline {
            return note;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The server half of a peer exchange: fills `pool` (12 blocks) with SERVER_SEED, exports it to
/// `dir/server.peer`, waits for the client's notification, then publishes checksums of the
/// blocks the client wrote (0..6) as `dir/server.sums`.
pub fn serve(ctx: &Context, pool: &Layout, dir: &Path) {
    ctx.fill(pool, &all(12), SERVER_SEED).unwrap();
    publish(dir, "server.peer", &ctx.export(&[pool]).unwrap());
    let (_, msg) =
        next_note(ctx, Duration::from_secs(60)).expect("no notification from the client");
    assert_eq!(msg, NOTE);
    publish(dir, "server.sums", sums_text(ctx, pool, &all(6)).as_bytes());
}

/// Local layouts of the client half, all of the remote layout's shape: `mine` is written to
/// the server, `back` receives what is read from it, `expected` is filled here with the
/// server's seed to compare.
pub struct ClientLayouts<'a> {
    pub mine: &'a Layout,
    pub back: &'a Layout,
    pub expected: &'a Layout,
}

/// The client half of a peer exchange with `serve`: reads the server's blocks 6..12 (checked
/// against its seed), writes its own 0..6 with NOTE, then compares the checksums the server
/// reports for what landed. Returns the stats of the read and the write.
pub fn exchange(
    ctx: &Context,
    remote: &Layout,
    l: ClientLayouts<'_>,
    dir: &Path,
) -> (TransferStats, TransferStats) {
    ctx.fill(l.mine, &all(12), 7).unwrap();
    let theirs: Vec<u64> = (6..12).collect();
    let t = ctx
        .submit(
            remote,
            &theirs,
            l.back,
            &theirs,
            &TransferOptions::default(),
        )
        .unwrap();
    t.wait(Some(Duration::from_secs(30))).unwrap();
    let read = t.stats();
    ctx.fill(l.expected, &theirs, SERVER_SEED).unwrap();
    assert_eq!(
        ctx.checksum(l.back, &theirs).unwrap(),
        ctx.checksum(l.expected, &theirs).unwrap()
    );
    let ours = all(6);
    let opts = TransferOptions {
        notify: Some(NOTE.to_vec()),
        ..Default::default()
    };
    let t = ctx.submit(l.mine, &ours, remote, &ours, &opts).unwrap();
    t.wait(Some(Duration::from_secs(30))).unwrap();
    let sums_file = dir.join("server.sums");
    wait_for(&sums_file, "the server's checksums");
    assert_eq!(
        std::fs::read_to_string(&sums_file).unwrap(),
        sums_text(ctx, l.mine, &ours)
    );
    (read, t.stats())
}
pub mod gpu;
pub mod harness;

/// Exit status of a child that could not enter a private network namespace.
pub const NO_NETNS: i32 = 77;

/// Puts this (single-threaded, freshly started) child process into a network namespace of its
/// own with only loopback up, before it makes any NIXL agent: UCX connects at once to whatever
/// addresses forged metadata holds, and here those reach nobody. Exits with NO_NETNS where no
/// namespace can be made (not root, no CAP_SYS_ADMIN).
pub fn enter_private_network() {
    // SAFETY: unshare has no memory-safety preconditions; the process has one thread here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "cannot make a network namespace: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(NO_NETNS);
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    if !up {
        eprintln!("cannot bring loopback up in the new network namespace (iproute2)");
        std::process::exit(NO_NETNS);
    }
}

/// Runs this test binary again as `role` (an environment variable holding `dir`); true if it
/// succeeded, false if it could not enter a private network namespace (the caller skips),
/// panics if it failed.
pub fn run_role(role: &str, dir: &Path) -> bool {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env(role, dir)
        .status()
        .unwrap();
    if status.code() == Some(NO_NETNS) {
        return false;
    }
    assert!(status.success(), "{role} failed: {status}");
    true
}
