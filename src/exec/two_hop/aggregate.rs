//! Many small pieces to and from a peer's host layout through the peer's landing arena.
//! Writes: the pieces are gathered (host copies on idle workers) into a bounce buffer, each
//! chunk is written into one of the slots the peer granted this importer with one NIXL
//! request, and the peer's kvxfer copies the chunk's pieces into its layout when asked
//! (SCATTER) and says so (DONE). Over TCP posting a request moves its bytes on the posting
//! thread, so the gather of chunk k+1 runs on the other workers meanwhile, and the peer's
//! scatter of earlier chunks overlaps it too. The write's notification travels with the last
//! chunk's request: the peer delivers it only after placing those bytes. Reads: the peer is
//! asked to gather each chunk into a slot (GATHER, answered by DONE) ahead of time; this side
//! reads the slots with one request each, the next one posted before the previous completes,
//! and scatters each chunk locally (on the other workers) while it reads the next. Plans stay
//! NixlWrite / NixlReadFlipped.

use std::sync::Arc;
use std::time::Duration;

use nixl_sys::XferRequest;

use super::pipeline::{Chunks, chunks_of};
use super::{CHUNK, pool, spawner};
use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::exec::nixl::NixlExec;
use crate::exec::nixl::xfer::{Xfer, finish, start};
use crate::exec::workers::{PendingCopy, Spawner, Workers};
use crate::memory::{DeviceStaging, Landing, Memory, StorageKind, UseGuard};
use crate::nixl::NixlAgent;
use crate::options::{Mechanism, TransferStats};
use crate::plan::copy_list::CopyList;
use crate::plan::{CopyOp, Plan, Request};
use crate::transfer::{Completion, Transfer};

/// How long a chunk waits for the peer to place it before the peer is taken for dead.
const PLACED_WITHIN: Duration = Duration::from_secs(5);

/// The copy list of `request` (a write to a peer's layout, or with `!write` a read from it)
/// when it goes through the peer's landing arena: host memory on both sides (the peer's host
/// arena), or device memory on both sides (its device arena, staged on this context's device,
/// which holds the local layout), an arena that granted this importer slots, and pieces (after
/// neighbours merged) smaller on average than the peer's threshold (`Landing::below`: lower
/// for a peer on this host).
pub(crate) fn applies(request: &Request<'_>, write: bool) -> Option<CopyList> {
    let (local, remote) = match write {
        true => (request.src, request.dst),
        false => (request.dst, request.src),
    };
    let host = |k: StorageKind| k.is_host();
    let landing = remote.memory().landing().map(|(l, _)| l)?;
    let below = landing.below();
    let device = StorageKind::Device;
    let kinds = match (local.storage_kind(), remote.storage_kind()) {
        (l, r) if host(l) && host(r) => true,
        // The staging area is made here on first use; without it, pieces go one by one.
        (l, r) if l == device && r == device => landing.device_staging().is_some_and(|s| {
            s.inspect_err(|e| tracing::info!("no staging for a peer's device arena: {e}"))
                .is_ok_and(|(c, _)| c.device_id() == local.memory().device_id())
        }),
        _ => false,
    };
    let candidate = remote.is_remote()
        && kinds
        && request.fragments() > 0
        && request.bytes_with(request.transform().as_deref()) / request.fragments() < below;
    if !candidate {
        return None;
    }
    let list = request.build();
    (list.bytes / (list.copies.len() as u64).max(1) < below).then_some(list)
}

/// Starts the aggregated transfer of `request` (a write to the peer when `write`, else a read
/// from it), whose copy list `applies` gave, on a worker. `gate`: start after the work queued
/// on a caller's stream; `cuda_context`: the context has CUDA (so `stream_wait` can order a
/// stream after the transfer, as for any peer transfer).
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit(
    request: &Request<'_>,
    list: CopyList,
    plan: Plan,
    write: bool,
    nixl: &NixlExec,
    workers: &Workers,
    bounce: &Arc<pool::BouncePool>,
    notify: Option<&[u8]>,
    gate: Option<Arc<StreamGate>>,
    cuda_context: bool,
) -> Result<Transfer> {
    let remote = if write { request.dst } else { request.src };
    let internal = |what: &str| Error::Internal(format!("an aggregated transfer without {what}"));
    let (landing, export_id) = remote
        .memory()
        .landing()
        .map(|(l, id)| (l.clone(), id))
        .ok_or_else(|| internal("a landing arena"))?;
    let device = match remote.storage_kind() {
        StorageKind::Device => Some(
            landing
                .device_staging()
                .ok_or_else(|| internal("a staging area for the device arena"))??,
        ),
        _ => None,
    };
    let job = Job {
        device,
        landing,
        export_id,
        peer_agent: remote.peer().ok_or_else(|| internal("a peer"))?.to_string(),
        guard: remote
            .memory()
            .begin_remote_use()?
            .ok_or_else(|| internal("its layout's use state"))?,
        copier: spawner(workers)?,
        agent: nixl.agent.clone(),
        pool: bounce.clone(),
        notify: notify.map(<[u8]>::to_vec),
        list,
    };
    let stats = TransferStats {
        bounced: true,
        ..TransferStats::of(&job.list, plan, Mechanism::Nixl)
    };
    let completion = Completion::new(1);
    let keep = (request.src.memory().clone(), request.dst.memory().clone());
    workers.spawn_part(completion.clone(), gate, keep, move || job.run(write));
    Ok(Transfer::new(completion, stats, cuda_context))
}

/// One aggregated transfer, run on a worker.
struct Job {
    /// For a device arena: this context's device copier and staging area (else the bounce
    /// pool's pinned buffers stage, and host copies gather and scatter).
    device: Option<DeviceStaging>,
    landing: Arc<dyn Landing>,
    export_id: u64,
    peer_agent: String,
    /// This transfer's use of the peer's layout (a revocation stops the chunks not yet sent).
    guard: UseGuard,
    copier: Spawner,
    agent: Arc<NixlAgent>,
    pool: Arc<pool::BouncePool>,
    notify: Option<Vec<u8>>,
    list: CopyList,
}

/// Where a job's chunks go: the arena (the peer's memory) and this importer's slots in it, a
/// staging area here per slot, and the chunks.
struct Ends<'a> {
    arena: &'a Arc<Memory>,
    slots: &'a [u64],
    stages: Vec<(&'a Arc<Memory>, u64)>,
    chunks: Chunks,
    /// Slots in use: one chunk in each at a time.
    ways: usize,
}

impl Job {
    fn run(self, write: bool) -> Result<()> {
        let _one = self.landing.exclusive();
        let size = self.landing.slot_bytes().min(CHUNK);
        let lease = match self.device {
            Some(_) => None,
            None => Some(self.pool.take(|| pool::make_buffer(None))?),
        };
        let stages = match (&self.device, &lease) {
            (Some((_, area)), _) => stages(std::slice::from_ref(area), size),
            (None, Some(lease)) => {
                let bufs = lease.pair()?;
                for b in bufs {
                    b.ensure_nixl_registered(self.agent.agent())?;
                }
                stages(bufs, size)
            }
            (None, None) => return Err(Error::Internal("no staging area".into())),
        };
        let (arena, slots) = self.landing.slots();
        let ways = slots.len().min(stages.len());
        if ways == 0 {
            return Err(Error::Internal("no landing slot to use".into()));
        }
        let ends = Ends {
            arena,
            slots,
            stages,
            chunks: chunks_of(&self.list.copies, size),
            ways,
        };
        // Outstanding requests, per slot: after a failure the peer may still be placing or
        // gathering, and the next transfer must not reuse a slot under it.
        let mut outstanding: Vec<Option<u64>> = vec![None; ways];
        let result = match write {
            true => self.write(&ends, &mut outstanding),
            false => self.read(&ends, &mut outstanding),
        };
        for (b, o) in outstanding.iter().enumerate() {
            if let Some(seq) = o {
                let _ = self.landing.wait(b, *seq, PLACED_WITHIN);
            }
        }
        result
    }

    fn check_revoked(&self) -> Result<()> {
        match self.guard.revoked() {
            true => Err(Error::Peer(
                "the peer revoked this layout during the transfer".into(),
            )),
            false => Ok(()),
        }
    }

    /// One request for `slot` between this staging area and the arena.
    fn hop(&self, e: &Ends<'_>, slot: usize, len: u64, write: bool) -> Result<Option<XferRequest>> {
        let (buf, base) = e.stages[slot];
        let copies = [CopyOp {
            src: base,
            dst: e.slots[slot],
            len,
        }];
        let t = Xfer {
            write,
            local: buf,
            remote: e.arena,
            remote_agent: &self.peer_agent,
            copies: &copies,
            notify: None,
            remote_fd: None,
        };
        start(self.agent.agent(), &t, Error::Peer)
    }

    /// Chunk k's pieces gathered into its staging area, or with `!gather` scattered from it.
    fn local_copy(&self, e: &Ends<'_>, k: usize, gather: bool) -> Result<()> {
        if let Some(p) = self.begin_local_copy(e, k, gather)? {
            p.finish();
        }
        Ok(())
    }

    /// As `local_copy`, started on idle workers and finished by the caller (or on drop); a
    /// device staging area's copy is done (by the kernel) when this returns `None`.
    fn begin_local_copy(
        &self,
        e: &Ends<'_>,
        k: usize,
        gather: bool,
    ) -> Result<Option<PendingCopy>> {
        let mut at = e.stages[k % e.ways].1;
        let copies: Vec<CopyOp> = e.chunks[k]
            .iter()
            .map(|c| {
                let (src, dst) = match gather {
                    true => (c.src, at),
                    false => (at, c.dst),
                };
                at += c.len;
                CopyOp {
                    src,
                    dst,
                    len: c.len,
                }
            })
            .collect();
        if let Some((device, _)) = &self.device {
            // The layout's side is the local device layout's validated regions, on the copier's
            // device (`applies`); the staging area is this job's until it returns.
            let ops: Vec<(u64, u64, u64)> = copies.iter().map(|c| (c.src, c.dst, c.len)).collect();
            device.copy(&ops)?;
            return Ok(None);
        }
        // SAFETY: the layout's side is the local layout's validated regions, kept alive by the
        // job's part (`keep`); the staging area is this lease's, and no request uses it until
        // the copy is finished (a write from it finished before the copy began, a read into it
        // finished before its scatter began); the handle is finished before the lease goes.
        Ok(Some(unsafe { self.copier.begin(copies) }))
    }

    /// Gathers each chunk, writes it into a slot and asks the peer to place it. A chunk's
    /// write runs beside the next chunk's gather (on the other workers); its SCATTER is sent
    /// once it completed.
    fn write(&self, e: &Ends<'_>, unplaced: &mut [Option<u64>]) -> Result<()> {
        let n = e.chunks.len();
        let scatter = |k: usize, unplaced: &mut [Option<u64>]| -> Result<()> {
            let seq = fastrand::u64(..);
            let note = self.notify.as_deref().filter(|_| k + 1 == n);
            let pieces = in_slot(&e.chunks[k], |c| c.dst);
            self.landing
                .scatter(k % e.ways, seq, self.export_id, &pieces, note)?;
            unplaced[k % e.ways] = Some(seq);
            Ok(())
        };
        // The write in flight: its chunk and request.
        let mut writing: Option<(usize, Option<XferRequest>)> = None;
        let place =
            |w: Option<(usize, Option<XferRequest>)>, unplaced: &mut [Option<u64>]| -> Result<()> {
                if let Some((j, req)) = w {
                    finish(self.agent.agent(), req, Error::Peer, false)?;
                    scatter(j, unplaced)?;
                }
                Ok(())
            };
        // Where a write's time goes (trace): waiting for slots, gathering, waiting for writes.
        let mut spent = [Duration::ZERO; 3];
        let timed = |slot: &mut Duration, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let t = std::time::Instant::now();
            let r = f();
            *slot += t.elapsed();
            r
        };
        let started_at = std::time::Instant::now();
        // The next chunk's gather, begun on idle workers while this thread posts a write.
        let mut next: Option<(usize, Option<PendingCopy>)> = None;
        let result = (|| -> Result<()> {
            for k in 0..n {
                let b = k % e.ways;
                // With a single slot, the chunk in flight is this slot's: placed first.
                if writing.as_ref().is_some_and(|(j, _)| j % e.ways == b) {
                    timed(&mut spent[2], &mut || place(writing.take(), unplaced))?;
                }
                timed(&mut spent[1], &mut || match next.take() {
                    Some((j, gathering)) if j == k => {
                        if let Some(g) = gathering {
                            g.finish();
                        }
                        Ok(())
                    }
                    _ => self.local_copy(e, k, true),
                })?;
                if let Some(seq) = unplaced[b].take() {
                    timed(&mut spent[0], &mut || {
                        self.landing.wait(b, seq, PLACED_WITHIN)
                    })?;
                }
                self.check_revoked()?;
                // Chunk k+1's staging area was last written from by chunk k+1-ways, whose
                // write finished when that is before chunk k-1 (the one still in flight).
                if k + 1 < n && e.ways >= 3 {
                    next = Some((k + 1, self.begin_local_copy(e, k + 1, true)?));
                }
                let len = e.chunks[k].iter().map(|c| c.len).sum();
                let mut started = self.hop(e, b, len, true)?;
                timed(&mut spent[2], &mut || {
                    place(writing.replace((k, started.take())), unplaced)
                })?;
            }
            place(writing.take(), unplaced)?;
            for (b, u) in unplaced.iter_mut().enumerate() {
                if let Some(seq) = u.take() {
                    self.landing.wait(b, seq, PLACED_WITHIN)?;
                }
            }
            Ok(())
        })();
        tracing::trace!(
            chunks = n,
            total_us = started_at.elapsed().as_micros() as u64,
            slot_wait_us = spent[0].as_micros() as u64,
            gather_us = spent[1].as_micros() as u64,
            write_wait_us = spent[2].as_micros() as u64,
            "aggregated write"
        );
        if let Some((_, req)) = writing.take() {
            let _ = finish(self.agent.agent(), req, Error::Peer, false);
        }
        result
    }

    /// Asks the peer to gather chunks into the slots ahead, reads each and scatters it here.
    fn read(&self, e: &Ends<'_>, asked: &mut [Option<u64>]) -> Result<()> {
        let n = e.chunks.len();
        let ask = |k: usize, asked: &mut [Option<u64>]| -> Result<()> {
            self.check_revoked()?;
            let seq = fastrand::u64(..);
            let pieces = in_slot(&e.chunks[k], |c| c.src);
            self.landing
                .gather(k % e.ways, seq, self.export_id, &pieces)?;
            asked[k % e.ways] = Some(seq);
            Ok(())
        };
        for k in 0..n.min(e.ways) {
            ask(k, asked)?;
        }
        // Chunk k+1's read is posted before chunk k's completes (the transport then never
        // waits for the next request), where staging areas allow: it lands in the area whose
        // last scatter (chunk k+1-ways) finished, as at most chunk k-1's is still running.
        let ahead = e.ways >= 3;
        let post = |k: usize, asked: &mut [Option<u64>]| -> Result<Option<XferRequest>> {
            let b = k % e.ways;
            if let Some(seq) = asked[b].take() {
                self.landing.wait(b, seq, PLACED_WITHIN)?;
            }
            let len = e.chunks[k].iter().map(|c| c.len).sum();
            self.hop(e, b, len, false)
        };
        let mut next: Option<(usize, Option<XferRequest>)> = None;
        // The previous chunk's scatter, run by idle workers while this thread reads.
        let mut scattering: Option<PendingCopy> = None;
        let result = (|| -> Result<()> {
            for k in 0..n {
                let req = match next.take() {
                    Some((j, r)) if j == k => r,
                    _ => post(k, asked)?,
                };
                let early = (ahead && k + 1 < n).then(|| post(k + 1, asked));
                // Chunk k's request is finished even when the next one could not be posted.
                let done = finish(self.agent.agent(), req, Error::Peer, false);
                if let Some(r) = early {
                    next = Some((k + 1, r?));
                }
                done?;
                if k + e.ways < n {
                    ask(k + e.ways, asked)?;
                }
                if let Some(p) = scattering.take() {
                    p.finish();
                }
                match e.ways {
                    1 => self.local_copy(e, k, false)?,
                    _ => scattering = self.begin_local_copy(e, k, false)?,
                }
            }
            Ok(())
        })();
        if let Some((_, req)) = next.take() {
            let _ = finish(self.agent.agent(), req, Error::Peer, false);
        }
        if let Some(p) = scattering.take() {
            p.finish();
        }
        result
    }
}

/// Staging areas of `size` bytes cut from buffers (a pair of bounce buffers, or a device
/// staging area).
fn stages(bufs: &[Arc<Memory>], size: u64) -> Vec<(&Arc<Memory>, u64)> {
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
