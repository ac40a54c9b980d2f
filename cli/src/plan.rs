//! `kvxfer plan`: the strategy table.

use kvxfer::{Capabilities, Location, StorageKind, select};

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
