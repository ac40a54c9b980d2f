//! The state of a peer's exported layout as an importer sees it: usable until the exporter
//! revokes it (it freed the layout), and how many transfers are using it right now. The
//! exporter's free waits until the importer acknowledges a revocation, and the importer
//! acknowledges only when no transfer is using the layout any more.

use std::sync::{Arc, Mutex, OnceLock};

use super::ipc::IpcImport;

use crate::error::{Result, bail};

#[derive(Debug, Default)]
struct State {
    revoked: bool,
    inflight: usize,
}

#[derive(Debug, Default)]
pub(crate) struct RemoteUse {
    state: Mutex<State>,
    /// The layout's CUDA IPC handles as this importer sees them; the mappings are closed
    /// (under `state`'s lock) once the layout is revoked and idle, so the importer's
    /// acknowledgement, which waits for idle, comes after the unmapping.
    ipc: OnceLock<Arc<IpcImport>>,
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
