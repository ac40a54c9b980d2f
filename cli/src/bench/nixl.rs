//! `kvxfer bench --nixl`: NIXL transfers through kvxfer against nixl-sys used directly
//! (`nixl-raw`: one descriptor per fragment, posted and polled as tightly as possible), in the
//! same run, round by round, each round starting with another. UCX write and read between two
//! agents of this process (loopback), and POSIX disk write and read. "scattered" permutes the
//! ids on both sides, so nothing coalesces; "runs" moves consecutive ids, which kvxfer coalesces
//! into one descriptor per run. Every row also gives the same bytes moved as one contiguous
//! descriptor (`contiguous_gbps`, measured in the same rounds), what small pieces between hosts
//! should approach.

use std::time::Instant;

use kvxfer::{Context, ContextConfig, Layout, StorageKind, StorageSpec, TransferOptions};
use nixl_sys::{Agent, MemType, XferDescList, XferOp, XferStatus};

use super::common::{err, fragment_shape, legend, median};

/// (name, local side writes, the other layout, its NIXL memory type and id, its agent).
type Case<'a> = (&'a str, bool, &'a Layout, (MemType, u64), String);

pub struct NixlArgs {
    pub json: bool,
    pub total_mib: u64,
    pub iters: usize,
    pub fragments_kib: Vec<u64>,
}

/// Posts one request and spins on its status, as tightly as nixl-sys allows.
fn post_and_spin(
    agent: &Agent,
    write: bool,
    l: &XferDescList,
    r: &XferDescList,
    remote_agent: &str,
) -> Result<(), String> {
    let op = if write { XferOp::Write } else { XferOp::Read };
    let req = agent
        .create_xfer_req(op, l, r, remote_agent, None)
        .map_err(err)?;
    if agent.post_xfer_req(&req, None).map_err(err)? {
        while agent.get_xfer_status(&req).map_err(err)? == XferStatus::InProgress {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

/// nixl-sys directly: one descriptor per fragment, then a spin on the status.
#[allow(clippy::too_many_arguments)]
fn raw(
    agent: &Agent,
    write: bool,
    local: &Layout,
    lb: &[u64],
    remote: &Layout,
    rb: &[u64],
    remote_agent: &str,
    remote_mem: (MemType, u64),
) -> Result<(), String> {
    let mut l = XferDescList::new(MemType::Dram).map_err(err)?;
    let mut r = XferDescList::new(remote_mem.0).map_err(err)?;
    for (&a, &b) in lb.iter().zip(rb) {
        let (x, y) = (
            local.region(a, 0, 0).map_err(err)?,
            remote.region(b, 0, 0).map_err(err)?,
        );
        l.add_desc(x.addr as usize, x.len as usize, 0);
        r.add_desc(y.addr as usize, y.len as usize, remote_mem.1);
    }
    post_and_spin(agent, write, &l, &r, remote_agent)
}

/// nixl-sys directly, the same bytes as one descriptor on each side: from the start of
/// `local` and of `remote` (fragment layouts whose blocks are back to back), `bytes` long.
fn raw_contiguous(
    agent: &Agent,
    write: bool,
    local: &Layout,
    remote: &Layout,
    remote_agent: &str,
    remote_mem: (MemType, u64),
    bytes: u64,
) -> Result<(), String> {
    let mut l = XferDescList::new(MemType::Dram).map_err(err)?;
    let mut r = XferDescList::new(remote_mem.0).map_err(err)?;
    let (x, y) = (
        local.region(0, 0, 0).map_err(err)?,
        remote.region(0, 0, 0).map_err(err)?,
    );
    l.add_desc(x.addr as usize, bytes as usize, 0);
    r.add_desc(y.addr as usize, bytes as usize, remote_mem.1);
    post_and_spin(agent, write, &l, &r, remote_agent)
}

pub fn run(a: &NixlArgs) -> Result<(), String> {
    let ctx = Context::new(ContextConfig::default()).map_err(err)?;
    let peer_ctx = Context::new(ContextConfig::default()).map_err(err)?;
    let agent = ctx.nixl_agent().ok_or("bench --nixl needs NIXL")?.clone();
    if !a.json {
        println!(
            "NIXL bench: {} MiB per run, median of {} runs (GB/s; ratio = kvxfer / nixl-raw)",
            a.total_mib, a.iters
        );
        println!(
            "{:<12} {:<10} {:>9} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7}",
            "name", "ids", "fragment", "descs", "kvxfer", "raw", "ratio", "contig", "of it"
        );
    }
    for &kib in &a.fragments_kib {
        let fragment = kib << 10;
        let blocks = ((a.total_mib << 20) / fragment).max(1);
        let c = fragment_shape(blocks, fragment, 4096);
        let pinned = StorageSpec::new(StorageKind::Pinned);
        let local = ctx.new_layout(c, &pinned).map_err(err)?;
        let disk = ctx
            .new_layout(c, &StorageSpec::new(StorageKind::Disk))
            .map_err(err)?;
        let theirs = peer_ctx.new_layout(c, &pinned).map_err(err)?;
        let peer = ctx
            .import(&peer_ctx.export(&[&theirs]).map_err(err)?)
            .map_err(err)?;
        let remote = &peer.layouts()[0];
        let all: Vec<u64> = (0..blocks).collect();
        ctx.fill(&local, &all, 9).map_err(err)?;
        // The raw baselines name `local` in their descriptors: registered here, since kvxfer's
        // own writes of small pieces gather from it without NIXL.
        local.memory().ensure_nixl_registered(&agent).map_err(err)?;
        let mut rng = fastrand::Rng::with_seed(fragment);
        let (mut p1, mut p2) = (all.clone(), all.clone());
        rng.shuffle(&mut p1);
        rng.shuffle(&mut p2);
        // The raw side uses the descriptor kvxfer picks for these aligned fragments (O_DIRECT
        // where the file system allows it), so both go through the same kind of I/O.
        let file = disk
            .memory()
            .disk_file()
            .ok_or("a disk layout without a file")?;
        let disk_fd = file.direct_fd().unwrap_or(file.fd()) as u64;
        let disk_io = if file.direct_fd().is_some() {
            "O_DIRECT"
        } else {
            "buffered"
        };
        if !a.json && kib == a.fragments_kib[0] {
            println!("(disk I/O: {disk_io}, both sides)");
        }
        let cases: [Case<'_>; 4] = [
            (
                "ucx_write",
                true,
                remote.as_ref(),
                (MemType::Dram, 0),
                peer.agent().to_string(),
            ),
            (
                "ucx_read",
                false,
                remote.as_ref(),
                (MemType::Dram, 0),
                peer.agent().to_string(),
            ),
            (
                "posix_write",
                true,
                &disk,
                (MemType::File, disk_fd),
                agent.name(),
            ),
            (
                "posix_read",
                false,
                &disk,
                (MemType::File, disk_fd),
                agent.name(),
            ),
        ];
        let bytes = blocks * fragment;
        for (name, write, other, mem, other_agent) in &cases {
            // One kvxfer transfer first registers both sides with NIXL (kvxfer registers memory
            // on first use).
            let (src, dst) = if *write {
                (&local, *other)
            } else {
                (*other, &local)
            };
            ctx.submit(src, &all, dst, &all, &TransferOptions::default())
                .and_then(|t| t.wait(None))
                .map_err(err)?;
            for (ids, lb, rb) in [("scattered", &p1, &p2), ("runs", &all, &all)] {
                let (mut k, mut r, mut c) = (Vec::new(), Vec::new(), Vec::new());
                for i in 0..=a.iters {
                    let (src, sb, dst, db) = if *write {
                        (&local, lb, *other, rb)
                    } else {
                        (*other, rb, &local, lb)
                    };
                    // The three in turn, each round starting with another, so that drift
                    // (page-cache writeback, cache state, the transport's own swings) favours
                    // none of them.
                    let mut tk = 0.0;
                    let mut descs = 0;
                    let (mut tr, mut tc) = (0.0, 0.0);
                    for turn in 0..3 {
                        let t0 = Instant::now();
                        match (turn + i) % 3 {
                            0 => {
                                let t = ctx
                                    .submit(src, sb, dst, db, &TransferOptions::default())
                                    .map_err(err)?;
                                t.wait(None).map_err(err)?;
                                tk = t0.elapsed().as_secs_f64();
                                descs = t.stats().copies;
                            }
                            1 => {
                                raw(&agent, *write, &local, lb, other, rb, other_agent, *mem)?;
                                tr = t0.elapsed().as_secs_f64();
                            }
                            _ => {
                                // What the transport does with the same bytes in one piece:
                                // the ceiling that gathering small pieces aims at.
                                raw_contiguous(
                                    &agent,
                                    *write,
                                    &local,
                                    other,
                                    other_agent,
                                    *mem,
                                    bytes,
                                )?;
                                tc = t0.elapsed().as_secs_f64();
                            }
                        }
                    }
                    if i > 0 {
                        k.push((tk, descs));
                        r.push(tr);
                        c.push(tc);
                    }
                }
                let cg = bytes as f64 / median(c) / 1e9;
                let descs = k.first().map_or(0, |x| x.1);
                let kg = bytes as f64 / median(k.iter().map(|x| x.0).collect()) / 1e9;
                let rg = bytes as f64 / median(r) / 1e9;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "name": name, "ids": ids, "fragment_bytes": fragment,
                            "bytes": bytes, "descriptors": descs, "iters": a.iters,
                            "gbps": kg, "baseline": "nixl-raw", "disk_io": disk_io, "baseline_gbps": rg, "ratio": kg / rg,
                            "contiguous_gbps": cg, "ratio_to_contiguous": kg / cg,
                        })
                    );
                } else {
                    println!(
                        "{name:<12} {ids:<10} {:>5} KiB {descs:>8} {kg:>8.2} {rg:>8.2} {:>7.3} {cg:>8.2} {:>7.3}",
                        kib,
                        kg / rg,
                        kg / cg
                    );
                }
            }
        }
    }
    if !a.json {
        legend(&[
            (
                "kvxfer",
                "GB/s of kvxfer's transfer through its NIXL agent (submit to completion)",
            ),
            (
                "raw",
                "nixl-sys used directly on the same memory with the same descriptors",
            ),
            (
                "descs",
                "descriptors in the request after kvxfer merged neighbours",
            ),
            (
                "contig",
                "nixl-sys moving the same bytes as one descriptor each side; of it: kvxfer / contig",
            ),
            (
                "ids",
                "runs: consecutive block ids; scattered: a random permutation",
            ),
        ]);
    }
    Ok(())
}
