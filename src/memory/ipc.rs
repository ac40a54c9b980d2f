//! Device memory shared with a same-host peer through CUDA IPC. The exporter lists, for a
//! device layout, IPC handles of the allocations that hold its regions (`LayoutIpc`); the
//! importer maps them into its own device context on first use (`IpcImport`), translates the
//! peer's addresses into the mapping, and closes the mappings once the peer revokes the layout
//! and no transfer uses it any more. A mapped allocation is the whole allocation: a same-host
//! peer that imports a layout can reach every byte of the allocations holding it.

use std::sync::{Arc, Mutex};

use super::Region;
use crate::cuda::{CudaDevice, IpcHandle, ProcessWatch};
use crate::error::{Error, Result};

/// What an export says about a device layout's memory for same-host peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutIpc {
    /// The GPU holding the memory (its UUID: the same in every process).
    pub gpu: [u8; 16],
    /// The allocations holding the layout's regions, each once.
    pub allocations: Vec<IpcHandle>,
}

impl LayoutIpc {
    /// Handles of the allocations of `dev` that hold `regions`; `Err` saying why where one of
    /// them cannot be exported.
    pub(crate) fn export(dev: &CudaDevice, regions: &[Region]) -> Result<Self> {
        let mut allocations: Vec<IpcHandle> = Vec::new();
        for r in regions.iter().filter(|r| r.len > 0) {
            if allocations.iter().any(|a| a.covers(r)) {
                continue;
            }
            let h = dev.ipc_export(r.addr)?;
            if !h.covers(r) {
                return Err(Error::Unsupported(format!(
                    "region [{:#x}, +{}) spans more than one allocation",
                    r.addr, r.len
                )));
            }
            allocations.push(h);
        }
        Ok(Self {
            gpu: dev.uuid()?,
            allocations,
        })
    }

    /// Every region lies inside one of the allocations (an export that does not hold is
    /// refused at import).
    pub(crate) fn covers(&self, regions: &[Region]) -> bool {
        regions
            .iter()
            .all(|r| r.len == 0 || self.allocations.iter().any(|a| a.covers(r)))
    }
}

impl IpcHandle {
    fn covers(&self, r: &Region) -> bool {
        r.addr >= self.base
            && r.addr
                .checked_add(r.len)
                .is_some_and(|end| end <= self.base.saturating_add(self.len))
    }
}

/// Why a transfer between device memory here and a peer's device memory went through NIXL
/// instead of CUDA IPC (`kvx_transfer_ipc_fallback`, KVX_IPC_FALLBACK_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcFallback {
    /// The context was made with `disable_ipc`.
    Disabled = 1,
    /// The peer runs on another host (or its export does not say which).
    OtherHost = 2,
    /// The peer could not export this memory (VMM or memory-pool allocations), or its kvxfer
    /// exports no IPC handles.
    NotExported = 3,
    /// Mapping the peer's memory failed here (another container's IPC namespace, a GPU this
    /// process does not see or cannot reach, no CUDA in this context).
    Refused = 4,
    /// The peer is this process (another context): CUDA does not open a process's own handles.
    SameProcess = 5,
}

impl IpcFallback {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Disabled => "this context was made with disable_ipc",
            Self::OtherHost => "the peer runs on another host",
            Self::NotExported => "the peer exported no CUDA IPC handles for this memory",
            Self::Refused => "this process could not map the peer's memory",
            Self::SameProcess => "the peer is this process",
        }
    }
}

#[derive(Debug, Default)]
struct Mapped {
    /// Where each of `LayoutIpc::allocations` starts here, once opened.
    bases: Vec<u64>,
    /// Mapping failed once: the layout stays on NIXL.
    refused: Option<String>,
    /// The peer revoked the layout and nothing uses it: never mapped again.
    closed: bool,
}

/// What an importer maps a same-host peer's device layout with.
#[derive(Debug)]
pub(crate) struct IpcPeer {
    pub ipc: LayoutIpc,
    /// The importing context's device: the mapping lives in its context.
    pub dev: Arc<CudaDevice>,
    /// The exporting process: once it exited, transfers fail (`Error::Peer`).
    pub watch: Arc<ProcessWatch>,
}

/// An importer's view of one peer layout's IPC handles.
#[derive(Debug)]
pub(crate) struct IpcImport {
    exported: std::result::Result<IpcPeer, IpcFallback>,
    mapped: Mutex<Mapped>,
}

/// Where a transfer with an imported device layout goes: the peer's regions as mapped here
/// (and the device they are mapped on), or NIXL and why.
pub(crate) type Translated =
    std::result::Result<(Vec<Region>, Arc<CudaDevice>), (IpcFallback, String)>;

impl IpcImport {
    /// `usable`: the handles and the device to map them on, or why transfers stay on NIXL.
    pub(crate) fn new(usable: std::result::Result<IpcPeer, IpcFallback>) -> Self {
        Self {
            exported: usable,
            mapped: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mapped> {
        self.mapped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `regions` of the peer (inside the exported allocations, checked at import) as addresses
    /// of this process's mapping, mapping the allocations on first use; or why not. The caller
    /// holds a use of the layout (`RemoteUse::begin`), so it is not revoked under it.
    /// `Error::Peer` once the exporting process has exited.
    pub(crate) fn translate(&self, regions: &[Region]) -> Result<Translated> {
        let p = match &self.exported {
            Ok(p) => p,
            Err(f) => return Ok(Err((*f, f.describe().to_string()))),
        };
        if p.watch.exited() {
            return Err(Error::Peer(
                "the peer process that exported this layout has exited".into(),
            ));
        }
        Ok(self.map(p, regions))
    }

    fn map(&self, p: &IpcPeer, regions: &[Region]) -> Translated {
        let (ipc, dev) = (&p.ipc, &p.dev);
        let mut m = self.lock();
        if let Some(why) = &m.refused {
            return Err((IpcFallback::Refused, why.clone()));
        }
        if m.closed {
            return Err((IpcFallback::Refused, "the peer revoked this layout".into()));
        }
        if m.bases.is_empty() && !ipc.allocations.is_empty() {
            let mut bases = Vec::with_capacity(ipc.allocations.len());
            for a in &ipc.allocations {
                match dev.ipc_open(a) {
                    Ok(b) => bases.push(b),
                    Err(e) => {
                        for &b in &bases {
                            dev.ipc_close(b);
                        }
                        let why = format!("mapping the peer's device memory failed: {e}");
                        tracing::info!("CUDA IPC refused, this peer layout stays on NIXL: {why}");
                        m.refused = Some(why.clone());
                        return Err((IpcFallback::Refused, why));
                    }
                }
            }
            tracing::debug!(
                allocations = bases.len(),
                "mapped a same-host peer's device memory through CUDA IPC"
            );
            m.bases = bases;
        }
        let local = regions
            .iter()
            .map(|r| {
                if r.len == 0 {
                    return Ok(*r);
                }
                let (a, base) = ipc
                    .allocations
                    .iter()
                    .zip(&m.bases)
                    .find(|(a, _)| a.covers(r))
                    .ok_or((
                        IpcFallback::NotExported,
                        "a region outside the export".to_string(),
                    ))?;
                Ok(Region {
                    addr: base + (r.addr - a.base),
                    len: r.len,
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((local, dev.clone()))
    }

    /// Unmaps the peer's memory for good (it revoked the layout and no transfer uses it).
    pub(crate) fn close(&self) {
        let mut m = self.lock();
        m.closed = true;
        if let Ok(p) = &self.exported {
            for b in m.bases.drain(..) {
                p.dev.ipc_close(b);
            }
        }
    }
}

impl Drop for IpcImport {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(base: u64, len: u64) -> IpcHandle {
        IpcHandle {
            handle: [7; crate::cuda::HANDLE_LEN],
            base,
            len,
        }
    }

    #[test]
    fn regions_must_lie_inside_one_allocation() {
        let ipc = LayoutIpc {
            gpu: [1; 16],
            allocations: vec![handle(0x1000, 0x1000), handle(0x4000, 0x100)],
        };
        let r = |addr, len| Region { addr, len };
        assert!(ipc.covers(&[r(0x1000, 0x1000), r(0x4000, 0x100), r(0, 0)]));
        assert!(!ipc.covers(&[r(0x1800, 0x1000)]), "past the end");
        assert!(!ipc.covers(&[r(0x2000, 0x3000)]), "across two allocations");
        assert!(!ipc.covers(&[r(u64::MAX - 1, 4)]), "wrapping");
        assert!(!ipc.covers(&[r(0xfff, 1)]), "before the start");
    }

    #[test]
    fn an_unusable_export_says_why() {
        let i = IpcImport::new(Err(IpcFallback::OtherHost));
        let (f, why) = i.translate(&[]).unwrap().unwrap_err();
        assert_eq!(f, IpcFallback::OtherHost);
        assert!(why.contains("another host"));
        i.close();
    }
}
