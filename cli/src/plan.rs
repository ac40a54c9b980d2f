//! `kvxfer plan`: the strategy table, as a source x destination matrix, a list, or JSON.

use kvxfer::{Capabilities, Location, Plan, StorageKind, Strategy, select};

#[derive(clap::Args)]
pub struct Args {
    /// Source kind: system, pinned, device or disk (all kinds when omitted).
    #[arg(long, value_parser = parse_kind)]
    src: Option<StorageKind>,
    /// Destination kind (all kinds when omitted).
    #[arg(long, value_parser = parse_kind)]
    dst: Option<StorageKind>,
    /// The source is on a remote peer (only with --src).
    #[arg(long, requires = "src")]
    src_remote: bool,
    /// The destination is on a remote peer (only with --dst).
    #[arg(long, requires = "dst")]
    dst_remote: bool,
    /// Allow GPUDirect Storage (Device <-> Disk direct).
    #[arg(long)]
    gds: bool,
    /// Allow GPU RDMA (Device <-> Remote).
    #[arg(long)]
    gpu_rdma: bool,
    /// One line per pair instead of the matrix (the default with --src or --dst).
    #[arg(long)]
    list: bool,
    /// One JSON object per pair.
    #[arg(long, conflicts_with = "list")]
    json: bool,
}

/// Short names of the strategies for the matrix, with what each means.
const LEGEND: [(Strategy, &str, &str); 10] = [
    (
        Strategy::Memcpy,
        "memcpy",
        "CPU copies on the worker threads",
    ),
    (
        Strategy::CudaAsyncH2D,
        "H2D",
        "asynchronous host-to-device (copy engines or SM kernel)",
    ),
    (Strategy::CudaAsyncD2H, "D2H", "asynchronous device-to-host"),
    (Strategy::CudaAsyncD2D, "D2D", "device-to-device"),
    (
        Strategy::CudaBlockingH2D,
        "bH2D",
        "blocking host-to-device from pageable memory",
    ),
    (
        Strategy::CudaBlockingD2H,
        "bD2H",
        "blocking device-to-host into pageable memory",
    ),
    (
        Strategy::NixlRead,
        "rd",
        "NIXL read (the local side reads the other)",
    ),
    (
        Strategy::NixlWrite,
        "wr",
        "NIXL write (the local side writes the other)",
    ),
    (
        Strategy::NixlWriteFlipped,
        "wrF",
        "NIXL write issued by the destination",
    ),
    (
        Strategy::NixlReadFlipped,
        "rdF",
        "NIXL read issued by the destination",
    ),
];

fn short(s: Strategy) -> &'static str {
    LEGEND
        .iter()
        .find(|(x, ..)| *x == s)
        .map_or("?", |(_, name, _)| name)
}

/// A plan in a matrix cell: `wr`, or `D2H>P>wr` for two hops through pinned memory.
fn cell(plan: &kvxfer::Result<Plan>) -> String {
    match plan {
        Ok(Plan::Direct(s)) => short(*s).to_string(),
        Ok(Plan::TwoHop {
            first,
            bounce,
            second,
        }) => format!(
            "{}>{}>{}",
            short(*first),
            &bounce.name()[..1],
            short(*second)
        ),
        Err(_) => "-".to_string(),
    }
}

fn label(l: Location) -> String {
    format!("{}{}", if l.remote { "remote " } else { "" }, l.kind)
}

fn matrix(caps: Capabilities) {
    let all = locations(None, false);
    print!("{:<15}", "source \\ dest");
    for d in &all {
        print!(" {:>14}", label(*d));
    }
    println!();
    for s in &all {
        print!("{:<15}", label(*s));
        for d in &all {
            print!(" {:>14}", cell(&select(*s, *d, caps)));
        }
        println!();
    }
    println!("\n- refused (see `kvxfer plan --list` for why); A>P>B: A into pinned memory, then B");
    for (_, name, meaning) in LEGEND {
        println!("  {name:<7} {meaning}");
    }
}

fn json(src: Location, dst: Location, plan: &kvxfer::Result<Plan>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "src": src.kind.name(),
        "src_remote": src.remote,
        "dst": dst.kind.name(),
        "dst_remote": dst.remote,
    });
    match plan {
        Ok(Plan::Direct(s)) => {
            v["plan"] = "direct".into();
            v["first"] = s.name().into();
        }
        Ok(Plan::TwoHop {
            first,
            bounce,
            second,
        }) => {
            v["plan"] = "two_hop".into();
            v["first"] = first.name().into();
            v["bounce"] = bounce.name().into();
            v["second"] = second.name().into();
        }
        Err(e) => {
            v["plan"] = "refused".into();
            v["reason"] = e.to_string().into();
        }
    }
    v
}

fn parse_kind(s: &str) -> Result<StorageKind, String> {
    StorageKind::ALL
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("unknown storage kind {s:?} (system, pinned, device, disk)"))
}

fn locations(kind: Option<StorageKind>, remote: bool) -> Vec<Location> {
    match kind {
        Some(kind) => vec![Location { kind, remote }],
        None => [false, true]
            .into_iter()
            .flat_map(|remote| StorageKind::ALL.map(|kind| Location { kind, remote }))
            .collect(),
    }
}

pub fn run(a: &Args) -> Result<(), String> {
    let caps = Capabilities {
        allow_gds: a.gds,
        allow_gpu_rdma: a.gpu_rdma,
    };
    if a.json {
        for src in locations(a.src, a.src_remote) {
            for dst in locations(a.dst, a.dst_remote) {
                println!("{}", json(src, dst, &select(src, dst, caps)));
            }
        }
        return Ok(());
    }
    if !a.list && a.src.is_none() && a.dst.is_none() {
        println!(
            "capabilities: allow_gds={} allow_gpu_rdma={}\n",
            caps.allow_gds, caps.allow_gpu_rdma
        );
        matrix(caps);
        return Ok(());
    }
    println!(
        "capabilities: allow_gds={} allow_gpu_rdma={}",
        caps.allow_gds, caps.allow_gpu_rdma
    );
    println!("{:<16} {:<16} plan", "source", "destination");
    for src in locations(a.src, a.src_remote) {
        for dst in locations(a.dst, a.dst_remote) {
            let plan = match select(src, dst, caps) {
                Ok(p) => p.to_string(),
                Err(e) => format!("refused: {e}"),
            };
            println!("{:<16} {:<16} {plan}", src.to_string(), dst.to_string());
        }
    }
    Ok(())
}
