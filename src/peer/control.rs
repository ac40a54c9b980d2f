//! Revocation: no peer transfer touches an exported layout's memory once `kvx_layout_free`
//! returned, even where UCX's shared-memory transports need no registration to reach it.
//!
//! Messages go as NIXL notifications that begin with `CONTROL_PREFIX` (never handed to the
//! runtime), each ending in a MAC made with the peer key where the context has one:
//! - HELLO (importer -> exporter): an import's nonce, the importer's NIXL metadata (so the
//!   exporter can answer) and the export ids it imports;
//! - WELCOME (exporter -> importer): the nonce, and whether every id is still exported. The
//!   importer's `import` waits for it, so no transfer can start before the exporter knows of
//!   the importer;
//! - REVOKE (exporter -> importer): an export id and a sequence number, sent when the layout
//!   is dropped; the importer fails new transfers to that layout at once;
//! - ACK (importer -> exporter): the same pair, once no transfer to the layout is in flight.
//!   The exporter's free waits for every importer's ACK, at most DEAD_PEER (an importer that
//!   does not answer by then is taken for dead: a dead process writes nothing);
//! - BYE (importer -> exporter): export ids the importer gave up (its last peer handle of them
//!   was freed after their transfers finished): the exporter stops tracking it for those ids.
//! - SCATTER (importer -> exporter): a slot of the exporter's landing arena granted to the
//!   importer (in WELCOME), a sequence number, an export id and the pieces to copy from the
//!   slot into that layout, with the write's notification on its last chunk (`landing`);
//! - GATHER (importer -> exporter): as SCATTER, the other way: the pieces are copied from the
//!   layout into the slot, which the importer then reads;
//! - DONE (exporter -> importer): the slot and sequence number, and whether the pieces are in
//!   place.
//!
//! One thread per context (started by the first export or import, ending with the last user of
//! this state) fetches the messages every POLL.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::blob::{ArenaDesc, MAC_LEN, PeerKey};
use super::landing::{self, Arena};
use crate::error::{Error, Result, bail};
use crate::layout::Revoke;
use crate::memory::{DeviceCopier, Region, RemoteUse};
use crate::metrics::Counters;
use crate::nixl::{CONTROL_PREFIX, NixlAgent, RemoteAgent};

/// How often the control thread fetches messages.
const POLL: Duration = Duration::from_millis(2);
/// How long a revocation waits for an importer's acknowledgement, an import for the exporter's
/// welcome, and a given-up import for its last transfers: the dead-peer time of transfers.
const DEAD_PEER: Duration = Duration::from_secs(5);

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REVOKE: u8 = 3;
const ACK: u8 = 4;
const BYE: u8 = 5;
const SCATTER: u8 = 6;
const DONE: u8 = 7;
const GATHER: u8 = 8;
/// Sent while waiting for a DONE: NIXL fails it once the peer is gone, which no DONE would say.
/// Receivers ignore it.
const PING: u8 = 9;
/// How often a waiter for DONE checks that the peer is there.
const PING_EVERY: Duration = Duration::from_millis(50);
/// How often an exporter checks that the importers holding arena slots are there: a dead
/// one's slots go back to the arena.
const CHECK_HOLDERS: Duration = Duration::from_secs(1);

/// How often the control thread fetches messages while landing-arena traffic runs (a chunk
/// waits for a SCATTER to be seen, then for its DONE).
const POLL_FAST: Duration = Duration::from_micros(20);
/// How long after the last SCATTER or DONE the thread keeps polling fast.
const FAST_FOR: Duration = Duration::from_millis(200);
/// Pieces in one SCATTER at most (a slot of 8 MiB in 4 KiB pieces has 2048).
const MAX_PIECES: usize = 1 << 16;

/// At most this many ids in one HELLO or BYE (an export holds at most 4096 layouts).
const MAX_IDS: usize = 4096;

#[derive(Default)]
struct State {
    /// Exporter: live export ids and the agents that imported each.
    exports: HashMap<u64, HashSet<String>>,
    /// Exporter: importers' agents (loaded from their HELLO) and how many export ids each holds.
    importers: HashMap<String, (RemoteAgent, usize)>,
    /// Exporter: revocations sent and not yet acknowledged: (importer, id, sequence number).
    unacked: HashSet<(String, u64, u64)>,
    seq: u64,
    /// Importer: (exporter agent, id) -> the layout's state and how many imports hold it.
    imported: HashMap<(String, u64), (Arc<RemoteUse>, usize)>,
    /// Importer: answers to HELLOs by nonce (`None` while awaited).
    welcomes: HashMap<u64, Option<bool>>,
    /// Importer: revocations to acknowledge once their layout is idle.
    to_ack: Vec<(String, u64, u64, Arc<RemoteUse>)>,
    /// Exporter: the landing arena, made before the first export.
    arena: Option<Arena>,
    /// Exporter: the landing arena in device memory, where GPU RDMA is allowed.
    device_arena: Option<Arena>,
    /// Exporter: the regions of exported host layouts (SCATTER's destinations).
    export_host: HashMap<u64, Vec<Region>>,
    /// Exporter: the regions of exported device layouts (a device slot's destinations).
    export_device: HashMap<u64, Vec<Region>>,
    /// Importer: slots of each exporter's arena granted to this importer.
    grants: HashMap<String, Vec<u32>>,
    /// Importer: answers to SCATTERs, by (exporter, slot, sequence number).
    /// Only awaited requests have an entry (`None` until answered): a peer's DONEs for
    /// anything else are dropped, so they cannot grow this map.
    done: HashMap<(String, u32, u64), Option<bool>>,
}

impl State {
    /// The arenas this exporter made (host, device).
    fn arenas(&mut self) -> impl Iterator<Item = &mut Arena> {
        self.arena.iter_mut().chain(self.device_arena.iter_mut())
    }
}

/// One context's side of the control messages, shared by the context, its exported layouts
/// and its peers.
pub(crate) struct Control {
    nixl: Arc<NixlAgent>,
    /// This agent's name, part of every MAC (a message is for one receiver).
    name: String,
    key: Option<PeerKey>,
    state: Mutex<State>,
    changed: Condvar,
    started: AtomicBool,
    /// The context's counters (imports, exports, revocations).
    counters: Arc<Counters>,
    /// The context's device copier where it may move device memory to and from peers: its
    /// device arena's placing, and its staging for peers' device arenas.
    device: Option<Arc<dyn DeviceCopier>>,
    /// Until when the thread polls every POLL_FAST.
    fast_until: Mutex<Instant>,
    /// When the arena's holders were last checked.
    holders_checked: Mutex<Instant>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("name", &self.name).finish()
    }
}

/// Reads a control message's fields.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*a)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let (a, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(a)
    }
    fn ids(&mut self) -> Option<Vec<u64>> {
        let n = self.u32()? as usize;
        if n > MAX_IDS {
            return None;
        }
        (0..n).map(|_| self.u64()).collect()
    }
}

fn put_ids(out: &mut Vec<u8>, ids: &[u64]) {
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

impl Control {
    pub(crate) fn new(
        nixl: Arc<NixlAgent>,
        name: &str,
        key: Option<PeerKey>,
        counters: Arc<Counters>,
        device: Option<Arc<dyn DeviceCopier>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            nixl,
            name: name.to_string(),
            key,
            state: Mutex::default(),
            changed: Condvar::new(),
            started: AtomicBool::new(false),
            counters,
            device,
            fast_until: Mutex::new(Instant::now()),
            holders_checked: Mutex::new(Instant::now()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the thread that fetches control messages, once. It holds only a weak reference
    /// and ends when the last user of this state is gone.
    fn start(self: &Arc<Self>) -> Result<()> {
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("kvx-peer-control".into())
            .spawn(move || {
                while let Some(c) = weak.upgrade() {
                    c.poll();
                    let fast = Instant::now() < c.fast_until();
                    drop(c);
                    std::thread::sleep(if fast { POLL_FAST } else { POLL });
                }
            })
            .map(drop)
            .map_err(|e| Error::OutOfMemory(format!("cannot start the peer control thread: {e}")))
    }

    fn fast_until(&self) -> Instant {
        *self.fast_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Landing-arena traffic: poll fast for a while.
    fn hurry(&self) {
        *self.fast_until.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + FAST_FOR;
    }

    /// Sends message `kind` with `body` to `to`, with a MAC where there is a key.
    fn send(&self, to: &str, kind: u8, body: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(CONTROL_PREFIX.len() + 1 + body.len() + MAC_LEN);
        msg.extend_from_slice(CONTROL_PREFIX);
        msg.push(kind);
        msg.extend_from_slice(body);
        if let Some(key) = &self.key {
            let tag = key.mac_parts(&[self.name.as_bytes(), to.as_bytes(), &msg]);
            msg.extend_from_slice(&tag);
        }
        self.nixl.send(to, &msg)
    }

    /// One round of the control thread: handle what arrived, acknowledge revocations whose
    /// layouts went idle.
    fn poll(&self) {
        if let Ok(msgs) = self.nixl.take_control() {
            for (sender, msg) in msgs {
                self.handle(&sender, &msg);
            }
        }
        let ready: Vec<(String, u64, u64)> = {
            let mut s = self.lock();
            let (ready, waiting) = std::mem::take(&mut s.to_ack)
                .into_iter()
                .partition(|(.., u)| u.idle());
            s.to_ack = waiting;
            ready
                .into_iter()
                .map(|(a, id, seq, _)| (a, id, seq))
                .collect()
        };
        for (to, id, seq) in ready {
            let _ = self.send(&to, ACK, &[id.to_le_bytes(), seq.to_le_bytes()].concat());
        }
        self.check_holders();
    }

    /// Exporter: gives the slots of importers NIXL can no longer reach back to the arena.
    fn check_holders(&self) {
        {
            let mut last = self
                .holders_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < CHECK_HOLDERS {
                return;
            }
            *last = Instant::now();
        }
        let holders: HashSet<String> = self.lock().arenas().flat_map(|a| a.holders()).collect();
        for h in holders {
            let reached = self.send(&h, PING, &[]);
            let mut s = self.lock();
            // Slots given to another importer while this one still wrote into them would mix
            // two transfers' bytes: only an importer that missed several checks in a row is
            // taken for gone.
            for a in s.arenas() {
                match &reached {
                    Ok(()) => a.reached(&h),
                    Err(e) if a.missed(&h) => {
                        tracing::info!(
                            "importer {h:?} is gone ({e}): its landing slots are free again"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// One message from `sender` (the agent NIXL names). Anything malformed or not made with
    /// this context's key is dropped: a peer gets nothing for it.
    fn handle(&self, sender: &str, msg: &[u8]) {
        let Some(msg) = msg.strip_prefix(CONTROL_PREFIX) else {
            return;
        };
        let body = match &self.key {
            Some(key) => {
                let Some(split) = msg.len().checked_sub(MAC_LEN) else {
                    return;
                };
                let (m, tag) = msg.split_at(split);
                let signed = [CONTROL_PREFIX, m].concat();
                if !key.verify_parts(&[sender.as_bytes(), self.name.as_bytes(), &signed], tag) {
                    return;
                }
                m
            }
            None => msg,
        };
        let Some((&kind, rest)) = body.split_first() else {
            return;
        };
        let mut f = Fields(rest);
        let _ = match kind {
            HELLO => (|| {
                let nonce = f.u64()?;
                let md_len = f.u32()? as usize;
                let md = f.bytes(md_len)?.to_vec();
                let ids = f.ids()?;
                self.on_hello(sender, nonce, &md, &ids);
                Some(())
            })(),
            WELCOME => (|| {
                let nonce = f.u64()?;
                let ok = f.take::<1>()?[0] == 1;
                // Host slots, then device slots.
                let n = (f.u32()? as usize).min(2 * super::landing::GRANT);
                let slots: Option<Vec<u32>> = (0..n).map(|_| f.u32()).collect();
                let mut s = self.lock();
                if let Some(w) = s.welcomes.get_mut(&nonce) {
                    *w = Some(ok);
                    match slots.filter(|g| !g.is_empty()) {
                        Some(g) => s.grants.insert(sender.to_string(), g),
                        None => s.grants.remove(sender),
                    };
                    self.changed.notify_all();
                }
                Some(())
            })(),
            REVOKE => (|| {
                let (id, seq) = (f.u64()?, f.u64()?);
                self.on_revoke(sender, id, seq);
                Some(())
            })(),
            ACK => (|| {
                let (id, seq) = (f.u64()?, f.u64()?);
                let mut s = self.lock();
                if s.unacked.remove(&(sender.to_string(), id, seq)) {
                    self.changed.notify_all();
                }
                Some(())
            })(),
            BYE => (|| {
                let ids = f.ids()?;
                self.on_bye(sender, &ids);
                Some(())
            })(),
            SCATTER | GATHER => (|| {
                let (slot, seq, id) = (f.u32()?, f.u64()?, f.u64()?);
                let n = f.u32()? as usize;
                if n > MAX_PIECES {
                    return None;
                }
                let pieces: Vec<(u64, u64, u64)> = (0..n)
                    .map(|_| Some((f.u64()?, f.u64()?, f.u64()?)))
                    .collect::<Option<_>>()?;
                let note_len = f.u32()? as usize;
                let note = f.bytes(note_len)?.to_vec();
                self.on_landing(sender, kind == GATHER, slot, seq, id, &pieces, note);
                Some(())
            })(),
            DONE => (|| {
                let (slot, seq) = (f.u32()?, f.u64()?);
                let ok = f.take::<1>()?[0] == 1;
                self.hurry();
                if let Some(answer) = self.lock().done.get_mut(&(sender.to_string(), slot, seq)) {
                    *answer = Some(ok);
                    self.changed.notify_all();
                }
                Some(())
            })(),
            _ => None,
        };
    }

    /// Exporter: an importer announces itself for `ids`.
    fn on_hello(&self, sender: &str, nonce: u64, md: &[u8], ids: &[u64]) {
        // Its metadata lets this agent answer; without it there is no one to answer to.
        let Ok(remote) = self.nixl.load_remote(md, sender) else {
            return;
        };
        let ok = {
            let mut s = self.lock();
            let ok = ids.iter().all(|id| s.exports.contains_key(id));
            if ok {
                let mut added = 0;
                for id in ids {
                    if let Some(set) = s.exports.get_mut(id) {
                        added += usize::from(set.insert(sender.to_string()));
                    }
                }
                s.importers
                    .entry(sender.to_string())
                    .or_insert((remote, 0))
                    .1 += added;
            }
            ok
        };
        let slots: Vec<u32> = match ok {
            true => self.lock().arenas().flat_map(|a| a.grant(sender)).collect(),
            false => Vec::new(),
        };
        tracing::debug!(importer = sender, ?ids, ok, ?slots, "import announced");
        let mut body = nonce.to_le_bytes().to_vec();
        body.push(u8::from(ok));
        body.extend_from_slice(&(slots.len() as u32).to_le_bytes());
        for s in &slots {
            body.extend_from_slice(&s.to_le_bytes());
        }
        let _ = self.send(sender, WELCOME, &body);
        // Without an import to track, its metadata goes again (RemoteAgent counts the loads).
        self.release_importers(&[]);
    }

    /// Importer: the exporter revoked `id`.
    fn on_revoke(&self, sender: &str, id: u64, seq: u64) {
        let idle = {
            let mut s = self.lock();
            match s
                .imported
                .get(&(sender.to_string(), id))
                .map(|(u, _)| u.clone())
            {
                Some(u) if !u.revoke() => {
                    s.to_ack.push((sender.to_string(), id, seq, u));
                    false
                }
                _ => true,
            }
        };
        if idle {
            let _ = self.send(sender, ACK, &[id.to_le_bytes(), seq.to_le_bytes()].concat());
        }
    }

    /// Exporter: an importer gave up `ids`.
    fn on_bye(&self, sender: &str, ids: &[u64]) {
        let mut gone = 0;
        {
            let mut s = self.lock();
            for id in ids {
                if let Some(set) = s.exports.get_mut(id) {
                    gone += usize::from(set.remove(sender));
                }
            }
            s.unacked
                .retain(|(a, id, _)| !(a == sender && ids.contains(id)));
            if let Some(e) = s.importers.get_mut(sender) {
                e.1 = e.1.saturating_sub(gone);
            }
        }
        self.changed.notify_all();
        self.release_importers(&[]);
    }

    /// Drops the metadata of importers that hold no export id any more, after taking
    /// `revoked` (agents whose revocation of one id just ended) off their counts.
    fn release_importers(&self, revoked: &[String]) {
        let gone: Vec<RemoteAgent> = {
            let mut s = self.lock();
            for a in revoked {
                if let Some(e) = s.importers.get_mut(a) {
                    e.1 = e.1.saturating_sub(1);
                }
            }
            let idle: Vec<String> = s
                .importers
                .iter()
                .filter(|(_, (_, n))| *n == 0)
                .map(|(a, _)| a.clone())
                .collect();
            for arena in s.arenas() {
                for a in &idle {
                    arena.release(a);
                }
            }
            idle.iter()
                .filter_map(|a| s.importers.remove(a).map(|(r, _)| r))
                .collect()
        };
        // Unloaded outside the lock: it calls into NIXL.
        drop(gone);
    }

    /// Exporter: `id` is exported (peers may import it from now on); `regions`: those of a
    /// host layout, or of a device layout on device `device`, which importers may ask this
    /// context to scatter landed pieces into and gather pieces from (a device layout only where
    /// the device copier's kernel runs on its device).
    pub(crate) fn exported(
        self: &Arc<Self>,
        id: u64,
        regions: Vec<Region>,
        device: Option<i32>,
    ) -> Result<()> {
        self.start()?;
        let mut s = self.lock();
        if let std::collections::hash_map::Entry::Vacant(e) = s.exports.entry(id) {
            e.insert(HashSet::new());
            self.counters
                .layouts_exported
                .fetch_add(1, Ordering::Relaxed);
        }
        match device {
            None => {
                s.export_host.insert(id, regions);
            }
            Some(d) if self.device.as_ref().is_some_and(|c| c.device_id() == d) => {
                s.export_device.insert(id, regions);
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Exporter: the landing arenas, made and registered with `agent` on first use (before the
    /// agent's metadata is exported, so that importers can write into them): host memory, and
    /// device memory where this context has a device copier. One that cannot be made is not
    /// announced, and importers move small pieces one by one.
    pub(crate) fn arenas(
        &self,
        agent: &NixlAgent,
    ) -> (Option<ArenaDesc>, Option<(ArenaDesc, i32)>) {
        if !agent.has_ucx() {
            return (None, None);
        }
        let mut s = self.lock();
        if s.arena.is_none() {
            match Arena::host(agent.agent()) {
                Ok(a) => s.arena = Some(a),
                Err(e) => {
                    tracing::info!("no landing arena ({e}): peers write small pieces one by one")
                }
            }
        }
        if let (None, Some(d)) = (&s.device_arena, &self.device) {
            match Arena::device(agent.agent(), d.as_ref()) {
                Ok(a) => s.device_arena = Some(a),
                Err(e) => tracing::info!(
                    "no landing arena in device memory ({e}): peers move small device pieces one \
                     by one"
                ),
            }
        }
        (
            s.arena.as_ref().map(|a| a.desc),
            s.device_arena.as_ref().map(|a| (a.desc, a.device_id())),
        )
    }

    /// Importer: this context's device copier (staging for peers' device arenas).
    pub(crate) fn device(&self) -> Option<Arc<dyn DeviceCopier>> {
        self.device.clone()
    }

    pub(crate) fn agent(&self) -> &Arc<NixlAgent> {
        &self.nixl
    }

    /// Importer: the slots `exporter` granted this importer.
    pub(crate) fn grants(&self, exporter: &str) -> Vec<u32> {
        self.lock()
            .grants
            .get(exporter)
            .cloned()
            .unwrap_or_default()
    }

    /// Importer: asks `exporter` to scatter `slot` into layout `id`, or with `gather` to gather
    /// from the layout into the slot (`landing`). (Not as the notification of the chunk's
    /// write: UCX dropped notifications of a few KiB sent with a transfer, while one for 4 KiB
    /// pieces of a 4 MiB slot takes 24 KiB.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_landing(
        &self,
        exporter: &str,
        gather: bool,
        slot: u32,
        seq: u64,
        id: u64,
        pieces: &[(u64, u64, u64)],
        notify: Option<&[u8]>,
    ) -> Result<()> {
        let note = notify.unwrap_or_default();
        let mut body = Vec::with_capacity(32 + 24 * pieces.len() + note.len());
        body.extend_from_slice(&slot.to_le_bytes());
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
        for &(off, addr, len) in pieces {
            for v in [off, addr, len] {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
        body.extend_from_slice(&(note.len() as u32).to_le_bytes());
        body.extend_from_slice(note);
        self.hurry();
        let key = (exporter.to_string(), slot, seq);
        self.lock().done.insert(key.clone(), None);
        let sent = self.send(exporter, if gather { GATHER } else { SCATTER }, &body);
        if sent.is_err() {
            self.lock().done.remove(&key);
        }
        sent
    }

    /// Importer: waits for `exporter`'s DONE of (`slot`, `seq`), at most `timeout`.
    pub(crate) fn wait_done(
        &self,
        exporter: &str,
        slot: u32,
        seq: u64,
        timeout: Duration,
    ) -> Result<()> {
        let key = (exporter.to_string(), slot, seq);
        let deadline = Instant::now() + timeout;
        let mut ping = Instant::now() + PING_EVERY;
        let mut s = self.lock();
        let answer = loop {
            if let Some(&Some(ok)) = s.done.get(&key) {
                break match ok {
                    true => Ok(()),
                    false => Err(Error::Peer(format!(
                        "the peer {exporter:?} refused to place the landed pieces (the layout \
                         was freed, or the request did not hold)"
                    ))),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Error::Peer(format!(
                    "the peer {exporter:?} did not place the landed pieces within {} s",
                    timeout.as_secs()
                )));
            }
            if now >= ping {
                drop(s);
                let reached = self.send(exporter, PING, &[]);
                s = self.lock();
                if let Err(e) = reached {
                    break Err(Error::Peer(format!(
                        "the peer {exporter:?} is gone while placing landed pieces: {e}"
                    )));
                }
                ping = now + PING_EVERY;
                continue;
            }
            s = self
                .changed
                .wait_timeout(s, (deadline - now).min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        s.done.remove(&key);
        answer
    }

    /// Exporter: `sender` asks for `pieces` of its `slot` to be copied into layout `id` (or,
    /// with `gather`, from the layout into the slot).
    #[allow(clippy::too_many_arguments)]
    fn on_landing(
        &self,
        sender: &str,
        gather: bool,
        slot: u32,
        seq: u64,
        id: u64,
        pieces: &[(u64, u64, u64)],
        note: Vec<u8>,
    ) {
        self.hurry();
        let started = Instant::now();
        let placed = {
            // Under the lock a revocation takes first: the layout stays allocated throughout.
            let s = self.lock();
            let imported = s.exports.get(&id).is_some_and(|i| i.contains(sender));
            let device = s.device_arena.as_ref().filter(|a| a.has(slot));
            let (arena, regions) = match device {
                Some(a) => (Some(a), s.export_device.get(&id)),
                None => (s.arena.as_ref(), s.export_host.get(&id)),
            };
            let copier = device.and(self.device.as_deref());
            match (arena, regions) {
                (Some(a), Some(regions)) if imported => match a.slot_of(sender, slot) {
                    Some(at) => {
                        landing::place(at, a.desc.slot_bytes, regions, pieces, gather, copier)
                    }
                    None => Err(format!("slot {slot} is not {sender:?}'s")),
                },
                _ => Err(format!(
                    "layout {id:#x} is not a layout {sender:?} imports in that arena's memory"
                )),
            }
        };
        if let Err(why) = &placed {
            tracing::warn!("a landing request from {sender:?} was refused: {why}");
        }
        tracing::trace!(
            gather,
            slot,
            pieces = pieces.len(),
            us = started.elapsed().as_micros() as u64,
            "landing request placed"
        );
        if placed.is_ok() && !note.is_empty() {
            self.nixl.deliver(sender, note);
        }
        let mut body = slot.to_le_bytes().to_vec();
        body.extend_from_slice(&seq.to_le_bytes());
        body.push(u8::from(placed.is_ok()));
        let _ = self.send(sender, DONE, &body);
    }

    /// Importer: registers the import of `ids` from `agent`, announces it and waits for the
    /// exporter's welcome. Returns each layout's state, shared with earlier imports of it.
    pub(crate) fn import(
        self: &Arc<Self>,
        agent: &str,
        ids: &[u64],
    ) -> Result<Vec<Arc<RemoteUse>>> {
        self.start()?;
        let uses: Vec<Arc<RemoteUse>> = {
            let mut s = self.lock();
            ids.iter()
                .map(|&id| {
                    let e = s
                        .imported
                        .entry((agent.to_string(), id))
                        .or_insert_with(|| (Arc::default(), 0));
                    e.1 += 1;
                    e.0.clone()
                })
                .collect()
        };
        let welcomed = self.hello(agent, ids);
        match welcomed {
            Ok(()) => {
                self.counters.peers_imported.fetch_add(1, Ordering::Relaxed);
                Ok(uses)
            }
            Err(e) => {
                self.release(agent, ids);
                Err(e)
            }
        }
    }

    fn hello(&self, agent: &str, ids: &[u64]) -> Result<()> {
        let md = self.nixl.agent().get_local_md().map_err(|e| {
            Error::Nixl(format!("NIXL could not produce this agent's metadata: {e}"))
        })?;
        let nonce = fastrand::u64(..);
        let mut body = nonce.to_le_bytes().to_vec();
        body.extend_from_slice(&(md.len() as u32).to_le_bytes());
        body.extend_from_slice(&md);
        put_ids(&mut body, ids);
        self.lock().welcomes.insert(nonce, None);
        let sent = self.send(agent, HELLO, &body);
        let deadline = Instant::now() + DEAD_PEER;
        let mut s = self.lock();
        let answer = loop {
            match (s.welcomes.get(&nonce).copied().flatten(), &sent) {
                (Some(ok), _) => break Ok(ok),
                (None, Err(e)) => break Err(e.clone()),
                (None, Ok(())) if Instant::now() >= deadline => {
                    break Err(Error::Peer(format!(
                        "the peer {agent:?} did not answer the import within {} s (is it \
                         alive, and does it use the same peer_key?)",
                        DEAD_PEER.as_secs()
                    )));
                }
                (None, Ok(())) => {
                    s = self
                        .changed
                        .wait_timeout(s, POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        };
        s.welcomes.remove(&nonce);
        match answer? {
            true => Ok(()),
            false => bail!(
                Peer,
                "the peer {agent:?} has freed a layout of this export since it was made; \
                 import a newer export"
            ),
        }
    }

    /// Importer: the imports of `ids` from `agent` by one peer handle end. Ids no other handle
    /// imports are revoked here, their transfers waited for (at most DEAD_PEER), and given up
    /// at the exporter.
    pub(crate) fn release(&self, agent: &str, ids: &[u64]) {
        let last: Vec<(u64, Arc<RemoteUse>)> = {
            let mut s = self.lock();
            ids.iter()
                .filter_map(|&id| {
                    let k = (agent.to_string(), id);
                    let e = s.imported.get_mut(&k)?;
                    e.1 -= 1;
                    if e.1 > 0 {
                        return None;
                    }
                    s.imported.remove(&k).map(|(u, _)| (id, u))
                })
                .collect()
        };
        if last.is_empty() {
            return;
        }
        {
            let mut s = self.lock();
            if !s.imported.keys().any(|(a, _)| a == agent) {
                s.grants.remove(agent);
            }
        }
        // Ids the exporter revoked are no longer tracked there: no BYE for them. When it
        // revoked them all (it freed the layouts, perhaps its whole context), nothing is sent,
        // and NIXL has no notification to fail on a gone agent.
        let tracked: Vec<u64> = last
            .iter()
            .filter(|(_, u)| !u.is_revoked())
            .map(|(id, _)| *id)
            .collect();
        let deadline = Instant::now() + DEAD_PEER;
        for (_, u) in &last {
            u.revoke();
            while !u.idle() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if tracked.is_empty() {
            return;
        }
        let mut body = Vec::new();
        put_ids(&mut body, &tracked);
        let _ = self.send(agent, BYE, &body);
    }
}

impl Revoke for Control {
    /// Exporter: the layout `id` is being freed. Every importer is told and acknowledges once
    /// nothing of it is in flight; an importer that cannot be told, or does not answer within
    /// DEAD_PEER, is taken for gone.
    fn revoke(&self, id: u64) {
        let sent: Vec<(String, u64)> = {
            let mut s = self.lock();
            let importers = s.exports.remove(&id).unwrap_or_default();
            s.export_host.remove(&id);
            s.export_device.remove(&id);
            importers
                .into_iter()
                .map(|a| {
                    s.seq += 1;
                    let seq = s.seq;
                    s.unacked.insert((a.clone(), id, seq));
                    (a, seq)
                })
                .collect()
        };
        if sent.is_empty() {
            return;
        }
        for (to, seq) in &sent {
            let body = [id.to_le_bytes(), seq.to_le_bytes()].concat();
            if self.send(to, REVOKE, &body).is_err() {
                self.lock().unacked.remove(&(to.clone(), id, *seq));
            }
        }
        let deadline = Instant::now() + DEAD_PEER;
        let mut s = self.lock();
        while s.unacked.iter().any(|(_, i, _)| *i == id) && Instant::now() < deadline {
            s = self
                .changed
                .wait_timeout(s, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let silent: Vec<String> = s
            .unacked
            .iter()
            .filter(|(_, i, _)| *i == id)
            .map(|(a, ..)| a.clone())
            .collect();
        s.unacked.retain(|(_, i, _)| *i != id);
        drop(s);
        self.counters.revocations.fetch_add(1, Ordering::Relaxed);
        self.counters
            .importers_lost
            .fetch_add(silent.len() as u64, Ordering::Relaxed);
        for a in &silent {
            tracing::warn!(
                "importer {a:?} did not acknowledge the revocation of layout {id:#x} within {} s: \
                 taken for dead",
                DEAD_PEER.as_secs()
            );
        }
        tracing::debug!(
            "layout {id:#x} revoked at {} importer(s)",
            sent.len() - silent.len()
        );
        let agents: Vec<String> = sent.into_iter().map(|(a, _)| a).collect();
        self.release_importers(&agents);
    }
}
