//! `kvxfer demo`: blocks travel across every tier this machine has, between fully contiguous
//! and layer-separate layouts with permuted ids; every hop is verified by checksums.

use kvxfer::{
    Backends, Context, ContextConfig, Error, HeadOrder, Heads, Layout, LayoutConfig, LayoutKind,
    StorageKind, StorageSpec, TransferOptions,
};

#[derive(clap::Args)]
pub struct Args {
    /// Blocks to move (each 2 MiB: 32 layers, K and V, 16 tokens, 8x128 heads, bf16).
    #[arg(long, default_value_t = 64)]
    blocks: u64,
    /// Seed of the verification pattern.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

fn shape(blocks: u64, kind: LayoutKind) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 32,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 8 * 128,
        dtype_width: 2,
        alignment: 256,
        kind,
        heads: Default::default(),
    }
}

fn e(err: Error) -> String {
    err.to_string()
}

pub fn run(a: &Args) -> Result<(), String> {
    if a.blocks == 0 {
        return Err("--blocks must be at least 1".into());
    }
    // The disk and remote tiers need NIXL; without it the demo runs on the other tiers.
    let ctx = match Context::new(ContextConfig::default()) {
        Ok(c) => c,
        Err(Error::Unavailable(why)) => {
            println!("NIXL: skipped ({why})");
            Context::new(ContextConfig {
                nixl_backends: Backends::empty(),
                ..Default::default()
            })
            .map_err(e)?
        }
        Err(err) => return Err(e(err)),
    };
    println!(
        "kvxfer {} demo: {} blocks of 2 MiB, {} worker threads",
        env!("CARGO_PKG_VERSION"),
        a.blocks,
        ctx.worker_threads()
    );

    // Which tiers does this machine have? Pinned needs page-locking rights, Device a GPU.
    let mut tiers = vec![StorageKind::System];
    for kind in [StorageKind::Pinned, StorageKind::Device, StorageKind::Disk] {
        let probe = ctx.new_layout(
            shape(1, LayoutKind::FullyContiguous),
            &StorageSpec::new(kind),
        );
        match probe {
            Ok(_) => tiers.push(kind),
            Err(err) => println!("tier {kind}: skipped ({err})"),
        }
    }
    println!(
        "tiers: {}",
        tiers
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let has = |k| tiers.contains(&k);
    let pinned = if has(StorageKind::Pinned) {
        StorageKind::Pinned
    } else {
        StorageKind::System
    };
    let mut route = vec![
        (StorageKind::System, LayoutKind::FullyContiguous),
        (pinned, LayoutKind::LayerSeparateBlockFirst),
    ];
    if has(StorageKind::Device) {
        // Offload and restore through the GPU: H2D into a layer-separate pool, D2D into a fully
        // contiguous one, D2H back to pinned memory, and pageable copies both ways.
        route.extend([
            (StorageKind::Device, LayoutKind::LayerSeparateOuterFirst),
            (StorageKind::Device, LayoutKind::FullyContiguous),
            (pinned, LayoutKind::FullyContiguous),
            (StorageKind::Device, LayoutKind::LayerSeparateBlockFirst),
        ]);
        if has(StorageKind::Disk) {
            // Device -> disk and back through the pinned bounce buffers (the two-hop plans).
            route.extend([
                (StorageKind::Disk, LayoutKind::FullyContiguous),
                (StorageKind::Device, LayoutKind::LayerSeparateOuterFirst),
            ]);
        }
        route.push((StorageKind::System, LayoutKind::LayerSeparateOuterFirst));
    } else {
        route.extend([
            (StorageKind::System, LayoutKind::LayerSeparateOuterFirst),
            (pinned, LayoutKind::FullyContiguous),
        ]);
    }
    if has(StorageKind::Disk) {
        // Offload to disk and back through NIXL (POSIX): NixlWrite, then NixlReadFlipped.
        route.push((StorageKind::Disk, LayoutKind::LayerSeparateBlockFirst));
    }
    route.push((StorageKind::System, LayoutKind::FullyContiguous));
    let layouts = route
        .iter()
        .map(|&(storage, kind)| ctx.new_layout(shape(a.blocks, kind), &StorageSpec::new(storage)))
        .collect::<Result<Vec<Layout>, _>>()
        .map_err(e)?;

    let n = a.blocks;
    let mut ids: Vec<u64> = (0..n).collect();
    ctx.fill(&layouts[0], &ids, a.seed).map_err(e)?;
    let expected = ctx.checksum(&layouts[0], &ids).map_err(e)?;

    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut failures = 0;
    for hop in 0..route.len() - 1 {
        let (src, dst) = (&layouts[hop], &layouts[hop + 1]);
        // Scatter the blocks to new positions on every hop (reversed on the first).
        let mut next: Vec<u64> = (0..n).collect();
        if hop == 0 {
            next.reverse();
        } else {
            rng.shuffle(&mut next);
        }
        let t = ctx
            .submit(src, &ids, dst, &next, &TransferOptions::default())
            .map_err(e)?;
        t.wait(None).map_err(e)?;
        let s = t.stats();
        let ok = ctx.checksum(dst, &next).map_err(e)? == expected;
        failures += usize::from(!ok);
        println!(
            "hop {}: {:<6} {:<14} -> {:<6} {:<14} plan {:<22} {:<10} {:>8.1} MiB in {:>5} copies  {:>7.2} GB/s  checksums {}",
            hop + 1,
            route[hop].0.name(),
            route[hop].1.short_name(),
            route[hop + 1].0.name(),
            route[hop + 1].1.short_name(),
            s.plan.to_string(),
            format!("{:?}", s.mechanism),
            s.bytes as f64 / (1 << 20) as f64,
            s.copies,
            s.bytes as f64 / s.elapsed_ns.max(1) as f64,
            if ok { "OK" } else { "MISMATCH" },
        );
        ids = next;
    }
    let gpu_assembly = if has(StorageKind::Device) {
        StorageKind::Device
    } else {
        pinned
    };
    failures += usize::from(!tp_assembly(&ctx, a, gpu_assembly)?);
    let peer = ctx.nixl_backends().contains(&"UCX");
    if peer {
        failures += usize::from(!peer_round_trip(&ctx, a)?);
    }
    if failures > 0 {
        return Err(format!("{failures} hop(s) failed verification"));
    }
    let hops = route.len() - 1 + 2 + if peer { 2 } else { 0 };
    println!("all {hops} hops verified");
    Ok(())
}

/// FNV-1a of `bytes`: a checksum of one head slice, printed side by side.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Tensor-parallel resharding: two prefill ranks of TP 4 (heads 0..2 and 2..4 of a layer's 8,
/// token-major NHD) move into one decode rank of TP 2 (heads 0..4, head-major HND) on `to`;
/// every head slice of every token is checked against its prefill rank, and the first block's
/// per-head checksums are printed.
fn tp_assembly(ctx: &Context, a: &Args, to: StorageKind) -> Result<bool, String> {
    let n = a.blocks.min(16);
    let rank = |heads: u32, begin: u32, order: HeadOrder, storage: StorageKind| {
        let c = LayoutConfig {
            num_layers: 4,
            inner_dim: u64::from(heads) * 128,
            heads: Heads {
                num_heads: heads,
                head_begin: begin,
                order,
            },
            ..shape(n, LayoutKind::FullyContiguous)
        };
        ctx.new_layout(c, &StorageSpec::new(storage)).map_err(e)
    };
    let ids: Vec<u64> = (0..n).collect();
    let rev: Vec<u64> = ids.iter().rev().copied().collect();
    let prefill = [
        rank(2, 0, HeadOrder::TokenMajor, StorageKind::System)?,
        rank(2, 2, HeadOrder::TokenMajor, StorageKind::System)?,
    ];
    let decode = rank(4, 0, HeadOrder::HeadMajor, to)?;
    for (i, p) in prefill.iter().enumerate() {
        ctx.fill(p, &ids, a.seed + i as u64).map_err(e)?;
        ctx.submit(p, &ids, &decode, &rev, &TransferOptions::default())
            .and_then(|t| t.wait(None))
            .map_err(e)?;
    }
    // Back to host memory in the same order (whole regions), to read the head slices.
    let back = rank(4, 0, HeadOrder::HeadMajor, StorageKind::System)?;
    ctx.submit(&decode, &ids, &back, &ids, &TransferOptions::default())
        .and_then(|t| t.wait(None))
        .map_err(e)?;
    let slice =
        |l: &Layout, b: u64, layer: u64, o: u64, t: u64, h: u32| -> Result<Vec<u8>, String> {
            let c = l.config();
            let (nh, i) = (
                u64::from(c.heads.num_heads),
                u64::from(h - c.heads.head_begin),
            );
            let off = match c.heads.order {
                HeadOrder::TokenMajor => (t * nh + i) * 256,
                HeadOrder::HeadMajor => (i * 16 + t) * 256,
            };
            let r = l.region(b, layer, o).map_err(e)?;
            // SAFETY: a region of a live System layout; `off + 256` lies inside it.
            Ok(unsafe { std::slice::from_raw_parts((r.addr + off) as *const u8, 256) }.to_vec())
        };
    let mut ok = true;
    for b in 0..n {
        for layer in 0..4 {
            for o in 0..2 {
                for t in 0..16 {
                    for h in 0..4u32 {
                        let p = &prefill[(h / 2) as usize];
                        ok &= slice(&back, n - 1 - b, layer, o, t, h)?
                            == slice(p, b, layer, o, t, h)?;
                    }
                }
            }
        }
    }
    let sums: Vec<String> = (0..4u32)
        .map(|h| -> Result<String, String> {
            let p = &prefill[(h / 2) as usize];
            Ok(format!(
                "head {h} {:016x}/{:016x}",
                fnv(&slice(p, 0, 0, 0, 0, h)?),
                fnv(&slice(&back, n - 1, 0, 0, 0, h)?)
            ))
        })
        .collect::<Result<_, _>>()?;
    println!(
        "TP 4 -> 2 reshard: prefill ranks (heads 0-1, 2-3; NHD, {}) -> decode rank (heads 0-3, HND, {}), {n} blocks x 4 layers: every head slice {}; block 0, token 0 (prefill/decode): {}",
        StorageKind::System.name(),
        to.name(),
        if ok { "OK" } else { "MISMATCH" },
        sums.join(", ")
    );
    Ok(ok)
}

/// A second context stands in for a decode node over UCX loopback: blocks go to its pool with a
/// notification (NixlWrite) and come back (NixlReadFlipped); its own checksums verify them.
fn peer_round_trip(ctx: &Context, a: &Args) -> Result<bool, String> {
    let peer_ctx = Context::new(ContextConfig::default()).map_err(e)?;
    println!(
        "peer: a second context of this process ({}), with its own NIXL agent, exports a \
         layout; this context imports it and moves blocks over UCX as it would to another \
         process or machine",
        peer_ctx.name()
    );
    let n = a.blocks;
    let pool = peer_ctx
        .new_layout(
            shape(n, LayoutKind::LayerSeparateOuterFirst),
            &StorageSpec::new(StorageKind::Pinned),
        )
        .map_err(e)?;
    let peer = ctx
        .import(&peer_ctx.export(&[&pool]).map_err(e)?)
        .map_err(e)?;
    let remote = &peer.layouts()[0];
    let storage = StorageSpec::new(StorageKind::Pinned);
    let here = ctx
        .new_layout(shape(n, LayoutKind::FullyContiguous), &storage)
        .map_err(e)?;
    let back = ctx
        .new_layout(shape(n, LayoutKind::LayerSeparateBlockFirst), &storage)
        .map_err(e)?;
    let ids: Vec<u64> = (0..n).collect();
    let rev: Vec<u64> = (0..n).rev().collect();
    ctx.fill(&here, &ids, a.seed).map_err(e)?;
    let expected = ctx.checksum(&here, &ids).map_err(e)?;
    let opts = TransferOptions {
        notify: Some(b"kvxfer demo: blocks written".to_vec()),
        ..Default::default()
    };
    let hops = [
        (
            &here,
            &ids,
            remote.as_ref(),
            &rev,
            opts,
            "local FC  -> peer LS-outer-first",
        ),
        (
            remote.as_ref(),
            &rev,
            &back,
            &ids,
            TransferOptions::default(),
            "peer LS-outer-first -> local LS-block-first",
        ),
    ];
    let mut ok = true;
    for (src, sb, dst, db, opts, name) in hops {
        let t = ctx.submit(src, sb, dst, db, &opts).map_err(e)?;
        t.wait(None).map_err(e)?;
        let s = t.stats();
        // The peer's memory is checked by the peer, ours by us.
        let sums = if dst.is_remote() {
            peer_ctx.checksum(&pool, db).map_err(e)?
        } else {
            ctx.checksum(dst, db).map_err(e)?
        };
        let good = sums == expected;
        ok &= good;
        println!(
            "peer hop: {name:<44} plan {:<22} {:>8.1} MiB  {:>7.2} GB/s  checksums {}",
            s.plan.to_string(),
            s.bytes as f64 / (1 << 20) as f64,
            s.bytes as f64 / s.elapsed_ns.max(1) as f64,
            if good { "OK" } else { "MISMATCH" }
        );
    }
    let note = peer_ctx
        .next_notification(|who, msg| Ok(format!("{who}: {}", String::from_utf8_lossy(msg))));
    match note.map_err(e)? {
        Some(n) => println!("peer received notification from {n}"),
        None => println!("peer notification not yet delivered"),
    }
    Ok(ok)
}
