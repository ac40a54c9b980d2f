//! The state of a peer's exported layout as an importer sees it: usable until the exporter
//! revokes it (it freed the layout), and how many transfers are using it right now. The
//! exporter's free waits until the importer acknowledges a revocation, and the importer
//! acknowledges only when no transfer is using the layout any more.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::Memory;
use super::ipc::IpcImport;

use crate::error::{Result, bail};

#[derive(Debug, Default)]
struct State {
    revoked: bool,
    inflight: usize,
}

/// A peer's landing arena as one importer may use it: slots of the exporter's arena granted to
/// this importer, which its kvxfer scatters into the exporter's layouts on request. Made by the
/// peer module; used by the executors, which never see it.
pub(crate) trait Landing: Send + Sync + std::fmt::Debug {
    /// The arena's memory (the peer's address space, registered with its agent) and the
    /// addresses of the slots granted to this importer; each holds `slot_bytes()`.
    fn slots(&self) -> (&Arc<Memory>, &[u64]);
    fn slot_bytes(&self) -> u64;
    /// Transfers whose pieces average less than this go through the arena.
    fn below(&self) -> u64;
    /// Held by one transfer at a time: the slots are this importer's, shared by its transfers.
    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()>;
    /// Asks the peer to copy slot `slot` (its start: `slots()[slot]`) into layout `export_id`,
    /// once the write that filled the slot has completed: `pieces` are (offset in the slot,
    /// address in the peer's layout, length); `notify` is delivered to the peer's runtime once
    /// these bytes are in place. Request `seq` is answered with `wait`.
    fn scatter(
        &self,
        slot: usize,
        seq: u64,
        export_id: u64,
        pieces: &[(u64, u64, u64)],
        notify: Option<&[u8]>,
    ) -> crate::error::Result<()>;
    /// Asks the peer to copy `pieces` (offset in the slot, address in its layout, length) of
    /// layout `export_id` into slot `slot`; answered like `scatter`.
    fn gather(
        &self,
        slot: usize,
        seq: u64,
        export_id: u64,
        pieces: &[(u64, u64, u64)],
    ) -> crate::error::Result<()>;
    /// Waits until the peer answered request `seq` of `slot` (its bytes are in place), at most
    /// `timeout` (then `Error::Peer`: the peer is taken for dead).
    fn wait(&self, slot: usize, seq: u64, timeout: Duration) -> crate::error::Result<()>;
    /// For an arena in device memory: this importer's device copier and its staging area (one
    /// slot's bytes per granted slot, on the copier's device, registered with this importer's
    /// agent), made on first use. `None` for an arena in host memory (the bounce pool stages).
    fn device_staging(&self) -> Option<Result<DeviceStaging>> {
        None
    }
}

/// An importer's copier for a peer's device arena and its staging area there.
pub(crate) type DeviceStaging = (Arc<dyn DeviceCopier>, Arc<Memory>);

/// Copies between addresses one CUDA device's SMs reach, for landing arenas in device memory:
/// the exporter places and gathers its device slots with it, the importer gathers into and
/// scatters from its staging area. Made by the executors (the copy kernel); used by the peer
/// module, which never sees them.
pub(crate) trait DeviceCopier: Send + Sync + std::fmt::Debug {
    /// The device the copies run on.
    fn device_id(&self) -> i32;
    /// Device memory of `bytes` on that device.
    fn allocate(&self, bytes: u64) -> Result<Memory>;
    /// Runs `copies` (source, destination, length) and waits until they are done.
    fn copy(&self, copies: &[(u64, u64, u64)]) -> Result<()>;
}

#[derive(Debug, Default)]
pub(crate) struct RemoteUse {
    state: Mutex<State>,
    /// The layout's CUDA IPC handles as this importer sees them; the mappings are closed
    /// (under `state`'s lock) once the layout is revoked and idle, so the importer's
    /// acknowledgement, which waits for idle, comes after the unmapping.
    ipc: OnceLock<Arc<IpcImport>>,
    /// The exporter's landing arena (host layouts of a peer that announced one), and this
    /// layout's export id there.
    landing: OnceLock<(Arc<dyn Landing>, u64)>,
}

/// One transfer's use of a peer layout; ends when dropped.
#[derive(Debug)]
pub(crate) struct UseGuard(Arc<RemoteUse>);

impl RemoteUse {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A transfer starts using the layout; `Error::Peer` once the peer revoked it.
    pub(crate) fn begin(self: &Arc<Self>) -> Result<UseGuard> {
        let mut s = self.lock();
        if s.revoked {
            bail!(
                Peer,
                "the peer freed this layout: it revoked it, and no transfer may touch it"
            );
        }
        s.inflight += 1;
        Ok(UseGuard(self.clone()))
    }

    /// The peer revoked the layout: no new transfer starts. Returns whether none is running.
    pub(crate) fn revoke(&self) -> bool {
        let mut s = self.lock();
        s.revoked = true;
        if s.inflight == 0 {
            self.close_ipc();
        }
        s.inflight == 0
    }

    /// Sets the layout's IPC handles (the first import's; later imports of the same layout
    /// carry the same).
    pub(crate) fn set_ipc(&self, ipc: IpcImport) {
        let _ = self.ipc.set(Arc::new(ipc));
    }

    pub(crate) fn ipc(&self) -> Option<&Arc<IpcImport>> {
        self.ipc.get()
    }

    pub(crate) fn set_landing(&self, landing: Arc<dyn Landing>, export_id: u64) {
        let _ = self.landing.set((landing, export_id));
    }

    /// The exporter's landing arena and this layout's export id there.
    pub(crate) fn landing(&self) -> Option<(&Arc<dyn Landing>, u64)> {
        self.landing.get().map(|(l, id)| (l, *id))
    }

    fn close_ipc(&self) {
        if let Some(i) = self.ipc.get() {
            i.close();
        }
    }

    /// The exporter revoked the layout (or this importer gave it up).
    pub(crate) fn is_revoked(&self) -> bool {
        self.lock().revoked
    }

    /// No transfer is using the layout.
    pub(crate) fn idle(&self) -> bool {
        self.lock().inflight == 0
    }
}

impl UseGuard {
    /// The peer revoked the layout since this use began (a request not yet posted is then
    /// failed instead).
    pub(crate) fn revoked(&self) -> bool {
        self.0.lock().revoked
    }
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.inflight -= 1;
        if s.revoked && s.inflight == 0 {
            self.0.close_ipc();
        }
    }
}
