//! Transfers through NIXL (disk files of this agent, memory of peers): descriptor lists from the
//! copy list, a request made on the context's agent by the submitting thread, and a progress
//! thread that posts it and learns when it finished. NIXL reports completion only through
//! status checks, so while requests are in flight the thread checks them with a short, growing
//! pause (10 µs to PEER_CHECK_MAX; every DISK_CHECK while disk requests run); with none in
//! flight it sleeps on its channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use nixl_sys::{Agent, OptArgs, XferDescList, XferOp, XferRequest, XferStatus};

use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::memory::{Memory, StorageKind, UseGuard};
use crate::plan::CopyOp;
use crate::transfer::Completion;

/// Pause between status checks while disk requests are in flight. NIXL's POSIX backend submits
/// at most 64 I/Os per check, so the checks pace the disk; back-to-back checks (yielding the
/// CPU) moved scattered 4 KiB writes about twice as fast on the build machine, but kept a core
/// busy for as long as any disk transfer ran. At this pause kvxfer still ran 1.2-2.8x raw
/// NIXL's spinning loop there (disk offsets sorted, see copy_list::sort_by_dst).
const DISK_CHECK: Duration = Duration::from_micros(20);

/// Longest pause between status checks of peer requests, which NIXL's own thread advances:
/// the checks only notice the end. At 200 µs a 64 MiB transfer over UCX loopback (~3 ms) was
/// noticed ~0.1 ms late on average, a few percent of it.
const PEER_CHECK_MAX: Duration = Duration::from_micros(50);

/// Most descriptors in one request to NIXL's GDS backend (cuFile's batch API). Where cuFile
/// runs in compat mode (no nvidia-fs) each descriptor holds one of its bounce buffers for the
/// whole batch, 64 per size class by default (cufile.json `posix_pool_slab_count`); a request
/// of 192 descriptors waited for its own buffers forever (docs/BENCHMARKS.md,
/// "Two GPUs, GPU RDMA between processes, GDS, two-hop again"), 48 went through. Together with one GDS request in flight per agent, no
/// batch can wait on another. NIXL's GDS_MT backend does one I/O per thread and needs neither.
pub(crate) const GDS_BATCH_MAX: usize = 32;

struct Pending {
    /// Made by the submitting thread, posted by the progress thread: a post may move the data
    /// itself before it returns (UCX over shared memory copied 1 GiB inside it, ~80 ms), which
    /// must not hold up the thread that submitted.
    req: XferRequest,
    /// Requests of the same transfer to post, one after the other, once `req` finished (a GDS
    /// transfer cut into GDS_BATCH_MAX pieces); all were made before anything was posted.
    then: VecDeque<XferRequest>,
    /// One at a time per agent: a request for NIXL's GDS (batch) backend.
    serial: bool,
    /// The write notification, passed again when posting.
    notify: Option<Vec<u8>>,
    completion: Arc<Completion>,
    /// The memories the request reads and writes stay alive until it finished.
    _hold: Vec<Arc<Memory>>,
    error: fn(String) -> Error,
    /// A disk request: NIXL's POSIX backend needs frequent status checks to progress.
    disk: bool,
    /// The use of a peer's layout, ended when the request finished (the peer's revocation of
    /// the layout is acknowledged only then).
    use_guard: Option<UseGuard>,
    /// Posted only once this passed: the work queued on a caller's stream at submit.
    gate: Option<Arc<StreamGate>>,
}

/// One NIXL transfer: NIXL's local side (host memory of this process, or device memory) and its
/// "remote" side (a disk file of this agent, or a peer's memory), with `copies` given as
/// (local address, remote address, length). `write` moves local -> remote.
pub(crate) struct Xfer<'a> {
    pub(crate) write: bool,
    pub(crate) local: &'a Arc<Memory>,
    pub(crate) remote: &'a Arc<Memory>,
    pub(crate) remote_agent: &'a str,
    pub(crate) copies: &'a [CopyOp],
    pub(crate) notify: Option<&'a [u8]>,
    /// For a disk: the descriptor to use instead of the file's buffered one (its O_DIRECT
    /// descriptor, when every copy is aligned for it).
    pub(crate) remote_fd: Option<u64>,
}

/// The O_DIRECT descriptor of `disk` when it has one and every copy, given as (host address,
/// file offset, length), is aligned for it; `None` means the buffered descriptor.
pub(crate) fn direct_fd(disk: &Memory, copies: &[CopyOp]) -> Option<u64> {
    let fd = disk.disk_file()?.direct_fd()?;
    let a = crate::memory::disk::DIRECT_ALIGN;
    copies
        .iter()
        .all(|c| c.src % a == 0 && c.dst % a == 0 && c.len % a == 0)
        .then_some(fd as u64)
}

/// Cuts `copies` (local address, remote address, length) where either side crosses from one
/// NIXL registration into the next: NIXL finds no backend for a descriptor that spans two
/// (a one-block fully contiguous source coalesced against a disk layout whose per-layer
/// allocations lie back to back, for one).
fn split_at_registrations(local: &Memory, remote: &Memory, copies: &[CopyOp]) -> Vec<CopyOp> {
    let sorted = |m: &Memory| {
        let mut spans = m.nixl_spans();
        spans.sort_unstable_by_key(|r| r.addr);
        spans
    };
    let (ls, rs) = (sorted(local), sorted(remote));
    // Bytes left in the span holding `addr`; all of `len` where no span holds it (never for a
    // validated request), so the piece goes to NIXL whole and NIXL judges it.
    let room = |spans: &[crate::memory::Region], addr: u64, len: u64| {
        let i = spans.partition_point(|r| r.addr <= addr);
        match i.checked_sub(1).map(|i| spans[i]) {
            Some(r) if addr < r.end() => (r.end() - addr).min(len),
            _ => len,
        }
    };
    let mut out = Vec::with_capacity(copies.len());
    for c in copies {
        let mut c = *c;
        while c.len > 0 {
            let n = room(&ls, c.src, c.len).min(room(&rs, c.dst, c.len));
            out.push(CopyOp { len: n, ..c });
            c = CopyOp {
                src: c.src + n,
                dst: c.dst + n,
                len: c.len - n,
            };
        }
    }
    out
}

pub(crate) struct NixlProgress {
    tx: Option<Sender<Pending>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NixlProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NixlProgress")
    }
}

fn run(agent: Agent, rx: Receiver<Pending>) {
    let mut pending: Vec<Pending> = Vec::new();
    // Serial requests waiting for the one in flight (see GDS_BATCH_MAX).
    let mut queued: VecDeque<Pending> = VecDeque::new();
    // Requests waiting for their caller's stream (`gate`), in submission order.
    let mut gated: VecDeque<Pending> = VecDeque::new();
    let mut pause = Duration::from_micros(10);
    loop {
        let received = if pending.is_empty() && queued.is_empty() && gated.is_empty() {
            match rx.recv() {
                Ok(p) => Some(p),
                Err(_) => return, // closed and nothing in flight
            }
        } else {
            match rx.recv_timeout(pause) {
                Ok(p) => Some(p),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // Closing: finish what is in flight before leaving.
                    std::thread::sleep(pause);
                    None
                }
            }
        };
        gated.extend(received);
        // Requests whose gate passed (or that have none) go on; the others wait (transfers
        // promise no order among themselves, so one waiting holds back no other).
        for mut p in std::mem::take(&mut gated) {
            match p.gate.as_ref().map(|g| g.passed()) {
                Some(Ok(false)) => gated.push_back(p),
                Some(Err(e)) => p.finish(Err(e)),
                Some(Ok(true)) | None if p.serial => queued.push_back(p),
                Some(Ok(true)) | None => pending.extend(post_pending(&agent, p)),
            }
        }
        let before = pending.len();
        pending.retain_mut(|p| match agent.get_xfer_status(&p.req) {
            Ok(XferStatus::InProgress) => true,
            Ok(XferStatus::Success) => match p.then.pop_front() {
                // The next piece of the same transfer takes the finished one's place; one that
                // finished inside its post is seen done at the next check.
                Some(req) => {
                    drop(std::mem::replace(&mut p.req, req));
                    match post(&agent, &p.req, p.notify_now(), p.error) {
                        Ok(_) => true,
                        Err(e) => {
                            p.finish(Err(e));
                            false
                        }
                    }
                }
                None => {
                    p.finish(Ok(()));
                    false
                }
            },
            Err(e) => {
                let e = (p.error)(format!("NIXL transfer failed: {e}"));
                p.finish(Err(e));
                false
            }
        });
        if !pending.iter().any(|p| p.serial) {
            while let Some(p) = queued.pop_front() {
                if let Some(p) = post_pending(&agent, p) {
                    pending.push(p);
                    break;
                }
            }
        }
        // NIXL's POSIX backend advances its I/O queue only inside status checks: with disk
        // requests in flight the checks come every DISK_CHECK.
        let disk = pending.iter().any(|p| p.disk);
        pause = if disk {
            DISK_CHECK
        } else if pending.len() < before {
            Duration::from_micros(10)
        } else {
            (pause * 2).min(PEER_CHECK_MAX)
        };
    }
}

impl Pending {
    /// Reports the transfer's outcome, after letting go of its memory and its use of a peer's
    /// layout: once a waiter sees the transfer done, freeing a layout releases it at once (a
    /// disk file can be opened again, a peer's revocation is acknowledged).
    fn finish(&mut self, result: Result<()>) {
        self._hold.clear();
        self.use_guard = None;
        self.completion.part_done(result);
    }

    /// The notification goes with the last request of a transfer, after all its data.
    fn notify_now(&self) -> Option<&[u8]> {
        if self.then.is_empty() {
            self.notify.as_deref()
        } else {
            None
        }
    }
}

/// Posts a request handed to the progress thread; `Some` while it is in flight. A request to a
/// layout its peer revoked in the meantime is failed instead.
fn post_pending(agent: &Agent, mut p: Pending) -> Option<Pending> {
    if p.use_guard.as_ref().is_some_and(UseGuard::revoked) {
        p.finish(Err(Error::Peer(
            "the peer freed this layout before the transfer was posted; nothing was sent".into(),
        )));
        return None;
    }
    match post(agent, &p.req, p.notify_now(), p.error) {
        // Finished at once with pieces left: the status check of the next round moves on.
        Ok(false) if !p.then.is_empty() => Some(p),
        Ok(true) => Some(p),
        Ok(false) => {
            p.finish(Ok(()));
            None
        }
        Err(e) => {
            p.finish(Err(e));
            None
        }
    }
}

impl NixlProgress {
    pub(crate) fn new(agent: &Agent) -> Result<Self> {
        let (tx, rx) = unbounded();
        let agent = agent.clone();
        let thread = std::thread::Builder::new()
            .name("kvx-nixl".into())
            .spawn(move || run(agent, rx))
            .map_err(|e| Error::OutOfMemory(format!("cannot start NIXL progress thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Makes the request of `t` here (a refused request is an error of this call) and hands
    /// it to the progress thread, which posts it; `completion` (one part) completes when NIXL
    /// reports the request finished. Failures are `error` (IO for disk, PEER for peers). With
    /// `gds_batch` (a device <-> disk transfer on an agent with NIXL's GDS backend) the copies
    /// go as requests of at most GDS_BATCH_MAX, all made here first, posted one after the
    /// other and one GDS request at a time per agent. `gate`: posted once the work queued on a
    /// caller's stream at submit is done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post(
        &self,
        agent: &Agent,
        t: Xfer<'_>,
        completion: Arc<Completion>,
        error: fn(String) -> Error,
        gds_batch: bool,
        use_guard: Option<UseGuard>,
        gate: Option<Arc<StreamGate>>,
    ) -> Result<()> {
        let pieces = split_at_registrations(t.local, t.remote, t.copies);
        let t = Xfer {
            copies: &pieces,
            ..t
        };
        let mut reqs: VecDeque<XferRequest> = if gds_batch && t.copies.len() > GDS_BATCH_MAX {
            let n = t.copies.len().div_ceil(GDS_BATCH_MAX);
            let mut v = VecDeque::with_capacity(n);
            for (i, piece) in t.copies.chunks(GDS_BATCH_MAX).enumerate() {
                let last = i + 1 == n;
                let part = Xfer {
                    copies: piece,
                    notify: if last { t.notify } else { None },
                    ..t
                };
                v.push_back(prepare(agent, &part, error)?);
            }
            v
        } else {
            VecDeque::from([prepare(agent, &t, error)?])
        };
        let Some(req) = reqs.pop_front() else {
            return Ok(());
        };
        if let Some(tx) = &self.tx {
            let _ = tx.send(Pending {
                req,
                then: reqs,
                serial: gds_batch,
                notify: t.notify.map(<[u8]>::to_vec),
                completion,
                _hold: vec![t.local.clone(), t.remote.clone()],
                error,
                disk: t.remote.kind() == StorageKind::Disk,
                use_guard,
                gate,
            });
        }
        Ok(())
    }
}

/// NIXL's options for a write that carries `notify`.
fn notify_args(notify: Option<&[u8]>) -> Result<Option<OptArgs>> {
    let Some(msg) = notify else {
        return Ok(None);
    };
    let nixl = |e: nixl_sys::NixlError| Error::Nixl(format!("NIXL transfer: {e}"));
    let mut a = OptArgs::new().map_err(nixl)?;
    a.set_notification_message(msg).map_err(nixl)?;
    // The message alone is not sent: NIXL sends it only with hasNotif set.
    a.set_has_notification(true).map_err(nixl)?;
    Ok(Some(a))
}

/// Makes (but does not post) the request of `t`, whose copies lie inside registrations
/// (`split_at_registrations`).
fn prepare(agent: &Agent, t: &Xfer<'_>, error: fn(String) -> Error) -> Result<XferRequest> {
    let nixl = |e: nixl_sys::NixlError| Error::Nixl(format!("NIXL transfer: {e}"));
    let (lt, ldev) = t.local.nixl_type();
    let (rt, rdev) = t.remote.nixl_type();
    let rdev = t.remote_fd.unwrap_or(rdev);
    let mut local = XferDescList::new(lt).map_err(nixl)?;
    let mut remote = XferDescList::new(rt).map_err(nixl)?;
    for c in t.copies {
        local.add_desc(c.src as usize, c.len as usize, ldev);
        remote.add_desc(c.dst as usize, c.len as usize, rdev);
    }
    let args = notify_args(t.notify)?;
    let op = if t.write { XferOp::Write } else { XferOp::Read };
    agent
        .create_xfer_req(op, &local, &remote, t.remote_agent, args.as_ref())
        .map_err(|e| error(format!("NIXL refused the transfer request: {e}")))
}

/// Posts `req`; `true` while it is in flight.
fn post(
    agent: &Agent,
    req: &XferRequest,
    notify: Option<&[u8]>,
    error: fn(String) -> Error,
) -> Result<bool> {
    let args = notify_args(notify)?;
    agent
        .post_xfer_req(req, args.as_ref())
        .map_err(|e| error(format!("NIXL could not start the transfer: {e}")))
}

/// Makes and posts the request of `t` on the calling (worker) thread; `None` when it finished
/// at once.
pub(crate) fn start(
    agent: &Agent,
    t: &Xfer<'_>,
    error: fn(String) -> Error,
) -> Result<Option<XferRequest>> {
    let pieces = split_at_registrations(t.local, t.remote, t.copies);
    let t = &Xfer {
        copies: &pieces,
        ..*t
    };
    let req = prepare(agent, t, error)?;
    Ok(post(agent, &req, t.notify, error)?.then_some(req))
}

/// Blocks the calling (worker) thread until `req` finished, checking it with the same short,
/// growing pause as the progress thread.
pub(crate) fn finish(
    agent: &Agent,
    req: Option<XferRequest>,
    error: fn(String) -> Error,
    t_disk: bool,
) -> Result<()> {
    let Some(req) = req else {
        return Ok(());
    };
    let mut pause = Duration::from_micros(10);
    loop {
        match agent.get_xfer_status(&req) {
            Ok(XferStatus::Success) => return Ok(()),
            Ok(XferStatus::InProgress) => {}
            Err(e) => return Err(error(format!("NIXL transfer failed: {e}"))),
        }
        // Disk requests progress only inside status checks (see `run`).
        if t_disk {
            std::thread::sleep(DISK_CHECK);
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(PEER_CHECK_MAX);
        }
    }
}

impl Drop for NixlProgress {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{GDS_BATCH_MAX, Xfer};
    use crate::error::Error;
    use crate::exec::nixl::NixlExec;
    use crate::layout::{Layout, LayoutConfig, LayoutKind};
    use crate::memory::disk::DiskFile;
    use crate::memory::{Memory, Region, StorageKind};
    use crate::nixl::Backends;
    use crate::options::{Mechanism, TransferStats};
    use crate::plan::{CopyOp, Plan, Strategy};
    use crate::transfer::{Completion, Transfer};
    use crate::verify;

    /// The GDS path's mechanics without cuFile, over NIXL's POSIX backend: transfers cut into
    /// pieces of GDS_BATCH_MAX posted one after the other, two such transfers of one agent
    /// one at a time, every byte where it belongs.
    #[test]
    #[ignore = "needs NIXL: the project's test command (scripts/dev test) runs it"]
    fn chained_serial_requests_move_every_piece() {
        let nixl = NixlExec::new("kvx-xfer-test", Backends::POSIX, false)
            .expect("an agent with NIXL's POSIX backend (KVX_NIXL_LIB_DIR)");
        let cfg = LayoutConfig {
            num_blocks: 64,
            num_layers: 2,
            outer_dim: 2,
            page_size: 4,
            inner_dim: 256,
            dtype_width: 2,
            alignment: 1,
            kind: LayoutKind::FullyContiguous,
            heads: Default::default(),
        };
        let ls = LayoutConfig {
            kind: LayoutKind::LayerSeparateBlockFirst,
            ..cfg
        };
        let g = ls.validate().unwrap();
        let sizes = vec![g.allocation_len; g.allocations as usize];
        let src = Memory::allocate_host(StorageKind::System, &sizes, 1).unwrap();
        let src = Layout::new(ls, src, 0).unwrap();
        let g = cfg.validate().unwrap();
        let file = DiskFile::temporary(&std::env::temp_dir(), g.allocation_len, false).unwrap();
        let region = Region {
            addr: 0,
            len: g.allocation_len,
        };
        let disk = Layout::new(cfg, Memory::disk(file, vec![region]), 0).unwrap();
        let all: Vec<u64> = (0..64).collect();
        verify::fill(&src, &all, 5, 2).unwrap();
        verify::fill(&disk, &all, 6, 2).unwrap();
        for l in [&src, &disk] {
            l.memory()
                .ensure_nixl_registered(nixl.agent.agent())
                .unwrap();
        }
        // Block b goes to disk block 63 - b: two transfers of 32 blocks, 128 copies each.
        let copies = |blocks: std::ops::Range<u64>| -> Vec<CopyOp> {
            let mut v = Vec::new();
            for b in blocks {
                for l in 0..2 {
                    for o in 0..2 {
                        let s = src.region(b, l, o).unwrap();
                        let d = disk.region(63 - b, l, o).unwrap();
                        v.push(CopyOp {
                            src: s.addr,
                            dst: d.addr,
                            len: s.len,
                        });
                    }
                }
            }
            v
        };
        let transfers: Vec<Transfer> = [0..32, 32..64]
            .into_iter()
            .map(|blocks| {
                let c = copies(blocks);
                assert!(c.len() > 3 * GDS_BATCH_MAX);
                let completion: Arc<Completion> = Completion::new(1);
                let job = Xfer {
                    write: true,
                    local: src.memory(),
                    remote: disk.memory(),
                    remote_agent: &nixl.name,
                    copies: &c,
                    notify: None,
                    remote_fd: None,
                };
                nixl.post(job, completion.clone(), Error::Io, true, None, None)
                    .unwrap();
                let stats = TransferStats {
                    bytes: 0,
                    fragments: 0,
                    copies: c.len() as u64,
                    plan: Plan::Direct(Strategy::NixlWrite),
                    mechanism: Mechanism::Nixl,
                    kernel_fallback: false,
                    bounced: false,
                    sms: 0,
                    ipc_fallback: None,
                    elapsed_ns: 0,
                };
                Transfer::new(completion, stats, false)
            })
            .collect();
        for t in &transfers {
            t.wait(Some(Duration::from_secs(30))).unwrap();
        }
        let reversed: Vec<u64> = all.iter().map(|b| 63 - b).collect();
        assert_eq!(
            verify::checksum(&disk, &reversed, 2).unwrap(),
            verify::checksum(&src, &all, 2).unwrap()
        );
    }
}
