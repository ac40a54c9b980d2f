//! Many small pieces to and from a peer's host layout through the peer's landing arena.
//! Writes: the pieces are gathered (host copies, shared with idle workers) into a bounce
//! buffer, each chunk is written into one of the slots the peer granted this importer with one
//! NIXL request, and the peer's kvxfer copies the chunk's pieces into its layout when asked
//! (SCATTER) and says so (DONE); the gather of chunk k+1 and the peer's scatter of earlier
//! chunks overlap the write of chunk k. The write's notification travels with the last chunk's
//! request: the peer delivers it only after placing those bytes. Reads: the peer is asked to
//! gather each chunk into a slot (GATHER, answered by DONE) ahead of time, this side reads the
//! slot with one request and scatters it locally. Plans stay NixlWrite / NixlReadFlipped.

use std::sync::Arc;
use std::time::Duration;

use super::pipeline::chunks_of;
use super::{CHUNK, pool, spawner};
use crate::error::{Error, Result};
use crate::exec::nixl::NixlExec;
use crate::exec::nixl::xfer::{Xfer, finish, start};
use crate::exec::workers::Workers;
use crate::memory::{Memory, StorageKind};
use crate::options::{Mechanism, TransferStats};
use crate::plan::copy_list::CopyList;
use crate::plan::{CopyOp, Plan, Request};
use crate::transfer::{Completion, Transfer};

/// How long a chunk waits for the peer to place it before the peer is taken for dead.
const PLACED_WITHIN: Duration = Duration::from_secs(5);

/// The copy list of `request` (a write to a peer's layout, or with `!write` a read from it)
/// when it goes through the peer's landing arena: host memory on both sides, an arena that
/// granted this importer slots, and pieces (after neighbours merged) smaller on average than
/// the peer's threshold (`Landing::below`: lower for a peer on this host).
pub(crate) fn applies(request: &Request<'_>, write: bool) -> Option<CopyList> {
    let (local, remote) = match write {
        true => (request.src, request.dst),
        false => (request.dst, request.src),
    };
    let host = |k: StorageKind| k.is_host();
    let below = remote.memory().landing().map(|(l, _)| l.below())?;
    let candidate = remote.is_remote()
        && host(remote.storage_kind())
        && host(local.storage_kind())
        && request.fragments() > 0
        && request.bytes_with(request.transform().as_deref()) / request.fragments() < below;
    if !candidate {
        return None;
    }
    let list = request.build();
    (list.bytes / (list.copies.len() as u64).max(1) < below).then_some(list)
}

/// Starts the aggregated write of `request`, whose copy list `applies` gave, on a worker.
pub(crate) fn submit_write(
    request: &Request<'_>,
    list: CopyList,
    plan: Plan,
    nixl: &NixlExec,
    workers: &Workers,
    bounce: &Arc<pool::BouncePool>,
    notify: Option<&[u8]>,
) -> Result<Transfer> {
    let remote = request.dst;
    let (landing, export_id) = remote
        .memory()
        .landing()
        .map(|(l, id)| (l.clone(), id))
        .ok_or_else(|| Error::Internal("an aggregated write without a landing arena".into()))?;
    let peer_agent = remote
        .peer()
        .ok_or_else(|| Error::Internal("an aggregated write without a peer".into()))?
        .to_string();
    let guard = remote
        .memory()
        .begin_remote_use()?
        .ok_or_else(|| Error::Internal("a peer layout without its use state".into()))?;
    let copier = spawner(workers)?;
    let stats = TransferStats {
        bounced: true,
        ..TransferStats::of(&list, plan, Mechanism::Nixl)
    };
    let completion = Completion::new(1);
    let (agent, pool) = (nixl.agent.clone(), bounce.clone());
    let notify = notify.map(<[u8]>::to_vec);
    let keep = (request.src.memory().clone(), request.dst.memory().clone());
    workers.spawn_part(completion.clone(), None, keep, move || {
        let _one = landing.exclusive();
        let lease = pool.take(|| pool::make_buffer(None))?;
        let bufs = lease.pair()?;
        for b in bufs {
            b.ensure_nixl_registered(agent.agent())?;
        }
        let (arena, slots) = landing.slots();
        let size = landing.slot_bytes().min(CHUNK);
        let chunks = chunks_of(&list.copies, size);
        let stages = stages(bufs, size);
        // Per slot: the sequence number of its SCATTER the peer has not answered yet. The write
        // in flight (its chunk, its request) gets its SCATTER once it completed, which is
        // waited for after the next chunk was gathered and its write started.
        let ways = slots.len().min(stages.len());
        let mut unplaced: Vec<Option<u64>> = vec![None; ways];
        let mut writing: Option<(usize, Option<nixl_sys::XferRequest>)> = None;
        let n = chunks.len();
        let scatter = |k: usize, unplaced: &mut [Option<u64>]| -> Result<()> {
            let seq = fastrand::u64(..);
            let note = notify.as_deref().filter(|_| k + 1 == n);
            let pieces = in_slot(&chunks[k], |c| c.dst);
            landing.scatter(k % ways, seq, export_id, &pieces, note)?;
            unplaced[k % ways] = Some(seq);
            Ok(())
        };
        let result = (|| -> Result<()> {
            for k in 0..n {
                let b = k % ways;
                // With a single slot, the chunk in flight is this slot's: placed first.
                if writing.as_ref().is_some_and(|(j, _)| j % ways == b)
                    && let Some((j, req)) = writing.take()
                {
                    finish(agent.agent(), req, Error::Peer, false)?;
                    scatter(j, &mut unplaced)?;
                }
                if let Some(seq) = unplaced[b].take() {
                    landing.wait(b, seq, PLACED_WITHIN)?;
                }
                if guard.revoked() {
                    return Err(Error::Peer(
                        "the peer revoked this layout during the transfer".into(),
                    ));
                }
                let (buf, base) = stages[b];
                let mut at = base;
                let gather: Vec<CopyOp> = chunks[k]
                    .iter()
                    .map(|c| {
                        let g = CopyOp {
                            src: c.src,
                            dst: at,
                            len: c.len,
                        };
                        at += c.len;
                        g
                    })
                    .collect();
                // SAFETY: sources are the local layout's validated regions, kept alive by
                // `keep`; the destination is this lease's staging area, whose previous write
                // finished before its SCATTER was sent (and answered, above).
                unsafe { copier.copy(&gather) };
                let write = [CopyOp {
                    src: base,
                    dst: slots[b],
                    len: at - base,
                }];
                let t = Xfer {
                    write: true,
                    local: buf,
                    remote: arena,
                    remote_agent: &peer_agent,
                    copies: &write,
                    notify: None,
                    remote_fd: None,
                };
                let started = start(agent.agent(), &t, Error::Peer)?;
                // The previous chunk's write ran beside this chunk's gather and start.
                if let Some((j, req)) = writing.replace((k, started)) {
                    finish(agent.agent(), req, Error::Peer, false)?;
                    scatter(j, &mut unplaced)?;
                }
            }
            if let Some((j, req)) = writing.take() {
                finish(agent.agent(), req, Error::Peer, false)?;
                scatter(j, &mut unplaced)?;
            }
            for (b, u) in unplaced.iter_mut().enumerate() {
                if let Some(seq) = u.take() {
                    landing.wait(b, seq, PLACED_WITHIN)?;
                }
            }
            Ok(())
        })();
        // After a failure the slots may still be read by the peer: the next transfer waits
        // for what is outstanding (or for the peer to be taken for dead) before reusing them.
        if let Some((_, req)) = writing.take() {
            let _ = finish(agent.agent(), req, Error::Peer, false);
        }
        for (b, u) in unplaced.iter().enumerate() {
            if let Some(seq) = u {
                let _ = landing.wait(b, *seq, PLACED_WITHIN);
            }
        }
        result
    });
    Ok(Transfer::new(completion, stats, false))
}

/// Starts the aggregated read of `request`, whose copy list `applies` gave, on a worker.
pub(crate) fn submit_read(
    request: &Request<'_>,
    list: CopyList,
    plan: Plan,
    nixl: &NixlExec,
    workers: &Workers,
    bounce: &Arc<pool::BouncePool>,
) -> Result<Transfer> {
    let remote = request.src;
    let (landing, export_id) = remote
        .memory()
        .landing()
        .map(|(l, id)| (l.clone(), id))
        .ok_or_else(|| Error::Internal("an aggregated read without a landing arena".into()))?;
    let peer_agent = remote
        .peer()
        .ok_or_else(|| Error::Internal("an aggregated read without a peer".into()))?
        .to_string();
    let guard = remote
        .memory()
        .begin_remote_use()?
        .ok_or_else(|| Error::Internal("a peer layout without its use state".into()))?;
    let copier = spawner(workers)?;
    let stats = TransferStats {
        bounced: true,
        ..TransferStats::of(&list, plan, Mechanism::Nixl)
    };
    let completion = Completion::new(1);
    let (agent, pool) = (nixl.agent.clone(), bounce.clone());
    let keep = (request.src.memory().clone(), request.dst.memory().clone());
    workers.spawn_part(completion.clone(), None, keep, move || {
        let _one = landing.exclusive();
        let lease = pool.take(|| pool::make_buffer(None))?;
        let bufs = lease.pair()?;
        for b in bufs {
            b.ensure_nixl_registered(agent.agent())?;
        }
        let (arena, slots) = landing.slots();
        let size = landing.slot_bytes().min(CHUNK);
        let chunks = chunks_of(&list.copies, size);
        let stages = stages(bufs, size);
        let ways = slots.len().min(stages.len());
        let n = chunks.len();
        let mut asked: Vec<Option<u64>> = vec![None; ways];
        let ask = |k: usize, asked: &mut [Option<u64>]| -> Result<()> {
            if guard.revoked() {
                return Err(Error::Peer(
                    "the peer revoked this layout during the transfer".into(),
                ));
            }
            let seq = fastrand::u64(..);
            landing.gather(k % ways, seq, export_id, &in_slot(&chunks[k], |c| c.src))?;
            asked[k % ways] = Some(seq);
            Ok(())
        };
        let result = (|| -> Result<()> {
            for k in 0..n.min(ways) {
                ask(k, &mut asked)?;
            }
            for k in 0..n {
                let b = k % ways;
                if let Some(seq) = asked[b].take() {
                    landing.wait(b, seq, PLACED_WITHIN)?;
                }
                let (buf, base) = stages[b];
                let len: u64 = chunks[k].iter().map(|c| c.len).sum();
                let read = [CopyOp {
                    src: base,
                    dst: slots[b],
                    len,
                }];
                let t = Xfer {
                    write: false,
                    local: buf,
                    remote: arena,
                    remote_agent: &peer_agent,
                    copies: &read,
                    notify: None,
                    remote_fd: None,
                };
                finish(
                    agent.agent(),
                    start(agent.agent(), &t, Error::Peer)?,
                    Error::Peer,
                    false,
                )?;
                if k + ways < n {
                    ask(k + ways, &mut asked)?;
                }
                let mut at = base;
                let scatter: Vec<CopyOp> = chunks[k]
                    .iter()
                    .map(|c| {
                        let s = CopyOp {
                            src: at,
                            dst: c.dst,
                            len: c.len,
                        };
                        at += c.len;
                        s
                    })
                    .collect();
                // SAFETY: the source is this lease's staging area, just read; destinations are
                // the local layout's validated regions, kept alive by `keep`.
                unsafe { copier.copy(&scatter) };
            }
            Ok(())
        })();
        // Gathers still asked for are waited for before the slots go to another transfer.
        for (b, a) in asked.iter().enumerate() {
            if let Some(seq) = a {
                let _ = landing.wait(b, *seq, PLACED_WITHIN);
            }
        }
        result
    });
    Ok(Transfer::new(completion, stats, false))
}

/// Staging areas of `size` bytes cut from a pair of bounce buffers.
fn stages(bufs: &pool::Pair, size: u64) -> Vec<(&Arc<Memory>, u64)> {
    bufs.iter()
        .flat_map(|b| {
            let r = b.regions()[0];
            (0..r.len / size).map(move |i| (b, r.addr + i * size))
        })
        .collect()
}

/// A chunk's pieces as (offset in the slot, the peer's address, length), the peer's address
/// taken by `peer` (the destination of a write, the source of a read).
fn in_slot(chunk: &[CopyOp], peer: impl Fn(&CopyOp) -> u64) -> Vec<(u64, u64, u64)> {
    let mut off = 0;
    chunk
        .iter()
        .map(|c| {
            let p = (off, peer(c), c.len);
            off += c.len;
            p
        })
        .collect()
}
