//! Peers: the export format (`blob`), export and import, and the control messages by which an
//! exporter revokes its freed layouts at every importer (`control`).

mod blob;
mod control;
mod landing;

use std::sync::Arc;

#[cfg(feature = "fuzzing")]
pub(crate) use blob::seal;
pub use blob::{PeerBlob, PeerKey};
pub(crate) use control::Control;

use crate::cuda::{CudaDevice, ProcessWatch};
use crate::error::{Error, Result, bail};
use crate::layout::Layout;
use crate::memory::{IpcFallback, IpcImport, IpcPeer, Memory, StorageKind};
use crate::nixl::{NixlAgent, RemoteAgent};
use blob::{LayoutDescriptor, Origin};

/// The bytes a peer imports: the metadata of `control`'s agent (named `name`) and descriptors
/// of `layouts` (local layouts of the context whose agent this is), which are registered with
/// the agent (for as long as they live) so that the peer can reach them. Each layout is
/// revoked at its importers when it is dropped (`control`). With `ipc`, device layouts carry
/// CUDA IPC handles for same-host peers where their memory can be exported.
pub(crate) fn export(
    control: &Arc<Control>,
    agent: &NixlAgent,
    name: &str,
    layouts: &[&Layout],
    key: Option<&PeerKey>,
    ipc: bool,
) -> Result<Vec<u8>> {
    for (i, l) in layouts.iter().enumerate() {
        if l.is_remote() {
            bail!(
                InvalidArgument,
                "layouts[{i}] belongs to a peer; only local layouts can be exported"
            );
        }
        if l.storage_kind() == StorageKind::Disk {
            bail!(
                InvalidArgument,
                "layouts[{i}] is a disk layout; peers cannot reach disk layouts"
            );
        }
    }
    for l in layouts {
        l.memory().ensure_nixl_registered(agent.agent())?;
    }
    let mut descriptors = Vec::with_capacity(layouts.len());
    for l in layouts {
        let export_id = l.export_id(|| control.clone());
        let device = (l.storage_kind() == StorageKind::Device).then(|| l.memory().device_id());
        control.exported(export_id, l.memory().regions().to_vec(), device)?;
        descriptors.push(LayoutDescriptor {
            export_id,
            config: *l.config(),
            kind: l.storage_kind(),
            device_id: l.memory().device_id(),
            regions: l.memory().regions().to_vec(),
            ipc: match l.storage_kind() {
                StorageKind::Device if ipc => l.memory().ipc_export().ok().cloned(),
                _ => None,
            },
        });
    }
    // Registered before the metadata is taken, so that importers can write into it.
    let (arena, device_arena) = control.arenas(agent);
    let nixl_md = agent
        .agent()
        .get_local_md()
        .map_err(|e| Error::Nixl(format!("NIXL could not produce this agent's metadata: {e}")))?;
    PeerBlob {
        agent: name.to_string(),
        nixl_md,
        origin: Origin {
            host: crate::cuda::host_id(),
            process: crate::cuda::this_process(),
        },
        arena,
        device_arena,
        layouts: descriptors,
    }
    .encode(key)
}

/// Where an export was made, seen from the importing process.
struct Whence {
    origin: Origin,
    same_host: bool,
    same_process: bool,
    /// The exporting process, watched once a device layout of it may be mapped here.
    watch: std::cell::OnceCell<std::result::Result<Arc<ProcessWatch>, IpcFallback>>,
}

impl Whence {
    fn of(origin: Origin) -> Self {
        let same_host = origin.host.is_some() && origin.host == crate::cuda::host_id();
        Self {
            origin,
            same_host,
            same_process: same_host && origin.process == crate::cuda::this_process(),
            watch: std::cell::OnceCell::new(),
        }
    }

    /// The exporting process, watched for its exit while its device memory may be mapped
    /// here; a process this one cannot see (another PID namespace) is not mapped.
    fn watch(&self) -> std::result::Result<Arc<ProcessWatch>, IpcFallback> {
        let origin = &self.origin;
        self.watch
            .get_or_init(|| {
                ProcessWatch::open(origin.process)
                    .map(Arc::new)
                    .ok_or_else(|| {
                        tracing::info!(
                            pid = origin.process.pid,
                            "the peer process is not visible from here (another PID \
                             namespace?): its device memory is reached through NIXL"
                        );
                        IpcFallback::Refused
                    })
            })
            .clone()
    }
}

/// Whether transfers with the peer's device layout `d` can map it through CUDA IPC on `dev`
/// (the importing context's device, or why there is none), or why they stay on NIXL.
fn ipc_use(
    whence: &Whence,
    d: &LayoutDescriptor,
    dev: &std::result::Result<Arc<CudaDevice>, IpcFallback>,
) -> std::result::Result<IpcPeer, IpcFallback> {
    let dev = dev.clone()?;
    if !whence.same_host {
        return Err(IpcFallback::OtherHost);
    }
    if whence.same_process {
        return Err(IpcFallback::SameProcess);
    }
    let ipc = d.ipc.clone().ok_or(IpcFallback::NotExported)?;
    let watch = whence.watch()?;
    if crate::cuda::ordinal_of(&ipc.gpu).is_none() {
        tracing::info!(
            "the peer's GPU is not visible to this process (CUDA_VISIBLE_DEVICES?): its device \
             memory is reached through NIXL"
        );
        return Err(IpcFallback::Refused);
    }
    Ok(IpcPeer { ipc, dev, watch })
}

/// Imports a decoded export into `agent` (named `own_name`, of context `context_id`): NIXL
/// only sees metadata of a blob whose checks held, and a peer layout that does not hold is
/// `Error::Peer`. The exporter is told of the import and must welcome it (every layout still
/// exported) before this returns, so it revokes the layouts here when it frees them. `ipc_dev`
/// is the device that maps a same-host peer's device layouts through CUDA IPC, or why none does.
pub(crate) fn import(
    control: &Arc<Control>,
    agent: &NixlAgent,
    own_name: &str,
    context_id: u64,
    blob: PeerBlob,
    ipc_dev: std::result::Result<Arc<CudaDevice>, IpcFallback>,
) -> Result<Peer> {
    if blob.agent == own_name {
        bail!(Peer, "this export comes from this context itself");
    }
    let remote = agent.load_remote(&blob.nixl_md, &blob.agent)?;
    let name = remote.name().clone();
    let ids: Vec<u64> = blob.layouts.iter().map(|d| d.export_id).collect();
    let uses = control.import(&name, &ids)?;
    // From here on, dropping `peer` gives the imports up again.
    let mut peer = Peer {
        control: control.clone(),
        ids,
        layouts: Vec::with_capacity(uses.len()),
        remote,
    };
    let whence = Whence::of(blob.origin);
    // Small pieces to and from the peer's layouts go through the slots it granted: of its
    // host arena for host layouts, of its device arena (staged on this context's device) for
    // device layouts.
    let grants = control.grants(&name);
    let landing = blob.arena.and_then(|a| {
        landing::PeerLanding::new(control, &name, a, grants.clone(), whence.same_host)
            .map(|l| Arc::new(l) as Arc<dyn crate::memory::Landing>)
    });
    let device_landing = match (blob.device_arena, control.device()) {
        (Some(a), Some(copier)) => {
            let agent = control.agent().clone();
            landing::PeerLanding::new_device(control, &name, a, grants, copier, agent)
                .map(|l| Arc::new(l) as Arc<dyn crate::memory::Landing>)
        }
        _ => None,
    };
    peer.layouts = blob
        .layouts
        .into_iter()
        .zip(uses)
        .map(|(d, state)| {
            if d.kind == StorageKind::Device {
                state.set_ipc(IpcImport::new(ipc_use(&whence, &d, &ipc_dev)));
            }
            let arena = match d.kind {
                StorageKind::Device => device_landing.as_ref(),
                _ => landing.as_ref(),
            };
            if let Some(l) = arena {
                state.set_landing(l.clone(), d.export_id);
            }
            let memory = Memory::remote(d.kind, d.device_id, d.regions, state);
            Layout::new_remote(d.config, memory, context_id, name.clone())
                .map(Arc::new)
                .map_err(|e| Error::Peer(format!("peer layout: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(peer)
}

/// An imported peer: its agent (loaded into the importing context's NIXL agent) and the layouts
/// it shared. Dropping the last peer of an agent unloads its metadata; layout handles stay valid
/// objects, but once no peer handle imports a layout any more, transfers to it are refused.
pub struct Peer {
    control: Arc<Control>,
    /// Export ids of `layouts`, in order.
    ids: Vec<u64>,
    layouts: Vec<Arc<Layout>>,
    // Last: the metadata stays loaded until the exporter was told the imports ended.
    remote: RemoteAgent,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.control.release(self.remote.name(), &self.ids);
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("agent", self.remote.name())
            .field("layouts", &self.layouts.len())
            .finish()
    }
}

impl Peer {
    pub fn agent(&self) -> &str {
        self.remote.name()
    }

    pub fn layouts(&self) -> &[Arc<Layout>] {
        &self.layouts
    }
}
