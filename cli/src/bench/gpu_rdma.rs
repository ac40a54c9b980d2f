//! `kvxfer bench --gpu-rdma`: device <-> device of another process through NIXL's UCX backend
//! with GPU RDMA (`allow_gpu_rdma`: UCX's CUDA transports read and write device memory),
//! against staging through pinned memory, measured in the same run. The peer is a second
//! `kvxfer` process (the hidden `rdma-peer` command) on `--peer-device`, driven over its
//! stdin/stdout: it exports its layouts through a file, runs its half of the staged path
//! (pinned <-> device on its side) when asked, and reports checksums of what landed.
//!
//! Write: local device -> peer device (NixlWrite), against D2H here + pinned -> peer pinned
//! (UCX) + H2D there. Read: peer device -> local device (NixlReadFlipped), against D2H there +
//! peer pinned -> pinned here (UCX) + H2D here. On one host the direct path maps the peer's
//! memory through CUDA IPC and runs kvxfer's kernel (`mechanism` says which ran); `limit` is one
//! large device-to-device copy of the same bytes in this process, between device 0 and the
//! peer's device (the same GPU, or a peer copy). The direct path, the staged one, the limit and
//! the same transfer between two layouts here are measured in the same rounds, each round
//! starting with another, each after a small untimed copy here (`rounds` says why).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use kvxfer::{
    Backends, Capabilities, Context, ContextConfig, Layout, LayoutConfig, LayoutKind, Mechanism,
    StorageKind, StorageSpec, TransferOptions,
};

use super::common::{err, legend, median, secs, shape, shuffled_ids};

pub struct GpuRdmaArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
    pub peer_device: i32,
    /// The bench's context's SM budget (0 = auto): how many blocks its copy kernel takes.
    pub max_sms: u32,
    /// The bench's context does not map the peer's device memory through CUDA IPC.
    pub disable_ipc: bool,
}

/// The peer process's arguments (`kvxfer rdma-peer`, started by the bench, not by hand).
#[derive(clap::Args)]
pub struct PeerArgs {
    #[arg(long)]
    device: i32,
    #[arg(long)]
    total_mib: u64,
    #[arg(long, value_delimiter = ',')]
    fragments_kib: Vec<u64>,
    /// Where to write the exported layouts.
    #[arg(long)]
    export: PathBuf,
}

/// Marks the peer's replies among whatever else the libraries below print to its stdout.
const REPLY: &str = "kvx-peer: ";

fn context(device: i32, max_sms: u32, disable_ipc: bool) -> Result<Context, String> {
    Context::new(ContextConfig {
        nixl_backends: Backends::UCX,
        cuda_device: device,
        max_sms,
        disable_ipc,
        capabilities: Capabilities {
            allow_gds: false,
            allow_gpu_rdma: true,
        },
        ..Default::default()
    })
    .map_err(err)
}

fn blocks_for(total_mib: u64, fragment: u64) -> u64 {
    ((total_mib << 20) / (64 * fragment)).max(1)
}

/// The block orders both processes use: source ids here, destination ids at the peer.
fn orders(kib: u64, blocks: u64) -> (Vec<u64>, Vec<u64>) {
    shuffled_ids(blocks, kib)
}

fn make(
    ctx: &Context,
    kind: LayoutKind,
    storage: StorageKind,
    device: i32,
    blocks: u64,
    fragment: u64,
) -> Result<Layout, String> {
    let spec = StorageSpec {
        kind: storage,
        device_id: device,
        path: None,
    };
    ctx.new_layout(shape(kind, blocks, fragment), &spec)
        .map_err(err)
}

fn go(ctx: &Context, s: &Layout, sids: &[u64], d: &Layout, dids: &[u64]) -> Result<(), String> {
    moved(ctx, s, sids, d, dids).map(|_| ())
}

/// As `go`, saying what moved the bytes.
fn moved(
    ctx: &Context,
    s: &Layout,
    sids: &[u64],
    d: &Layout,
    dids: &[u64],
) -> Result<Mechanism, String> {
    let t = ctx
        .submit(s, sids, d, dids, &TransferOptions::default())
        .map_err(err)?;
    t.wait(None).map_err(err)?;
    Ok(t.stats().mechanism)
}

fn mechanism_name(m: Mechanism) -> &'static str {
    match m {
        Mechanism::Ipc => "ipc",
        Mechanism::Nixl => "nixl",
        Mechanism::Kernel => "kernel",
        Mechanism::CopyEngine => "copy_engine",
        Mechanism::Memcpy => "memcpy",
    }
}

/// Two single-block layouts of `bytes` each, on device 0 and on `peer_device`, for one large
/// copy between them (the limit): a whole block of fully contiguous layouts is one copy.
fn limit_pair(ctx: &Context, bytes: u64, peer_device: i32) -> Result<(Layout, Layout), String> {
    let c = LayoutConfig {
        num_blocks: 1,
        num_layers: 1,
        outer_dim: 1,
        page_size: 1,
        inner_dim: bytes / 2,
        dtype_width: 2,
        alignment: 256,
        kind: LayoutKind::FullyContiguous,
        heads: Default::default(),
    };
    let on = |device_id| {
        let spec = StorageSpec {
            kind: StorageKind::Device,
            device_id,
            path: None,
        };
        ctx.new_layout(c, &spec).map_err(err)
    };
    Ok((on(0)?, on(peer_device)?))
}

fn sums(ctx: &Context, l: &Layout, ids: &[u64]) -> Result<String, String> {
    let s = ctx.checksum(l, ids).map_err(err)?;
    Ok(s.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

/// `kvxfer rdma-peer`: one device layout and one pinned staging layout per fragment size,
/// exported, then commands from stdin until EOF: `h2d I` / `d2h I` run this side's staging hop
/// of fragment size I, `sum I` prints the checksums of the device layout's destination blocks.
pub fn peer(a: &PeerArgs) -> Result<(), String> {
    let ctx = context(a.device, 0, false)?;
    if !ctx.has_cuda() {
        return Err("rdma-peer needs a CUDA GPU".into());
    }
    let mut sides = Vec::new();
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        let blocks = blocks_for(a.total_mib, fragment);
        let dev = make(
            &ctx,
            LayoutKind::LayerSeparateOuterFirst,
            StorageKind::Device,
            a.device,
            blocks,
            fragment,
        )?;
        let stage = make(
            &ctx,
            LayoutKind::FullyContiguous,
            StorageKind::Pinned,
            a.device,
            blocks,
            fragment,
        )?;
        let all: Vec<u64> = (0..blocks).collect();
        ctx.fill(&dev, &all, 11).map_err(err)?;
        let (_, db) = orders(kib, blocks);
        sides.push((dev, stage, all, db));
    }
    let layouts: Vec<&Layout> = sides.iter().flat_map(|(d, s, ..)| [d, s]).collect();
    let tmp = a.export.with_extension("tmp");
    std::fs::write(&tmp, ctx.export(&layouts).map_err(err)?).map_err(err)?;
    std::fs::rename(&tmp, &a.export).map_err(err)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{REPLY}ready").map_err(err)?;
    out.flush().map_err(err)?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(err)?;
        let (cmd, i) = line
            .split_once(' ')
            .ok_or_else(|| format!("rdma-peer: bad command {line:?}"))?;
        let (dev, stage, all, db) = i
            .parse::<usize>()
            .ok()
            .and_then(|i| sides.get(i))
            .ok_or_else(|| format!("rdma-peer: bad index in {line:?}"))?;
        let reply = match cmd {
            "h2d" => go(&ctx, stage, all, dev, db).map(|()| "ok".to_string())?,
            "d2h" => go(&ctx, dev, db, stage, all).map(|()| "ok".to_string())?,
            "sum" => sums(&ctx, dev, db)?,
            _ => return Err(format!("rdma-peer: unknown command {line:?}")),
        };
        writeln!(out, "{REPLY}{reply}").map_err(err)?;
        out.flush().map_err(err)?;
    }
    Ok(())
}

/// The peer process and its command pipe. Dropping it closes stdin (the peer exits) and reaps.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
}

impl Peer {
    fn start(a: &GpuRdmaArgs) -> Result<(Self, Vec<u8>), String> {
        let dir = std::env::temp_dir().join(format!("kvx-rdma-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(err)?;
        let export = dir.join("peer.bin");
        let kib: Vec<String> = a.fragments_kib.iter().map(u64::to_string).collect();
        let exe = std::env::current_exe().map_err(err)?;
        let mut child = Command::new(exe)
            .arg("rdma-peer")
            .arg("--device")
            .arg(a.peer_device.to_string())
            .arg("--total-mib")
            .arg(a.total_mib.to_string())
            .arg("--fragments-kib")
            .arg(kib.join(","))
            .arg("--export")
            .arg(&export)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the peer process: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the peer process has no pipes".into());
        };
        let mut peer = Peer {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            dir,
        };
        peer.expect_line("ready")?;
        let blob = std::fs::read(&export).map_err(err)?;
        Ok((peer, blob))
    }

    /// The peer's next reply. Other lines on its stdout (UCX_PROTO_INFO tables, logs of the
    /// libraries below) are passed on to stderr.
    fn line(&mut self) -> Result<String, String> {
        loop {
            let mut s = String::new();
            if self.stdout.read_line(&mut s).map_err(err)? == 0 {
                return Err("the peer process exited (its error is above)".into());
            }
            // Found anywhere in the line: the C libraries' buffered stdout may end up in front.
            match s.trim_end().split_once(REPLY) {
                Some((before, reply)) => {
                    if !before.is_empty() {
                        eprintln!("peer: {before}");
                    }
                    return Ok(reply.to_string());
                }
                None => eprint!("peer: {s}"),
            }
        }
    }

    fn expect_line(&mut self, want: &str) -> Result<(), String> {
        let got = self.line()?;
        if got == want {
            Ok(())
        } else {
            Err(format!("the peer process said {got:?}, not {want:?}"))
        }
    }

    /// Runs the peer's staging hop `cmd` (h2d, d2h) of fragment size `i`.
    fn run(&mut self, cmd: &str, i: usize) -> Result<(), String> {
        match self.ask(cmd, i)?.as_str() {
            "ok" => Ok(()),
            e => Err(format!("the peer's {cmd} failed: {e}")),
        }
    }

    fn ask(&mut self, cmd: &str, i: usize) -> Result<String, String> {
        let stdin = self.stdin.as_mut().ok_or("the peer's stdin is closed")?;
        writeln!(stdin, "{cmd} {i}").map_err(err)?;
        stdin.flush().map_err(err)?;
        self.line()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One measured step of a round.
type Step<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// Times `iters` + 1 rounds of every step, each round starting with another; the first round
/// warms up and is not kept. Before each step, `settle` runs untimed: on one GPU the first work
/// of this process after the peer process's (the staged path ends there) waits ~150 us more
/// (the GPU switching between the two processes' contexts; session 9, device runs 7-9), which
/// would otherwise fall on whichever step follows the staged one. Each step's times, in
/// `steps`' order. `KVX_BENCH_ROUNDS` set: each round's order and times go to stderr.
fn rounds(
    iters: usize,
    what: &str,
    settle: &mut dyn FnMut() -> Result<(), String>,
    steps: &mut [Step<'_>],
) -> Result<Vec<Vec<f64>>, String> {
    let n = steps.len();
    let log = std::env::var_os("KVX_BENCH_ROUNDS").is_some();
    let mut times = vec![Vec::new(); n];
    for round in 0..=iters {
        let mut line = format!("{what} round {round}:");
        for turn in 0..n {
            let k = (round + turn) % n;
            let ts = secs(&mut *settle)?;
            let t = secs(&mut *steps[k])?;
            if log {
                line += &format!(" step{k}={:.1}us(settle {:.1}us)", t * 1e6, ts * 1e6);
            }
            if round > 0 {
                times[k].push(t);
            }
        }
        if log {
            eprintln!("{line}");
        }
    }
    Ok(times)
}

/// One row: the direct path's times `d` (moved by `mechanism`), the staged path's `s`, and
/// the median time of one large copy of the same bytes (`limit`).
struct Row {
    op: &'static str,
    kib: u64,
    bytes: u64,
    frags: u64,
    mechanism: Mechanism,
    limit: f64,
    /// The same transfer between two device layouts of this process (same kinds and ids).
    local: f64,
}

fn report(a: &GpuRdmaArgs, r: &Row, d: Vec<f64>, s: Vec<f64>) {
    let gb = |t: f64| r.bytes as f64 / t / 1e9;
    let (g, s, l, local) = (gb(median(d)), gb(median(s)), gb(r.limit), gb(r.local));
    let m = mechanism_name(r.mechanism);
    let (op, kib, frags) = (r.op, r.kib, r.frags);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": "gpu_rdma", "op": op, "processes": 2, "local_device": 0,
                "peer_device": a.peer_device, "fragment_bytes": kib << 10, "fragments": frags,
                "bytes": r.bytes, "iters": a.iters, "mechanism": m, "gpu_rdma_gbps": g,
                "staged_gbps": s, "ratio": g / s, "limit_gbps": l, "ratio_to_limit": g / l,
                "local_gbps": local,
            })
        );
    } else {
        println!(
            "{op:>5} {kib:>5} KiB {frags:>7} {m:>6} {g:>9.2} {s:>9.2} {:>7.3} {l:>9.2} {:>7.3} \
             {local:>9.2}",
            g / s,
            g / l
        );
    }
}

pub fn run(a: &GpuRdmaArgs) -> Result<(), String> {
    let ctx = context(0, a.max_sms, a.disable_ipc)?;
    if !ctx.has_cuda() {
        return Err("bench --gpu-rdma needs a CUDA GPU and driver; this machine has none".into());
    }
    for &kib in &a.fragments_kib {
        if kib == 0 || (kib << 10) > (a.total_mib << 20) / 64 {
            return Err(format!(
                "fragment {kib} KiB: use 1 KiB to total/64 ({} MiB total)",
                a.total_mib
            ));
        }
    }
    // A 64 KiB copy here, untimed before each measured step (`rounds`).
    let small = || {
        make(
            &ctx,
            LayoutKind::FullyContiguous,
            StorageKind::Device,
            0,
            1,
            1024,
        )
    };
    let tiny = (small()?, small()?);
    let (mut peer, blob) = Peer::start(a)?;
    let remote = ctx.import(&blob).map_err(err)?;
    if !a.json {
        println!(
            "device 0 <-> device {} of another process: {} MiB per point, median of {} \
             (GB/s; direct against staging through pinned memory on both sides and against \
             one large copy)",
            a.peer_device, a.total_mib, a.iters
        );
        println!(
            "{:>5} {:>9} {:>7} {:>6} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9}",
            "op",
            "fragment",
            "frags",
            "mech",
            "direct",
            "staged",
            "ratio",
            "limit",
            "/limit",
            "local"
        );
    }
    for (i, &kib) in a.fragments_kib.iter().enumerate() {
        let fragment = kib << 10;
        let blocks = blocks_for(a.total_mib, fragment);
        let (sb, db) = orders(kib, blocks);
        let ids: Vec<u64> = (0..blocks).collect();
        let dev = |kind| make(&ctx, kind, StorageKind::Device, 0, blocks, fragment);
        let src = dev(LayoutKind::LayerSeparateBlockFirst)?;
        let back = dev(LayoutKind::LayerSeparateBlockFirst)?;
        let stage = make(
            &ctx,
            LayoutKind::FullyContiguous,
            StorageKind::Pinned,
            0,
            blocks,
            fragment,
        )?;
        let (r_dev, r_stage) = (&remote.layouts()[2 * i], &remote.layouts()[2 * i + 1]);
        ctx.fill(&src, &ids, 3).map_err(err)?;
        let bytes = blocks * 64 * fragment;
        let frags = blocks * 64;
        let (near, far) = limit_pair(&ctx, bytes, a.peer_device)?;
        let one = [0u64];
        let mechanism = moved(&ctx, &src, &sb, r_dev, &db)?;
        let mut settle = || go(&ctx, &tiny.0, &one, &tiny.1, &one);
        // The peer's layout kind, here.
        let twin = dev(LayoutKind::LayerSeparateOuterFirst)?;
        let row = |op, mechanism, t: &[Vec<f64>]| Row {
            op,
            kib,
            bytes,
            frags,
            mechanism,
            limit: median(t[2].clone()),
            local: median(t[3].clone()),
        };

        let t = rounds(
            a.iters,
            &format!("write {kib} KiB"),
            &mut settle,
            &mut [
                &mut || go(&ctx, &src, &sb, r_dev, &db),
                &mut || {
                    go(&ctx, &src, &sb, &stage, &ids)?;
                    go(&ctx, &stage, &ids, r_stage, &ids)?;
                    peer.run("h2d", i)
                },
                &mut || go(&ctx, &near, &one, &far, &one),
                &mut || go(&ctx, &src, &sb, &twin, &db),
            ],
        )?;
        // Both paths leave src[sb[k]] in the peer's dev[db[k]].
        if peer.ask("sum", i)? != sums(&ctx, &src, &sb)? {
            return Err(format!(
                "write {kib} KiB: the peer's blocks differ from the sent ones"
            ));
        }
        report(a, &row("write", mechanism, &t), t[0].clone(), t[1].clone());

        let mechanism = moved(&ctx, r_dev, &db, &back, &sb)?;
        let t = rounds(
            a.iters,
            &format!("read {kib} KiB"),
            &mut settle,
            &mut [
                &mut || go(&ctx, r_dev, &db, &back, &sb),
                &mut || {
                    peer.run("d2h", i)?;
                    go(&ctx, r_stage, &ids, &stage, &ids)?;
                    go(&ctx, &stage, &ids, &back, &sb)
                },
                &mut || go(&ctx, &far, &one, &near, &one),
                &mut || go(&ctx, &twin, &db, &back, &sb),
            ],
        )?;
        if peer.ask("sum", i)? != sums(&ctx, &back, &sb)? {
            return Err(format!(
                "read {kib} KiB: the blocks read differ from the peer's"
            ));
        }
        report(a, &row("read", mechanism, &t), t[0].clone(), t[1].clone());
    }
    drop(peer);
    if !a.json {
        legend(&[
            (
                "mech",
                "what moved the direct path: ipc (CUDA IPC + kvxfer's kernel, same host) or nixl",
            ),
            (
                "direct",
                "GB/s of device memory to and from a second kvxfer process (submit to completion)",
            ),
            (
                "staged",
                "the same bytes staged through pinned host memory on both sides",
            ),
            ("ratio", "direct / staged"),
            (
                "limit",
                "one large device-to-device copy of the same bytes in this process",
            ),
            ("/limit", "direct / limit"),
            (
                "local",
                "the same transfer between two device layouts of this process (diagnostic)",
            ),
        ]);
    }
    Ok(())
}
