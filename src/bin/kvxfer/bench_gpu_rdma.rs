//! `kvxfer bench --gpu-rdma`: device -> remote device through NIXL's UCX backend with GPU RDMA
//! (`allow_gpu_rdma`: UCX's CUDA transports read and write device memory), against staging
//! through pinned memory, measured in the same run: device -> pinned on the sender, pinned ->
//! the peer's pinned memory through UCX, pinned -> device on the receiver. Two contexts of one
//! process are the two sides (each its own NIXL agent, connected through UCX).

use std::time::Instant;

use kvxfer::ffi::context::KVX_BACKEND_UCX;
use kvxfer::{
    Capabilities, Context, ContextConfig, Layout, LayoutKind, StorageKind, StorageSpec,
    TransferOptions,
};

use super::bench::{err, median};
use super::bench_gpu::shape;

pub struct GpuRdmaArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
}

fn context() -> Result<Context, String> {
    Context::new(ContextConfig {
        nixl_backends: KVX_BACKEND_UCX,
        capabilities: Capabilities {
            allow_gds: false,
            allow_gpu_rdma: true,
        },
        ..Default::default()
    })
    .map_err(err)
}

pub fn run(a: &GpuRdmaArgs) -> Result<(), String> {
    let (sender, receiver) = (context()?, context()?);
    if !sender.has_cuda() {
        return Err("bench --gpu-rdma needs a CUDA GPU and driver; this machine has none".into());
    }
    let total = a.total_mib << 20;
    if !a.json {
        println!(
            "device -> peer device: {} MiB per point, median of {} (GB/s; GPU RDMA against D2H + UCX host write + H2D)",
            a.total_mib, a.iters
        );
        println!(
            "{:>8} {:>7} {:>9} {:>9} {:>7}",
            "fragment", "frags", "GPU RDMA", "staged", "ratio"
        );
    }
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        if fragment < 64 || fragment % 64 != 0 {
            return Err(format!("fragment {kib} KiB: use a multiple of 64 bytes"));
        }
        let blocks = (total / (64 * fragment)).max(1);
        let mk = |ctx: &Context, kind, storage| {
            ctx.new_layout(shape(kind, blocks, fragment), &StorageSpec::new(storage))
                .map_err(err)
        };
        let src = mk(
            &sender,
            LayoutKind::LayerSeparateBlockFirst,
            StorageKind::Device,
        )?;
        let stage_out = mk(&sender, LayoutKind::FullyContiguous, StorageKind::Pinned)?;
        let dst = mk(
            &receiver,
            LayoutKind::LayerSeparateOuterFirst,
            StorageKind::Device,
        )?;
        let stage_in = mk(&receiver, LayoutKind::FullyContiguous, StorageKind::Pinned)?;
        let peer = sender
            .import(&receiver.export(&[&dst, &stage_in]).map_err(err)?)
            .map_err(err)?;
        let (remote_dst, remote_stage) = (&peer.layouts()[0], &peer.layouts()[1]);
        let ids: Vec<u64> = (0..blocks).collect();
        let mut sb = ids.clone();
        let mut db = ids.clone();
        let mut rng = fastrand::Rng::with_seed(kib);
        rng.shuffle(&mut sb);
        rng.shuffle(&mut db);
        sender.fill(&src, &ids, 3).map_err(err)?;
        let one = TransferOptions::default();
        let go = |ctx: &Context, s: &Layout, sids: &[u64], d: &Layout, dids: &[u64]| {
            ctx.submit(s, sids, d, dids, &one)
                .and_then(|t| t.wait(None))
                .map_err(err)
        };
        let (mut direct, mut staged) = (Vec::new(), Vec::new());
        for i in 0..=a.iters {
            let t0 = Instant::now();
            go(&sender, &src, &sb, remote_dst, &db)?;
            let d = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            go(&sender, &src, &sb, &stage_out, &ids)?;
            go(&sender, &stage_out, &ids, remote_stage, &ids)?;
            go(&receiver, &stage_in, &ids, &dst, &db)?;
            let s = t0.elapsed().as_secs_f64();
            if i > 0 {
                direct.push(d);
                staged.push(s);
            }
        }
        // Both paths leave src[sb[i]] in dst[db[i]].
        if sender.checksum(&src, &sb).map_err(err)? != receiver.checksum(&dst, &db).map_err(err)? {
            return Err(format!(
                "{kib} KiB: the peer's blocks differ from the sent ones"
            ));
        }
        let bytes = blocks * 64 * fragment;
        let (g, s) = (
            bytes as f64 / median(direct) / 1e9,
            bytes as f64 / median(staged) / 1e9,
        );
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "name": "gpu_rdma", "fragment_bytes": fragment, "fragments": blocks * 64,
                    "bytes": bytes, "iters": a.iters, "gpu_rdma_gbps": g, "staged_gbps": s,
                    "ratio": g / s,
                })
            );
        } else {
            println!(
                "{:>5} KiB {:>7} {g:>9.2} {s:>9.2} {:>7.3}",
                kib,
                blocks * 64,
                g / s
            );
        }
    }
    Ok(())
}
