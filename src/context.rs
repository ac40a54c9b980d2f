//! The context: capabilities, worker threads, and the operations a runtime calls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::sys;

use crate::error::{Error, Result, bail};
use crate::exec::cuda::progress::{Pending, Progress, StreamGate};
use crate::exec::cuda::{self, CudaDevice, Direction, check};
use crate::exec::nixl::NixlAgent;
use crate::exec::nixl::xfer::Xfer;
use crate::exec::two_hop::{self, BouncePool};
use crate::exec::{memcpy, workers::Workers};
use crate::layout::{Geometry, Layout, LayoutConfig, LayoutKind, check_regions};
use crate::memory::disk::DiskFile;
use crate::memory::{Memory, Region, StorageKind};
use crate::peer::{LayoutDescriptor, Peer, PeerBlob};
use crate::plan::{
    Capabilities, CopyList, CopyOp, Location, Plan, Request, Strategy, copy_list, select,
};
use crate::transfer::{Completion, Mechanism, Transfer, TransferStats};
use crate::verify;

/// NIXL backend bits of `ContextConfig::nixl_backends`.
pub(crate) mod backend {
    pub(crate) const UCX: u32 = 1;
    pub(crate) const POSIX: u32 = 2;
    pub(crate) const GDS: u32 = 4;
    pub(crate) const GDS_MT: u32 = 8;
    pub(crate) const ALL: u32 = UCX | POSIX | GDS | GDS_MT;
}

/// Upper bound on worker threads, so a typo cannot start thousands of threads.
pub(crate) const MAX_WORKER_THREADS: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextConfig {
    /// NIXL agent name; `None` generates a unique one.
    pub agent_name: Option<String>,
    pub nixl_backends: u32,
    /// CUDA device to bind, or -1 for none.
    pub cuda_device: i32,
    pub capabilities: Capabilities,
    /// Folder for unnamed disk layouts; `None` is the system's temporary folder.
    pub disk_dir: Option<PathBuf>,
    /// 0 picks the number of CPUs.
    pub worker_threads: u32,
}

impl ContextConfig {
    /// The folder for unnamed disk layouts.
    pub(crate) fn disk_dir(&self) -> PathBuf {
        self.disk_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            agent_name: None,
            nixl_backends: backend::UCX | backend::POSIX,
            cuda_device: 0,
            capabilities: Capabilities::default(),
            disk_dir: None,
            worker_threads: 0,
        }
    }
}

/// How the CUDA executor may move bytes (host transfers ignore it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyMode {
    #[default]
    Auto,
    CopyEngine,
    Kernel,
}

impl TryFrom<i32> for CopyMode {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self> {
        Ok(match v {
            0 => Self::Auto,
            1 => Self::CopyEngine,
            2 => Self::Kernel,
            _ => bail!(
                InvalidArgument,
                "unknown copy mode {v} (expected 0..=2: AUTO, COPY_ENGINE, KERNEL)"
            ),
        })
    }
}

/// Per-transfer options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferOptions {
    pub layer_begin: u64,
    /// 0 = all layers.
    pub layer_end: u64,
    /// A `CUstream` whose queued work must finish before the transfer starts.
    pub cuda_stream: Option<usize>,
    pub copy_mode: CopyMode,
    /// Message delivered to a remote target when a write completes.
    pub notify: Option<Vec<u8>>,
}

/// Where a new layout's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSpec {
    pub kind: StorageKind,
    pub device_id: i32,
    pub path: Option<PathBuf>,
}

impl StorageSpec {
    pub fn new(kind: StorageKind) -> Self {
        Self {
            kind,
            device_id: 0,
            path: None,
        }
    }
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The CUDA side of a context: the configured device (its streams carry async transfers and
/// its progress engine completes them) and any other device a layout was made on.
#[derive(Debug)]
struct CudaState {
    primary: Arc<CudaDevice>,
    progress: Progress,
    others: Mutex<HashMap<i32, Arc<CudaDevice>>>,
}

/// What moves blocks. Thread-safe: every method takes `&self`.
#[derive(Debug)]
pub struct Context {
    id: u64,
    name: String,
    config: ContextConfig,
    // Dropped first: queued host copies finish before the devices they may touch go away.
    workers: Workers,
    cuda: std::result::Result<CudaState, String>,
    /// Present when `nixl_backends` asked for any backend.
    nixl: Option<NixlAgent>,
    /// Pinned bounce buffers for two-hop plans, made on first use and reused.
    bounce: Arc<BouncePool>,
}

fn unavailable_storage(kind: StorageKind) -> Error {
    Error::Unavailable(format!(
        "{kind} storage is not available yet: kvxfer loads NIXL, but its disk tier is not \
         built in this version"
    ))
}

fn stats(
    list: &CopyList,
    plan: Plan,
    mechanism: Mechanism,
    kernel_fallback: bool,
) -> TransferStats {
    TransferStats {
        bytes: list.bytes,
        fragments: list.fragments,
        copies: list.copies.len() as u64,
        plan,
        mechanism,
        kernel_fallback,
        elapsed_ns: 0,
    }
}

impl Context {
    pub fn new(config: ContextConfig) -> Result<Self> {
        if config.nixl_backends & !backend::ALL != 0 {
            bail!(
                InvalidArgument,
                "unknown NIXL backend bits {:#x} (known: UCX=1, POSIX=2, GDS=4, GDS_MT=8)",
                config.nixl_backends & !backend::ALL
            );
        }
        if config.cuda_device < -1 {
            bail!(
                InvalidArgument,
                "cuda_device must be a device ordinal or -1 for none, got {}",
                config.cuda_device
            );
        }
        if config.worker_threads > MAX_WORKER_THREADS {
            bail!(
                InvalidArgument,
                "worker_threads {} is above the limit of {MAX_WORKER_THREADS}",
                config.worker_threads
            );
        }
        if let Some(name) = &config.agent_name
            && name.is_empty()
        {
            bail!(
                InvalidArgument,
                "agent_name must not be empty (NULL generates one)"
            );
        }
        // Without NIXL there are no disk transfers to route; a context without backends may
        // still ask the planner what allow_gds would do.
        if config.capabilities.allow_gds
            && config.nixl_backends != 0
            && config.nixl_backends & (backend::GDS | backend::GDS_MT) == 0
        {
            bail!(
                InvalidArgument,
                "allow_gds sends device <-> disk transfers through GPUDirect Storage, which needs \
                 NIXL's GDS or GDS_MT backend in nixl_backends"
            );
        }
        let threads = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(4, |n| n.get()),
            n => n as usize,
        };
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = config
            .agent_name
            .clone()
            .unwrap_or_else(|| format!("kvxfer-{}-{id}", std::process::id()));
        let cuda = if config.cuda_device < 0 {
            Err("this context was made with cuda_device = -1".to_string())
        } else {
            match CudaDevice::open(config.cuda_device) {
                Ok(primary) => {
                    // Built now rather than on the first, latency-critical transfer; if it
                    // cannot be built, AUTO falls back to copy engines and says so per transfer.
                    let _ = primary.kernel();
                    Ok(CudaState {
                        progress: Progress::new(&primary)?,
                        primary,
                        others: Mutex::new(HashMap::new()),
                    })
                }
                // No driver or no device: the context works without CUDA.
                Err(Error::Unavailable(why)) => Err(why),
                Err(e) => return Err(e),
            }
        };
        let nixl = match config.nixl_backends {
            0 => None,
            bits => Some(NixlAgent::new(
                &name,
                bits,
                config.capabilities.allow_gpu_rdma,
            )?),
        };
        if let Some(agent) = &nixl
            && config.capabilities.allow_gds
            && agent.has_gds()
        {
            agent.probe_gds(&config.disk_dir())?;
        }
        let workers = Workers::new(threads, "kvx-worker")?;
        Ok(Self {
            id,
            name,
            config,
            workers,
            cuda,
            nixl,
            bounce: Arc::default(),
        })
    }

    /// The agent name peers know this context by.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &ContextConfig {
        &self.config
    }

    pub fn worker_threads(&self) -> usize {
        self.workers.count()
    }

    /// Whether this context drives a GPU.
    pub fn has_cuda(&self) -> bool {
        self.cuda.is_ok()
    }

    /// The NIXL backends this context's agent created, by plugin name (empty without NIXL).
    pub fn nixl_backends(&self) -> &[&'static str] {
        self.nixl.as_ref().map_or(&[], |a| a.backends())
    }

    /// The context's NIXL agent, for tools that measure kvxfer against raw NIXL calls.
    pub fn nixl_agent(&self) -> Option<&nixl_sys::Agent> {
        self.nixl.as_ref().map(|a| a.agent())
    }

    /// The configured CUDA device, for tools that measure kvxfer against raw CUDA calls.
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        self.cuda.as_ref().ok().map(|c| &c.primary)
    }

    /// The CUDA side, or `Unavailable` saying why there is none.
    fn cuda(&self) -> Result<&CudaState> {
        self.cuda.as_ref().map_err(|why| {
            Error::Unavailable(format!("CUDA is not available in this context: {why}"))
        })
    }

    /// The device of `ordinal`, opened on first use.
    fn device(&self, ordinal: i32) -> Result<Arc<CudaDevice>> {
        let cuda = self.cuda()?;
        if ordinal == cuda.primary.ordinal {
            return Ok(cuda.primary.clone());
        }
        let mut others = cuda.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = others.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = CudaDevice::open(ordinal)?;
        others.insert(ordinal, d.clone());
        Ok(d)
    }

    /// A layout over memory kvxfer allocates and frees with it. PINNED is CUDA-pinned memory
    /// on a context with CUDA and mlock'ed memory otherwise; DEVICE is on `storage.device_id`.
    pub fn new_layout(&self, config: LayoutConfig, storage: &StorageSpec) -> Result<Layout> {
        let g = config.validate()?;
        let sizes = vec![g.allocation_len; g.allocations as usize];
        let align = u64::from(config.alignment);
        let mem = match storage.kind {
            StorageKind::System => Memory::allocate_host(storage.kind, &sizes, align)?,
            StorageKind::Pinned => match &self.cuda {
                Ok(c) => Memory::allocate_cuda(&c.primary, storage.kind, &sizes, align)?,
                Err(_) => Memory::allocate_host(storage.kind, &sizes, align)?,
            },
            StorageKind::Device => {
                let dev = self.device(storage.device_id)?;
                Memory::allocate_cuda(&dev, storage.kind, &sizes, align)?
            }
            StorageKind::Disk => self.disk_memory(&g, storage)?,
        };
        Layout::new(config, mem, self.id)
    }

    /// A disk layout's file: unnamed in `disk_dir`, or at `storage.path` (created or reused,
    /// kept). Allocations sit at page-aligned offsets.
    fn disk_memory(&self, g: &Geometry, storage: &StorageSpec) -> Result<Memory> {
        let agent = self.nixl("DISK storage")?;
        if !agent.backends().contains(&"POSIX") {
            bail!(
                Unavailable,
                "DISK storage needs the POSIX NIXL backend (KVX_BACKEND_POSIX in nixl_backends)"
            );
        }
        let stride = g
            .allocation_len
            .checked_next_multiple_of(4096)
            .ok_or_else(|| Error::InvalidArgument("disk layout too large".into()))?;
        let total = stride
            .checked_mul(g.allocations)
            .ok_or_else(|| Error::InvalidArgument("disk layout too large".into()))?;
        let file = match &storage.path {
            Some(p) => DiskFile::at(p, total)?,
            None => {
                let dir = self.config.disk_dir();
                // cuFile re-opens files by name (GDS and its compat mode alike).
                let named = self.nixl.as_ref().is_some_and(|n| n.has_gds());
                DiskFile::temporary(&dir, total, named)?
            }
        };
        let regions = (0..g.allocations)
            .map(|i| Region {
                addr: i * stride,
                len: g.allocation_len,
            })
            .collect();
        Ok(Memory::disk(file, regions))
    }

    /// A layout over memory the caller owns: one region for fully contiguous, one per layer
    /// for layer-separate. kvxfer never frees it. Device memory must lie in allocations of
    /// `storage.device_id`; pinned memory on a CUDA context is registered with CUDA unless it
    /// already is.
    pub fn wrap_layout(
        &self,
        config: LayoutConfig,
        storage: &StorageSpec,
        regions: &[Region],
    ) -> Result<Layout> {
        check_regions(&config, storage.kind, regions)?;
        let regions = regions.to_vec();
        let mem = match storage.kind {
            StorageKind::System => Memory::caller_owned(storage.kind, 0, regions),
            StorageKind::Pinned => match &self.cuda {
                Ok(c) => Memory::caller_owned_cuda(&c.primary, storage.kind, regions)?,
                Err(_) => Memory::caller_owned(storage.kind, 0, regions),
            },
            StorageKind::Device => {
                let dev = self.device(storage.device_id)?;
                Memory::caller_owned_cuda(&dev, storage.kind, regions)?
            }
            StorageKind::Disk => return Err(unavailable_storage(StorageKind::Disk)),
        };
        Layout::new(config, mem, self.id)
    }

    fn check_owned(&self, layout: &Layout, what: &str) -> Result<()> {
        if layout.context_id() != self.id {
            bail!(
                InvalidArgument,
                "the {what} layout belongs to another context; use layouts of this context"
            );
        }
        Ok(())
    }

    fn location(layout: &Layout) -> Location {
        Location {
            kind: layout.storage_kind(),
            remote: layout.is_remote(),
        }
    }

    pub(crate) fn nixl(&self, what: &str) -> Result<&NixlAgent> {
        self.nixl.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "{what} needs NIXL; this context was made with nixl_backends = 0"
            ))
        })
    }

    /// The bytes a peer imports: this context's NIXL agent metadata and descriptors of
    /// `layouts`, which are registered with the agent (for as long as they live) so that the
    /// peer can reach them.
    pub fn export(&self, layouts: &[&Layout]) -> Result<Vec<u8>> {
        let agent = self.nixl("export")?;
        let mut descriptors = Vec::with_capacity(layouts.len());
        for (i, l) in layouts.iter().enumerate() {
            self.check_owned(l, "exported")?;
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
            descriptors.push(LayoutDescriptor {
                config: *l.config(),
                kind: l.storage_kind(),
                device_id: l.memory().device_id(),
                regions: l.memory().regions().to_vec(),
            });
        }
        for l in layouts {
            l.memory().ensure_nixl_registered(agent.agent())?;
        }
        let nixl_md = agent.agent().get_local_md().map_err(|e| {
            Error::Nixl(format!("NIXL could not produce this agent's metadata: {e}"))
        })?;
        PeerBlob {
            agent: self.name.clone(),
            nixl_md,
            layouts: descriptors,
        }
        .encode()
    }

    /// Imports a peer from the bytes it exported. The bytes are untrusted: anything malformed,
    /// truncated or foreign is `Error::Peer`, and NIXL only sees metadata whose checksum held.
    pub fn import(&self, data: &[u8]) -> Result<Peer> {
        let blob = PeerBlob::decode(data)?;
        let agent = self.nixl("import")?;
        if blob.agent == self.name {
            bail!(Peer, "this export comes from this context itself");
        }
        let loaded = agent
            .agent()
            .load_remote_md(&blob.nixl_md)
            .map_err(|e| Error::Peer(format!("NIXL refused the peer's metadata: {e}")))?;
        if loaded != blob.agent {
            let _ = agent.agent().invalidate_remote_md(&loaded);
            bail!(
                Peer,
                "the metadata is agent {loaded:?} but the export says {:?}",
                blob.agent
            );
        }
        let name: Arc<str> = Arc::from(loaded.as_str());
        let mut layouts = Vec::with_capacity(blob.layouts.len());
        for d in blob.layouts {
            let memory = Memory::remote(d.kind, d.device_id, d.regions);
            match Layout::new_remote(d.config, memory, self.id, name.clone()) {
                Ok(l) => layouts.push(Arc::new(l)),
                Err(e) => {
                    let _ = agent.agent().invalidate_remote_md(&name);
                    return Err(Error::Peer(format!("peer layout: {e}")));
                }
            }
        }
        Ok(Peer::new(name, layouts, agent.agent().clone()))
    }

    /// The planner's decision for moving blocks from `src` to `dst`.
    pub fn plan(&self, src: &Layout, dst: &Layout) -> Result<Plan> {
        self.check_owned(src, "source")?;
        self.check_owned(dst, "destination")?;
        self.plan_locations(Self::location(src), Self::location(dst))
    }

    /// The planner's decision for two locations under this context's capabilities.
    pub fn plan_locations(&self, src: Location, dst: Location) -> Result<Plan> {
        select(src, dst, self.config.capabilities)
    }

    /// Validates the whole request, then starts it; returns before the bytes have moved.
    /// An error means nothing was written.
    pub fn submit(
        &self,
        src: &Layout,
        src_blocks: &[u64],
        dst: &Layout,
        dst_blocks: &[u64],
        options: &TransferOptions,
    ) -> Result<Transfer> {
        let plan = self.plan(src, dst)?;
        let layers = copy_list::resolve_layers(src, dst, options.layer_begin, options.layer_end)?;
        let request = Request {
            src,
            src_blocks,
            dst,
            dst_blocks,
            layers,
        };
        request.validate()?;
        if options.cuda_stream.is_some() {
            self.cuda()?;
        }
        if options.notify.is_some()
            && !(dst.is_remote() && plan == Plan::Direct(Strategy::NixlWrite))
        {
            bail!(
                InvalidArgument,
                "notify_msg applies only to writes to a remote peer; this transfer is not one"
            );
        }
        match plan {
            Plan::Direct(Strategy::Memcpy) => {
                let gate = self.gate(options.cuda_stream)?;
                Ok(self.submit_on_workers(&request, plan, None, gate))
            }
            Plan::Direct(
                s @ (Strategy::CudaAsyncH2D | Strategy::CudaAsyncD2H | Strategy::CudaAsyncD2D),
            ) => self.submit_cuda_async(&request, plan, s, options),
            Plan::Direct(s @ (Strategy::CudaBlockingH2D | Strategy::CudaBlockingD2H)) => {
                let (dir, dev_mem) = if s == Strategy::CudaBlockingH2D {
                    (Direction::HostToDevice, dst.memory())
                } else {
                    (Direction::DeviceToHost, src.memory())
                };
                let dev = dev_mem
                    .device()
                    .cloned()
                    .ok_or_else(|| Error::Internal("device layout without a CUDA device".into()))?;
                let gate = self.gate(options.cuda_stream)?;
                Ok(self.submit_on_workers(&request, plan, Some((dev, dir)), gate))
            }
            Plan::TwoHop {
                first: Strategy::NixlReadFlipped | Strategy::CudaAsyncD2H,
                second: Strategy::NixlWrite | Strategy::CudaAsyncH2D,
                bounce: StorageKind::Pinned,
            } => {
                let gate = self.gate(options.cuda_stream)?;
                self.submit_two_hop(&request, plan, gate)
            }
            // NixlRead is the GDS plan disk -> device: like NixlReadFlipped, the local side (the
            // device) is the destination and reads from the file.
            Plan::Direct(
                s @ (Strategy::NixlWrite | Strategy::NixlReadFlipped | Strategy::NixlRead),
            ) => self.submit_nixl(
                &request,
                plan,
                s == Strategy::NixlWrite,
                options.notify.as_deref(),
            ),
            Plan::Direct(s) => bail!(
                Unavailable,
                "strategy {} ({} -> {}) is not available in this version of kvxfer",
                s.name(),
                src.storage_kind(),
                dst.storage_kind()
            ),
            Plan::TwoHop { .. } => bail!(
                Unavailable,
                "two-hop plan {plan} is not available in this version of kvxfer"
            ),
        }
    }

    /// Host <-> disk (this agent's POSIX backend) and local <-> peer (UCX) through the
    /// context's NIXL agent: `write` when the local side is the source (the seed's NixlWrite),
    /// else the local side is the destination (NixlReadFlipped).
    fn submit_nixl(
        &self,
        request: &Request<'_>,
        plan: Plan,
        write: bool,
        notify: Option<&[u8]>,
    ) -> Result<Transfer> {
        let agent = self.nixl("disk and peer transfers")?;
        let (local, remote) = if write {
            (request.src, request.dst)
        } else {
            (request.dst, request.src)
        };
        let (remote_agent, error): (String, fn(String) -> Error) = match remote.peer() {
            Some(peer) => (peer.to_string(), Error::Peer),
            None => (self.name.clone(), Error::Io),
        };
        let buffered = || agent.buffered_file_args();
        local
            .memory()
            .ensure_nixl_registered_with(agent.agent(), buffered)?;
        if !remote.is_remote() {
            remote
                .memory()
                .ensure_nixl_registered_with(agent.agent(), buffered)?;
        }
        let list = request.build();
        let mut copies: Vec<CopyOp> = if write {
            list.copies.clone()
        } else {
            list.copies
                .iter()
                .map(|c| CopyOp {
                    src: c.dst,
                    dst: c.src,
                    len: c.len,
                })
                .collect()
        };
        if !remote.is_remote() {
            // A file: ascending offsets let the block layer merge and the disk read ahead.
            crate::plan::copy_list::sort_by_dst(&mut copies);
        }
        let completion = Completion::new(1);
        if copies.is_empty() && notify.is_none() {
            completion.part_done(Ok(()));
        } else {
            let job = Xfer {
                write,
                local: local.memory(),
                remote: remote.memory(),
                remote_agent: &remote_agent,
                copies: &copies,
                notify,
                remote_fd: if remote.is_remote() {
                    None
                } else {
                    crate::exec::nixl::xfer::direct_fd(remote.memory(), &copies)
                },
            };
            let gds = !remote.is_remote()
                && [local.storage_kind(), remote.storage_kind()].contains(&StorageKind::Device);
            agent
                .post(job, completion.clone(), error, gds && agent.has_gds_batch())
                .map_err(|e| match e {
                    // Device <-> disk without a bounce buffer is GPUDirect Storage: say so.
                    Error::Io(m) | Error::Nixl(m) if gds => Error::Unavailable(format!(
                        "GPUDirect Storage could not take this transfer; NIXL's GDS backend \
                         needs cuFile to accept the file (nvidia-fs, or cuFile's compat \
                         mode) and the device memory: {m}"
                    )),
                    e => e,
                })?;
        }
        let stats = TransferStats {
            copies: copies.len() as u64,
            ..stats(&list, plan, Mechanism::Nixl, false)
        };
        Ok(Transfer::new(completion, stats, self.has_cuda()))
    }

    /// Disk -> disk, device -> disk and disk -> device through the context's pinned bounce
    /// buffers (exec/two_hop.rs), pipelined on a worker thread. A device-to-disk transfer with
    /// `cuda_stream` starts after the work queued there (the worker waits for the gate).
    fn submit_two_hop(
        &self,
        request: &Request<'_>,
        plan: Plan,
        gate: Option<Arc<StreamGate>>,
    ) -> Result<Transfer> {
        let agent = self.nixl("disk transfers")?;
        let (src, dst) = (request.src.memory().clone(), request.dst.memory().clone());
        // The device of whichever side is device memory; none between two disks.
        let device = match (src.kind(), dst.kind()) {
            (StorageKind::Device, _) => Some(src.clone()),
            (_, StorageKind::Device) => Some(dst.clone()),
            _ => None,
        }
        .map(|m| {
            m.device()
                .cloned()
                .ok_or_else(|| Error::Internal("device layout without a CUDA device".into()))
        })
        .transpose()?;
        for m in [&src, &dst] {
            if m.kind() == StorageKind::Disk {
                m.ensure_nixl_registered_with(agent.agent(), || agent.buffered_file_args())?;
            }
        }
        let list = request.build();
        let stats = stats(&list, plan, Mechanism::Nixl, false);
        let completion = Completion::new(1);
        let (nixl, pool, done) = (
            agent.agent().clone(),
            self.bounce.clone(),
            completion.clone(),
        );
        let cuda = self.cuda.as_ref().ok().map(|c| c.primary.clone());
        self.workers.spawn(Box::new(move || {
            let run = || -> Result<()> {
                if let Some(g) = &gate {
                    g.wait()?;
                }
                let make = || -> Result<Arc<Memory>> {
                    let sizes = [two_hop::CHUNK];
                    let m = match &cuda {
                        Some(dev) => Memory::allocate_cuda(dev, StorageKind::Pinned, &sizes, 4096)?,
                        None => Memory::allocate_host(StorageKind::Pinned, &sizes, 4096)?,
                    };
                    m.ensure_nixl_registered(&nixl)?;
                    Ok(Arc::new(m))
                };
                let lease = pool.take(make)?;
                let ends = match &device {
                    None => two_hop::Ends::DiskToDisk {
                        src: &src,
                        dst: &dst,
                    },
                    Some(dev) if src.kind() == StorageKind::Device => {
                        two_hop::Ends::DeviceToDisk { dev, dst: &dst }
                    }
                    Some(dev) => two_hop::Ends::DiskToDevice { dev, src: &src },
                };
                two_hop::run(&nixl, ends, &list.copies, &lease)
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|_| Err(Error::Internal("a two-hop worker panicked".into())));
            drop(gate);
            done.part_done(r);
        }));
        Ok(Transfer::new(completion, stats, self.has_cuda()))
    }

    /// Dequeues the oldest notification a peer sent to this context with a write:
    /// `fits(sender, message)` decides whether the caller can take it.
    pub fn next_notification<T>(
        &self,
        fits: impl FnOnce(&str, &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        self.nixl("notifications")?.next_notification(fits)
    }

    /// Records an event on the caller's stream, after which the transfer must start.
    fn gate(&self, stream: Option<usize>) -> Result<Option<Arc<StreamGate>>> {
        match stream {
            None => Ok(None),
            Some(s) => StreamGate::record(&self.cuda()?.primary, s).map(|g| Some(Arc::new(g))),
        }
    }

    /// Host memcpy (`cuda` = None) or blocking CUDA copies between pageable memory and a
    /// device, split over the worker threads.
    fn submit_on_workers(
        &self,
        request: &Request<'_>,
        plan: Plan,
        cuda: Option<(Arc<CudaDevice>, Direction)>,
        gate: Option<Arc<StreamGate>>,
    ) -> Transfer {
        let list = request.build();
        let shares = memcpy::split(&list.copies, self.workers.count());
        let mechanism = if cuda.is_some() {
            Mechanism::CopyEngine
        } else {
            Mechanism::Memcpy
        };
        let stats = stats(&list, plan, mechanism, false);
        let streaming = list.bytes >= memcpy::STREAMING_MIN_BYTES;
        let completion = Completion::new(shares.len());
        for share in shares {
            let completion = completion.clone();
            // The job owns both memories, so freeing a layout cannot release them under it.
            let keep = (request.src.memory().clone(), request.dst.memory().clone());
            let (cuda, gate) = (cuda.clone(), gate.clone());
            self.workers.spawn(Box::new(move || {
                let run = || -> Result<()> {
                    if let Some(g) = &gate {
                        g.wait()?;
                    }
                    match &cuda {
                        // SAFETY: the request was validated: every range lies in memory that
                        // `keep` holds alive, and no destination overlaps a source or another
                        // destination.
                        None => unsafe { memcpy::copy_all(&share, streaming) },
                        // SAFETY: as above.
                        Some((dev, dir)) => unsafe {
                            cuda::copy::copy_blocking(dev, *dir, &share)?
                        },
                    }
                    Ok(())
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|_| Err(Error::Internal("a copy worker panicked".into())));
                drop((keep, gate));
                completion.part_done(result);
            }));
        }
        Transfer::new(completion, stats, self.has_cuda())
    }

    /// Copy engines or the SM kernel on the device's stream for this direction; the progress
    /// engine completes the transfer when its event fires.
    fn submit_cuda_async(
        &self,
        request: &Request<'_>,
        plan: Plan,
        strategy: Strategy,
        options: &TransferOptions,
    ) -> Result<Transfer> {
        let cuda = self.cuda()?;
        let dev = &cuda.primary;
        let direction = match strategy {
            Strategy::CudaAsyncH2D => Direction::HostToDevice,
            Strategy::CudaAsyncD2H => Direction::DeviceToHost,
            _ => Direction::DeviceToDevice,
        };
        let (src_mem, dst_mem) = (request.src.memory(), request.dst.memory());
        // Work runs on the context's device; memory of another device is reached through peer
        // access where the hardware has it (kernels and direct copies), else the copy engines
        // go through the driver's staging.
        let other = |m: &Memory| m.kind() == StorageKind::Device && m.device_id() != dev.ordinal;
        if other(src_mem) && other(dst_mem) {
            bail!(
                Unsupported,
                "device {} -> device {}: one side of a device transfer must be on the \
                 context's cuda_device ({}); use a context made for one of the two",
                src_mem.device_id(),
                dst_mem.device_id(),
                dev.ordinal
            );
        }
        let mut peer = true;
        for m in [src_mem, dst_mem] {
            if other(m) {
                let d = m
                    .device()
                    .ok_or_else(|| Error::Internal("device layout without a CUDA device".into()))?;
                peer = dev.peer_access(d)?;
            }
        }
        let reachable =
            |m: &Memory| m.is_mapped() || (m.kind() == StorageKind::Device && (!other(m) || peer));
        let loc = |m: &Memory| match m.kind() {
            StorageKind::Device => cuda::copy::Loc::Device(m.device_id()),
            _ => cuda::copy::Loc::Host,
        };
        let (src_loc, dst_loc) = (loc(src_mem), loc(dst_mem));
        if direction == Direction::HostToDevice && !src_mem.is_mapped()
            || direction == Direction::DeviceToHost && !dst_mem.is_mapped()
        {
            bail!(
                InvalidArgument,
                "asynchronous copies need CUDA-pinned host memory; this pinned layout was made \
                 on a context without CUDA"
            );
        }
        let (sc, dc) = (request.src.config(), request.dst.config());
        let region = request.src.region_len();
        let layers = request.layers.end - request.layers.start;
        let fragments = request.src_blocks.len() as u64 * layers * sc.outer_dim;
        // Between fully contiguous layouts a whole block is one contiguous piece.
        let whole_blocks = sc.kind == LayoutKind::FullyContiguous
            && dc.kind == LayoutKind::FullyContiguous
            && layers == sc.num_layers
            && layers == dc.num_layers;
        let unit = if whole_blocks {
            region * layers * sc.outer_dim
        } else {
            region
        };
        let choice = cuda::copy::choose(
            dev,
            direction,
            unit,
            fragments,
            options.copy_mode,
            reachable(src_mem) && reachable(dst_mem),
        )?;
        dev.bind()?;
        let stream = dev.stream(direction);
        // The gate's event stays out of the pool until the transfer completes: a pooled event
        // re-recorded as another transfer's completion would change what this wait waits for.
        let gate = self.gate(options.cuda_stream)?;
        if let Some(g) = &gate {
            g.stream_waits(stream)?;
        }
        // On failure, whatever was queued must finish before the caller may free the memory.
        let fail = |e: Error, table: Option<cuda::TableBuffer>| {
            // SAFETY: a live stream of this device.
            unsafe { sys::cuStreamSynchronize(stream) };
            if let Some(t) = table {
                dev.recycle_table(t);
            }
            e
        };
        let (table, copies) = if choice.mechanism == Mechanism::Kernel {
            let kernel = dev
                .kernel()
                .map_err(|why| Error::Unavailable(why.to_string()))?;
            let job = cuda::KernelJob {
                src: request.src,
                dst: request.dst,
                src_blocks: request.src_blocks,
                dst_blocks: request.dst_blocks,
                layers: request.layers.clone(),
            };
            // SAFETY: `stream` belongs to `dev`; the request was validated and `Pending` keeps
            // both memories alive until the progress engine saw the stream pass this work.
            let table = unsafe { kernel.enqueue(dev, stream, &job) }.map_err(|e| fail(e, None))?;
            (table, fragments)
        } else {
            // The whole list first, then the batch calls back to back: on an H100, pauses of
            // 200 µs or more between batch calls of small host-to-device copies (the time to
            // build the next chunk) made the driver's calls 3x slower and the copies run at a
            // third of the speed (kernel lab, device run 5 of 2026-11-26).
            let list = request.build();
            // SAFETY: as above.
            unsafe { cuda::copy::enqueue_at(dev, stream, src_loc, dst_loc, &list.copies) }
                .map_err(|e| fail(e, None))?;
            (None, list.copies.len() as u64)
        };
        let event = match dev.event() {
            Ok(e) => e,
            Err(e) => return Err(fail(e, table)),
        };
        // SAFETY: the event and stream are live handles of this device.
        if let Err(e) = check(
            unsafe { sys::cuEventRecord(event, stream) },
            "cuEventRecord",
        ) {
            dev.recycle_event(event);
            return Err(fail(e, table));
        }
        let completion = Completion::new(1);
        let bytes = fragments * region;
        let route = cuda::pace::Route {
            direction,
            kernel: choice.mechanism == Mechanism::Kernel,
            peer: other(src_mem) || other(dst_mem),
        };
        let gated = gate.is_some();
        cuda.progress.push(
            direction,
            Pending {
                event,
                bytes,
                route,
                completion: completion.clone(),
                table,
                memory: vec![src_mem.clone(), dst_mem.clone()],
                gate,
            },
        );
        let stats = TransferStats {
            bytes,
            fragments,
            copies,
            plan,
            mechanism: choice.mechanism,
            kernel_fallback: choice.kernel_fallback,
            elapsed_ns: 0,
        };
        Ok(Transfer::new(completion, stats, true).with_event(dev.clone(), event, route, gated))
    }

    /// Writes the verification pattern of `seed` into `blocks`.
    pub fn fill(&self, layout: &Layout, blocks: &[u64], seed: u64) -> Result<()> {
        self.check_owned(layout, "filled")?;
        verify::fill(layout, blocks, seed, self.workers.count())
    }

    /// Checksums of `blocks`, one per entry.
    pub fn checksum(&self, layout: &Layout, blocks: &[u64]) -> Result<Vec<u64>> {
        self.check_owned(layout, "checksummed")?;
        verify::checksum(layout, blocks, self.workers.count())
    }
}

/// Converts a C-style timeout (µs, negative = forever) to a wait bound.
pub fn timeout_from_us(us: i64) -> Option<Duration> {
    u64::try_from(us).ok().map(Duration::from_micros)
}

// The "thread-safe" promises of the C API rest on these.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Context>();
    send_sync::<Layout>();
    send_sync::<Transfer>();
};
