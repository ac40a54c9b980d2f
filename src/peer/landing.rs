//! Landing arenas: small pieces between hosts at the transport's speed. An exporting context
//! registers one arena of host memory with its NIXL agent before its first export and
//! announces it in the export; each importer it welcomes is granted GRANT slots of it, its own
//! until it gives its imports up. A write of many small pieces to a peer's host layout is then
//! gathered into large chunks, each written into one of the importer's slots with one NIXL
//! request, and the exporter's kvxfer copies the chunk's pieces into the layout when asked
//! (SCATTER, answered by DONE; `control`) before it delivers the write's notification.
//!
//! A context that may move device memory to and from peers (`allow_gpu_rdma`, a CUDA device
//! with the copy kernel) also registers an arena in device memory: small device pieces are
//! gathered by the importer's kernel into a staging area in its device memory, written into a
//! device slot with one NIXL request, and placed by the exporter's kernel. Device slots are
//! numbered from DEVICE_FIRST, so requests name the arena by the slot.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::blob::ArenaDesc;
use super::control::Control;
use crate::error::{Error, Result};
use crate::memory::Region;
use crate::memory::{DeviceCopier, Landing, Memory, RemoteUse, StorageKind};
use crate::nixl::NixlAgent;

/// Bytes of one slot: one chunk of an aggregated transfer.
pub(crate) const SLOT_BYTES: u64 = 4 << 20;
/// Slots of an arena (SLOT_BYTES each): room for four importers at once.
pub(crate) const ARENA_SLOTS: u32 = 16;
/// The number of the device arena's first slot (the host arena's are 0 to ARENA_SLOTS - 1).
pub(crate) const DEVICE_FIRST: u32 = 1 << 16;
/// Pieces below which a transfer is aggregated, measured with `kvxfer bench --nixl` (64 MiB
/// per point). With few cores the gather and the scatter compete with the transport for them:
/// on the build machine (2 cores) aggregated writes of 4-16 KiB pieces over TCP ran 2-3x the
/// per-piece path and 64 KiB ones even with it, while over UCX's shared memory (a peer on this
/// host, where the transport is a memcpy already) 4 KiB pieces ran 1.4x and 16 KiB ones 0.65x.
/// With many (the GPU machine, 16) they run beside it (docs/BENCHMARKS.md, "Landing arenas").
const BELOW_OTHER_HOST: u64 = 64 << 10;
const BELOW_SAME_HOST: u64 = 8 << 10;
const BELOW_MANY_CORES: u64 = 128 << 10;
const MANY_CORES: usize = 8;

/// Whether UCX may use shared memory (`UCX_TLS` unset, an exclusion list, or naming a
/// shared-memory transport): a peer on this host is then reached through it.
fn shared_memory_allowed(tls: Option<&str>) -> bool {
    let Some(tls) = tls.map(str::trim).filter(|t| !t.is_empty()) else {
        return true;
    };
    if tls.starts_with('^') {
        return true;
    }
    tls.split(',').any(|t| {
        matches!(
            t.trim(),
            "all" | "sm" | "shm" | "posix" | "sysv" | "cma" | "knem" | "xpmem"
        )
    })
}

/// The threshold for a peer on this host (`same_host`) or another.
fn aggregate_below(same_host: bool) -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tls = std::env::var("UCX_TLS").ok();
    let same_host = same_host && shared_memory_allowed(tls.as_deref());
    match (cores >= MANY_CORES, same_host) {
        (true, _) => BELOW_MANY_CORES,
        (false, true) => BELOW_SAME_HOST,
        (false, false) => BELOW_OTHER_HOST,
    }
}

/// Slots granted to one importer: one being gathered and written while the others are
/// scattered by the peer or on their way.
pub(crate) const GRANT: usize = 4;

/// Exporter: the arena and who holds which slots.
#[derive(Debug)]
pub(crate) struct Arena {
    /// Held, not read: the arena's allocation and its NIXL registration live as long as this.
    #[allow(dead_code)]
    memory: Memory,
    pub desc: ArenaDesc,
    /// The number of slot 0 (DEVICE_FIRST for the device arena).
    first: u32,
    free: Vec<u32>,
    granted: HashMap<String, Vec<u32>>,
    /// Checks in a row each holder did not answer.
    missed: HashMap<String, u32>,
}

/// Checks in a row a holder may miss before its slots are taken back.
const MISSES: u32 = 3;

impl Arena {
    /// Allocates the host arena and registers it with `agent` (before the agent's metadata is
    /// exported, so importers can reach it).
    pub(crate) fn host(agent: &nixl_sys::Agent) -> Result<Self> {
        let memory = Memory::allocate_host(
            StorageKind::System,
            &[SLOT_BYTES * u64::from(ARENA_SLOTS)],
            4096,
        )?;
        Self::new(memory, agent, 0)
    }

    /// As `host`, in device memory of `device`'s device.
    pub(crate) fn device(agent: &nixl_sys::Agent, device: &dyn DeviceCopier) -> Result<Self> {
        let memory = device.allocate(SLOT_BYTES * u64::from(ARENA_SLOTS))?;
        Self::new(memory, agent, DEVICE_FIRST)
    }

    fn new(memory: Memory, agent: &nixl_sys::Agent, first: u32) -> Result<Self> {
        memory.ensure_nixl_registered(agent)?;
        let desc = ArenaDesc {
            addr: memory.regions()[0].addr,
            slot_bytes: SLOT_BYTES,
            slots: ARENA_SLOTS,
        };
        Ok(Self::laid_out(memory, desc, first))
    }

    /// The arena `desc` over `memory`, its slots numbered from `first`, all free.
    fn laid_out(memory: Memory, desc: ArenaDesc, first: u32) -> Self {
        Self {
            memory,
            desc,
            first,
            free: (first..first + desc.slots).rev().collect(),
            granted: HashMap::new(),
            missed: HashMap::new(),
        }
    }

    /// The device the arena's memory is on, for a device arena.
    pub(crate) fn device_id(&self) -> i32 {
        self.memory.device_id()
    }

    /// Whether slot number `slot` is one of this arena's.
    pub(crate) fn has(&self, slot: u32) -> bool {
        slot.checked_sub(self.first)
            .is_some_and(|i| i < self.desc.slots)
    }

    /// `importer`'s slots: those it holds, or GRANT new ones while there are (none when the
    /// arena is taken: that importer's writes then go piece by piece).
    pub(crate) fn grant(&mut self, importer: &str) -> Vec<u32> {
        if let Some(g) = self.granted.get(importer) {
            return g.clone();
        }
        if self.free.len() < GRANT {
            return Vec::new();
        }
        let g: Vec<u32> = (0..GRANT).filter_map(|_| self.free.pop()).collect();
        self.granted.insert(importer.to_string(), g.clone());
        g
    }

    /// `importer` is gone (it gave its imports up, or was taken for dead): its slots are free.
    pub(crate) fn release(&mut self, importer: &str) {
        self.missed.remove(importer);
        if let Some(g) = self.granted.remove(importer) {
            self.free.extend(g);
        }
    }

    /// A check could not reach `importer`; after MISSES in a row its slots are released
    /// (returns true then).
    pub(crate) fn missed(&mut self, importer: &str) -> bool {
        let n = self.missed.entry(importer.to_string()).or_insert(0);
        *n += 1;
        let gone = *n >= MISSES;
        if gone {
            self.release(importer);
        }
        gone
    }

    /// A check reached `importer`.
    pub(crate) fn reached(&mut self, importer: &str) {
        self.missed.remove(importer);
    }

    /// The importers holding slots.
    pub(crate) fn holders(&self) -> Vec<String> {
        self.granted.keys().cloned().collect()
    }

    /// The start of `slot` if `importer` holds it.
    pub(crate) fn slot_of(&self, importer: &str, slot: u32) -> Option<u64> {
        self.granted
            .get(importer)
            .filter(|g| g.contains(&slot))
            .map(|_| self.desc.addr + u64::from(slot - self.first) * self.desc.slot_bytes)
    }
}

/// Threads that place one request's pieces (from PLACE_SPLIT_BYTES on).
const PLACE_THREADS: usize = 4;
const PLACE_SPLIT_BYTES: u64 = 1 << 20;

/// Copies one SCATTER's pieces from the slot at `slot` into `regions` (a layout's memory, still
/// exported: the caller holds the lock that revocation takes first), or with `gather` one
/// GATHER's pieces from the regions into the slot: on host threads, or for a slot of the
/// device arena with `device`'s kernel (the regions then being a device layout's). Every piece
/// is checked before any byte moves: `(offset in the slot, address, length)`.
pub(crate) fn place(
    slot: u64,
    slot_bytes: u64,
    regions: &[Region],
    pieces: &[(u64, u64, u64)],
    gather: bool,
    device: Option<&dyn DeviceCopier>,
) -> std::result::Result<(), String> {
    for &(off, addr, len) in pieces {
        if off.checked_add(len).is_none_or(|e| e > slot_bytes) {
            return Err(format!(
                "piece at slot offset {off} of {len} bytes is outside the slot"
            ));
        }
        let inside = regions
            .iter()
            .any(|r| addr >= r.addr && addr.checked_add(len).is_some_and(|e| e <= r.end()));
        if !inside {
            return Err(format!(
                "piece at {addr:#x} of {len} bytes is outside the layout"
            ));
        }
    }
    if let Some(d) = device {
        let copies: Vec<(u64, u64, u64)> = pieces
            .iter()
            .map(|&(off, addr, len)| match gather {
                false => (slot + off, addr, len),
                true => (addr, slot + off, len),
            })
            .collect();
        // The slot is this arena's device memory, the layout's side a region of a live device
        // layout of the same device (checked above and by the caller).
        return d.copy(&copies).map_err(|e| e.to_string());
    }
    let copy = |part: &[(u64, u64, u64)]| {
        for &(off, addr, len) in part {
            let (from, to) = match gather {
                false => (slot + off, addr),
                true => (addr, slot + off),
            };
            // SAFETY: the slot is this arena's memory and [off, off+len) lies in it; the
            // layout's side lies in a region of a live host layout (checked above; the caller
            // holds the lock a revocation takes before the layout is freed); the arena never
            // overlaps a layout. Threads copy disjoint parts of the request; a hostile request
            // whose destinations overlap only races on bytes of a layout its sender may write
            // anyway.
            unsafe {
                std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len as usize);
            }
        }
    };
    // A slot's many small pieces copied on one thread ran about as fast as the network
    // delivered them: a few threads keep the placing off the critical path.
    let bytes: u64 = pieces.iter().map(|p| p.2).sum();
    let threads = PLACE_THREADS.min(pieces.len()).max(1);
    if bytes < PLACE_SPLIT_BYTES || threads == 1 {
        copy(pieces);
    } else {
        std::thread::scope(|s| {
            for part in pieces.chunks(pieces.len().div_ceil(threads)) {
                s.spawn(move || copy(part));
            }
        });
    }
    Ok(())
}

/// Importer: the slots an exporter granted this importer, as the executors use them.
#[derive(Debug)]
pub(crate) struct PeerLanding {
    control: Weak<Control>,
    exporter: String,
    /// The whole arena, as a peer's memory (registered with the exporter's agent).
    memory: Arc<Memory>,
    /// Granted slots: their numbers at the exporter, and their addresses there.
    numbers: Vec<u32>,
    addrs: Vec<u64>,
    slot_bytes: u64,
    below: u64,
    busy: std::sync::Mutex<()>,
    /// A device arena's staging here.
    device: Option<DeviceStaging>,
}

/// An importer's side of a device arena: its copier (its device's kernel) and the staging
/// area the chunks are gathered into, made and registered on first use.
#[derive(Debug)]
struct DeviceStaging {
    copier: Arc<dyn DeviceCopier>,
    agent: Arc<NixlAgent>,
    area: std::sync::Mutex<Option<Arc<Memory>>>,
}

/// Device pieces (on average) below which a transfer goes through a device arena, measured with `kvxfer
/// bench --gpu-rdma --disable-ipc` between two processes on one H200 (256 MiB, median of 5):
/// NIXL's UCX backend pays microseconds per descriptor (cuda_ipc: 1.1 GB/s at 4 KiB, 4.6 at
/// 16 KiB, 18 at 64 KiB), the arena moves 12-13 GB/s whatever the piece size. There the
/// exporter's placing kernel takes ~200 us per 4 MiB slot against a few for the importer's
/// gather, most likely because two processes' kernels take turns on one GPU. The two cross
/// near 48 KiB. Between hosts (the arena's purpose) nothing shares the exporter's GPU, so this
/// errs towards the per-piece path.
const BELOW_DEVICE: u64 = 48 << 10;

impl PeerLanding {
    /// The slots among `numbers` of the host `arena` of `exporter`, if there are.
    pub(crate) fn new(
        control: &Arc<Control>,
        exporter: &str,
        arena: ArenaDesc,
        numbers: Vec<u32>,
        same_host: bool,
    ) -> Option<Self> {
        let memory = (StorageKind::System, 0);
        let below = aggregate_below(same_host);
        Self::make(control, exporter, arena, memory, 0, numbers, below, None)
    }

    /// The slots among `numbers` of the device `arena` (on device `device_id`) of `exporter`,
    /// if there are, staged here on `copier`'s device.
    pub(crate) fn new_device(
        control: &Arc<Control>,
        exporter: &str,
        (arena, device_id): (ArenaDesc, i32),
        numbers: Vec<u32>,
        copier: Arc<dyn DeviceCopier>,
        agent: Arc<NixlAgent>,
    ) -> Option<Self> {
        let staging = DeviceStaging {
            copier,
            agent,
            area: std::sync::Mutex::new(None),
        };
        let memory = (StorageKind::Device, device_id);
        Self::make(
            control,
            exporter,
            arena,
            memory,
            DEVICE_FIRST,
            numbers,
            BELOW_DEVICE,
            Some(staging),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        control: &Arc<Control>,
        exporter: &str,
        arena: ArenaDesc,
        (kind, device_id): (StorageKind, i32),
        first: u32,
        numbers: Vec<u32>,
        below: u64,
        device: Option<DeviceStaging>,
    ) -> Option<Self> {
        let index = |n: u32| n.checked_sub(first).filter(|&i| i < arena.slots);
        let numbers: Vec<u32> = numbers
            .into_iter()
            .filter(|&n| index(n).is_some())
            .collect();
        if numbers.is_empty() {
            return None;
        }
        let region = Region {
            addr: arena.addr,
            len: arena.slot_bytes * u64::from(arena.slots),
        };
        let memory = Memory::remote(
            kind,
            device_id,
            vec![region],
            Arc::new(RemoteUse::default()),
        );
        Some(Self {
            control: Arc::downgrade(control),
            exporter: exporter.to_string(),
            memory: Arc::new(memory),
            addrs: numbers
                .iter()
                .filter_map(|&n| index(n))
                .map(|i| arena.addr + u64::from(i) * arena.slot_bytes)
                .collect(),
            numbers,
            slot_bytes: arena.slot_bytes,
            below,
            busy: std::sync::Mutex::new(()),
            device,
        })
    }

    fn control(&self) -> Result<Arc<Control>> {
        self.control
            .upgrade()
            .ok_or_else(|| Error::Peer("the importing context is gone".into()))
    }
}

impl Landing for PeerLanding {
    fn slots(&self) -> (&Arc<Memory>, &[u64]) {
        (&self.memory, &self.addrs)
    }

    fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    fn below(&self) -> u64 {
        self.below
    }

    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scatter(
        &self,
        slot: usize,
        seq: u64,
        export_id: u64,
        pieces: &[(u64, u64, u64)],
        notify: Option<&[u8]>,
    ) -> Result<()> {
        self.request(false, slot, seq, export_id, pieces, notify)
    }

    fn gather(
        &self,
        slot: usize,
        seq: u64,
        export_id: u64,
        pieces: &[(u64, u64, u64)],
    ) -> Result<()> {
        self.request(true, slot, seq, export_id, pieces, None)
    }

    fn wait(&self, slot: usize, seq: u64, timeout: Duration) -> Result<()> {
        let n = self.number(slot)?;
        self.control()?.wait_done(&self.exporter, n, seq, timeout)
    }

    fn device_staging(&self) -> Option<Result<crate::memory::DeviceStaging>> {
        let d = self.device.as_ref()?;
        let mut area = d.area.lock().unwrap_or_else(|p| p.into_inner());
        if area.is_none() {
            let bytes = self.slot_bytes * self.numbers.len() as u64;
            let made = d.copier.allocate(bytes).and_then(|m| {
                m.ensure_nixl_registered(d.agent.agent())?;
                Ok(Arc::new(m))
            });
            match made {
                Ok(m) => *area = Some(m),
                Err(e) => return Some(Err(e)),
            }
        }
        area.clone().map(|m| Ok((d.copier.clone(), m)))
    }
}

impl PeerLanding {
    /// The exporter's number of this importer's `slot`-th slot.
    fn number(&self, slot: usize) -> Result<u32> {
        self.numbers
            .get(slot)
            .copied()
            .ok_or_else(|| Error::Internal(format!("no landing slot {slot}")))
    }

    fn request(
        &self,
        gather: bool,
        slot: usize,
        seq: u64,
        export_id: u64,
        pieces: &[(u64, u64, u64)],
        notify: Option<&[u8]>,
    ) -> Result<()> {
        let n = self.number(slot)?;
        self.control()?
            .send_landing(&self.exporter, gather, n, seq, export_id, pieces, notify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_is_allowed_unless_ucx_tls_leaves_it_out() {
        for (tls, allowed) in [
            (None, true),
            (Some(""), true),
            (Some("tcp,self"), false),
            (Some("tcp,self,cuda_copy"), false),
            (Some("^tcp"), true),
            (Some("sm,self"), true),
            (Some("tcp, posix"), true),
        ] {
            assert_eq!(shared_memory_allowed(tls), allowed, "{tls:?}");
        }
    }

    #[test]
    fn scatter_checks_every_piece_before_it_copies() {
        let mut slot = vec![7u8; 64];
        let mut dst = vec![0u8; 64];
        let (s, d) = (slot.as_mut_ptr() as u64, dst.as_mut_ptr() as u64);
        let regions = [Region { addr: d, len: 64 }];
        let bad = [(0, d, 8), (60, d + 8, 8)]; // the second leaves the slot
        assert!(place(s, 64, &regions, &bad, false, None).is_err());
        assert!(dst.iter().all(|&b| b == 0), "nothing written");
        assert!(
            place(s, 64, &regions, &[(0, d + 60, 8)], true, None).is_err(),
            "past the layout"
        );
        assert!(
            place(s, 64, &regions, &[(0, u64::MAX - 2, 8)], false, None).is_err(),
            "wrapping"
        );
        slot[8..16].fill(9);
        place(s, 64, &regions, &[(8, d, 8), (0, d + 32, 4)], false, None).unwrap();
        assert_eq!(&dst[..8], &[9; 8]);
        assert_eq!(&dst[32..36], &[7; 4]);
        assert!(dst[8..32].iter().all(|&b| b == 0));
        // And back: the layout's bytes into the slot.
        place(s, 64, &regions, &[(40, d + 32, 4)], true, None).unwrap();
        assert_eq!(&slot[40..44], &[7; 4]);
    }

    /// `slots` slots of 4 KiB from 1 MiB (no memory behind them), numbered from `first`.
    fn test_arena(slots: u32, first: u32) -> Arena {
        let desc = ArenaDesc {
            addr: 1 << 20,
            slot_bytes: 4096,
            slots,
        };
        Arena::laid_out(
            Memory::caller_owned(StorageKind::System, 0, vec![]),
            desc,
            first,
        )
    }

    #[test]
    fn slots_are_granted_once_per_importer_and_come_back() {
        let mut a = test_arena(2 * GRANT as u32 + 1, 0);
        let g1 = a.grant("one");
        assert_eq!(g1.len(), GRANT);
        assert_eq!(a.grant("one"), g1, "the same slots again");
        let g2 = a.grant("two");
        assert_eq!(g2.len(), GRANT);
        assert!(a.grant("three").is_empty(), "one slot left: not enough");
        assert_eq!(
            a.slot_of("one", g1[0]),
            Some((1 << 20) + u64::from(g1[0]) * 4096)
        );
        assert_eq!(a.slot_of("two", g1[0]), None, "another importer's slot");
        a.release("one");
        assert_eq!(a.grant("three").len(), GRANT);
        // An importer that misses checks keeps its slots until it missed MISSES in a row.
        for _ in 1..MISSES {
            assert!(!a.missed("two"));
        }
        a.reached("two");
        for _ in 1..MISSES {
            assert!(!a.missed("two"));
        }
        assert!(a.missed("two"), "gone after MISSES in a row");
        assert_eq!(a.grant("four").len(), GRANT, "its slots came back");
    }

    /// Records the copies it is asked for instead of running them on a device.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<(u64, u64, u64)>>);

    impl DeviceCopier for Recorder {
        fn device_id(&self) -> i32 {
            0
        }
        fn allocate(&self, _: u64) -> Result<Memory> {
            Err(Error::Unavailable("no device in this test".into()))
        }
        fn copy(&self, copies: &[(u64, u64, u64)]) -> Result<()> {
            self.0.lock().unwrap().extend_from_slice(copies);
            Ok(())
        }
    }

    #[test]
    fn device_slots_are_placed_by_the_copier_after_every_piece_is_checked() {
        let (slot, layout) = (1u64 << 30, 1u64 << 34);
        let regions = [Region {
            addr: layout,
            len: 4096,
        }];
        let rec = Recorder::default();
        let bad = [(0, layout, 8), (0, layout + 4096, 8)]; // the second leaves the layout
        assert!(place(slot, 64, &regions, &bad, false, Some(&rec)).is_err());
        assert!(rec.0.lock().unwrap().is_empty(), "nothing copied");
        let pieces = [(8, layout + 100, 16), (40, layout, 8)];
        place(slot, 64, &regions, &pieces, false, Some(&rec)).unwrap();
        place(slot, 64, &regions, &pieces, true, Some(&rec)).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                // Scatter: slot -> layout; gather: layout -> slot.
                (slot + 8, layout + 100, 16),
                (slot + 40, layout, 8),
                (layout + 100, slot + 8, 16),
                (layout, slot + 40, 8),
            ]
        );
    }

    #[test]
    fn device_slots_are_numbered_apart_from_host_slots() {
        let mut a = test_arena(ARENA_SLOTS, DEVICE_FIRST);
        let g = a.grant("one");
        assert_eq!(
            g,
            (DEVICE_FIRST..DEVICE_FIRST + GRANT as u32).collect::<Vec<_>>()
        );
        assert!(a.has(DEVICE_FIRST) && a.has(DEVICE_FIRST + ARENA_SLOTS - 1));
        assert!(!a.has(0) && !a.has(ARENA_SLOTS) && !a.has(DEVICE_FIRST + ARENA_SLOTS));
        assert_eq!(a.slot_of("one", DEVICE_FIRST + 1), Some((1 << 20) + 4096));
        assert_eq!(a.slot_of("one", 1), None, "a host slot number");
    }
}
