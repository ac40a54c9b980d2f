//! The context: it checks its configuration, owns the resources transfers run on (worker
//! threads, the CUDA device, the NIXL agent, the bounce pool), makes layouts, and hands exports
//! and imports to `peer` and submits to `exec::dispatch`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cuda::CudaDevice;
use crate::error::{Error, Result, bail};
use crate::exec::cuda::CudaExec;
use crate::exec::nixl::NixlExec;
use crate::exec::{self, Resources, Workers};
use crate::layout::{Geometry, Layout, LayoutConfig, check_regions};
use crate::memory::disk;
use crate::memory::{IpcFallback, Memory, Region, StorageKind};
use crate::metrics::Counters;
use crate::nixl::Backends;
use crate::options::{
    ContextConfig, ContextStats, MAX_WORKER_THREADS, StorageSpec, TransferOptions,
};
use crate::peer::{self, Control, Peer, PeerBlob};
use crate::plan::{Location, Plan, Request, copy_list, select};
use crate::transfer::Transfer;
use crate::verify;

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What moves blocks. Thread-safe: every method takes `&self`.
#[derive(Debug)]
pub struct Context {
    id: u64,
    name: String,
    config: ContextConfig,
    res: Resources,
    /// Revocation messages with peers; present with NIXL.
    control: Option<Arc<Control>>,
    counters: Arc<Counters>,
}

/// Refuses what no part of a context can be made with.
fn check_config(config: &ContextConfig) -> Result<()> {
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
    // Without NIXL there are no disk transfers to route; a context without backends may still
    // ask the planner what allow_gds would do.
    if config.capabilities.allow_gds
        && !config.nixl_backends.is_empty()
        && !config
            .nixl_backends
            .intersects(Backends::GDS | Backends::GDS_MT)
    {
        bail!(
            InvalidArgument,
            "allow_gds sends device <-> disk transfers through GPUDirect Storage, which needs \
             NIXL's GDS or GDS_MT backend in nixl_backends"
        );
    }
    Ok(())
}

impl Context {
    pub fn new(config: ContextConfig) -> Result<Self> {
        check_config(&config)?;
        let threads = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(4, |n| n.get()),
            n => n as usize,
        };
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = config
            .agent_name
            .clone()
            .unwrap_or_else(|| format!("kvxfer-{}-{id}", std::process::id()));
        let cuda = CudaExec::open_if_any(config.cuda_device, config.max_sms)?;
        let nixl = match config.nixl_backends {
            b if b.is_empty() => None,
            b => Some(NixlExec::new(&name, b, config.capabilities.allow_gpu_rdma)?),
        };
        if let Some(n) = &nixl
            && config.capabilities.allow_gds
            && n.agent.has_gds()
        {
            disk::probe_gds(&n.agent, &config.disk_dir())
                .inspect_err(|e| tracing::warn!("GPUDirect Storage refused: {e}"))?;
        }
        let workers = Workers::new(threads, "kvx-worker")?;
        tracing::info!(
            context = name,
            cuda = ?cuda.as_ref().map(|c| c.primary.ordinal).map_err(String::as_str),
            nixl = nixl.is_some(),
            workers = threads,
            "context made"
        );
        let counters = Arc::new(Counters::default());
        // Device memory to and from peers (allow_gpu_rdma) may go through landing arenas in
        // device memory, placed and staged by the copy kernel.
        let device_copier = match (&cuda, config.capabilities.allow_gpu_rdma) {
            (Ok(c), true) => crate::exec::cuda::arena::KernelCopier::of(c),
            _ => None,
        };
        let control = nixl.as_ref().map(|n| {
            Control::new(
                n.agent.clone(),
                &name,
                config.peer_key.clone(),
                counters.clone(),
                device_copier,
            )
        });
        Ok(Self {
            id,
            name,
            config,
            res: Resources::new(workers, cuda, nixl),
            control,
            counters,
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
        self.res.workers.count()
    }

    /// Whether this context drives a GPU.
    pub fn has_cuda(&self) -> bool {
        self.res.cuda.is_ok()
    }

    /// The NIXL backends this context's agent created, by plugin name (empty without NIXL).
    pub fn nixl_backends(&self) -> &[&'static str] {
        self.res.nixl.as_ref().map_or(&[], |n| n.agent.backends())
    }

    /// The context's NIXL agent, for tools that measure kvxfer against raw NIXL calls.
    pub fn nixl_agent(&self) -> Option<&nixl_sys::Agent> {
        self.res.nixl.as_ref().map(|n| n.agent.agent())
    }

    /// The configured CUDA device, for tools that measure kvxfer against raw CUDA calls.
    /// SMs kvxfer's copy kernel takes per direction on the context's GPU (host -> device,
    /// device -> host, device -> device: the SM budget, `max_sms` or measured), or `None`
    /// without CUDA or the kernel.
    pub fn copy_kernel_sms(&self) -> Option<[u32; 3]> {
        self.res.cuda.as_ref().ok()?.kernel_sms()
    }

    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        self.res.cuda.as_ref().ok().map(|c| &c.primary)
    }

    /// A layout over memory kvxfer allocates and frees with it. PINNED is CUDA-pinned memory
    /// on a context with CUDA and mlock'ed memory otherwise; DEVICE is on `storage.device_id`.
    pub fn new_layout(&self, config: LayoutConfig, storage: &StorageSpec) -> Result<Layout> {
        let g = config.validate()?;
        let sizes = vec![g.allocation_len; g.allocations as usize];
        let align = u64::from(config.alignment);
        let mem = match storage.kind {
            StorageKind::System => Memory::allocate_host(storage.kind, &sizes, align)?,
            StorageKind::Pinned => Memory::allocate_pinned(self.cuda_device(), &sizes, align)?,
            StorageKind::Device => {
                let dev = self.res.cuda()?.device(storage.device_id)?;
                Memory::allocate_cuda(&dev, storage.kind, &sizes, align)?
            }
            StorageKind::Disk => self.disk_memory(&g, storage)?,
        };
        Layout::new(config, mem, self.id)
    }

    /// A disk layout's memory (`Memory::allocate_disk`): at `storage.path`, else a new file in
    /// `disk_dir`; the context's NIXL agent needs the POSIX backend to move it.
    fn disk_memory(&self, g: &Geometry, storage: &StorageSpec) -> Result<Memory> {
        let nixl = self.res.nixl("DISK storage")?;
        if !nixl.agent.backends().contains(&"POSIX") {
            bail!(
                Unavailable,
                "DISK storage needs the POSIX NIXL backend (KVX_BACKEND_POSIX in nixl_backends)"
            );
        }
        // cuFile re-opens files by name (GDS and its compat mode alike).
        Memory::allocate_disk(
            g.allocation_len,
            g.allocations,
            storage.path.as_deref(),
            &self.config.disk_dir(),
            nixl.agent.has_gds(),
        )
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
        let mem = match (storage.kind, self.cuda_device()) {
            (StorageKind::System, _) | (StorageKind::Pinned, None) => {
                Memory::caller_owned(storage.kind, 0, regions)
            }
            (StorageKind::Pinned, Some(dev)) => {
                Memory::caller_owned_cuda(dev, storage.kind, regions)?
            }
            (StorageKind::Device, _) => {
                let dev = self.res.cuda()?.device(storage.device_id)?;
                Memory::caller_owned_cuda(&dev, storage.kind, regions)?
            }
            (StorageKind::Disk, _) => bail!(
                Unavailable,
                "DISK layouts cannot be wrapped: kvx_layout_new makes one over a file \
                 (storage.path, or a new file in disk_dir)"
            ),
        };
        Layout::new(config, mem, self.id)
    }

    /// Present whenever the context has NIXL (callers asked for NIXL first).
    fn control(&self) -> Result<&Arc<Control>> {
        self.control
            .as_ref()
            .ok_or_else(|| Error::Internal("a context with NIXL has no peer control".into()))
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

    /// The bytes a peer imports: this context's NIXL agent metadata and descriptors of
    /// `layouts`, which are registered with the agent (for as long as they live) so that the
    /// peer can reach them.
    pub fn export(&self, layouts: &[&Layout]) -> Result<Vec<u8>> {
        let nixl = self.res.nixl("export")?;
        for l in layouts {
            self.check_owned(l, "exported")?;
        }
        let key = self.config.peer_key.as_ref();
        let ipc = !self.config.disable_ipc;
        peer::export(self.control()?, &nixl.agent, &self.name, layouts, key, ipc)
    }

    /// Imports a peer from the bytes it exported. The bytes are untrusted: anything malformed,
    /// truncated or foreign is `Error::Peer`. With a peer key, NIXL only sees metadata of an
    /// export made with the same key; without one, the peer's NIXL metadata is trusted once
    /// kvxfer's own checks (checksum, fields, agent name) hold.
    pub fn import(&self, data: &[u8]) -> Result<Peer> {
        let blob = PeerBlob::decode(data, self.config.peer_key.as_ref())?;
        let nixl = self.res.nixl("import")?;
        let ipc_dev = match &self.res.cuda {
            _ if self.config.disable_ipc => Err(IpcFallback::Disabled),
            Ok(c) => Ok(c.primary.clone()),
            Err(_) => Err(IpcFallback::Refused),
        };
        peer::import(
            self.control()?,
            &nixl.agent,
            &self.name,
            self.id,
            blob,
            ipc_dev,
        )
    }

    /// The planner's decision for moving blocks from `src` to `dst`.
    pub fn plan(&self, src: &Layout, dst: &Layout) -> Result<Plan> {
        self.check_owned(src, "source")?;
        self.check_owned(dst, "destination")?;
        self.plan_locations(Location::of(src), Location::of(dst))
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
        // The block ids are checked by `dispatch`, before anything is queued.
        request.validate_shape()?;
        let t =
            exec::dispatch(plan, &request, options, &self.res)?.with_layers(request.layers.clone());
        let s = t.stats();
        tracing::debug!(
            %plan,
            mechanism = ?s.mechanism,
            bytes = s.bytes,
            fragments = s.fragments,
            copies = s.copies,
            "transfer submitted"
        );
        if s.kernel_fallback {
            tracing::debug!("AUTO wanted the copy kernel, which is unavailable: copy engines run");
        }
        let (mechanism, strategy) = (s.mechanism as usize, plan.first() as usize);
        let two_hop = matches!(plan, Plan::TwoHop { .. });
        self.counters
            .submitted(mechanism, strategy, s.bytes, two_hop);
        let counters = self.counters.clone();
        t.on_error(move || counters.failed(mechanism, strategy));
        Ok(t)
    }

    /// Dequeues the oldest notification a peer sent to this context with a write:
    /// `fits(sender, message)` decides whether the caller can take it.
    pub fn next_notification<T>(
        &self,
        fits: impl FnOnce(&str, &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        self.res
            .nixl("notifications")?
            .agent
            .next_notification(fits)
    }

    /// Writes the verification pattern of `seed` into `blocks`.
    pub fn fill(&self, layout: &Layout, blocks: &[u64], seed: u64) -> Result<()> {
        self.check_owned(layout, "filled")?;
        verify::fill(layout, blocks, seed, self.worker_threads())
    }

    /// Checksums of `blocks`, one per entry.
    pub fn checksum(&self, layout: &Layout, blocks: &[u64]) -> Result<Vec<u64>> {
        self.check_owned(layout, "checksummed")?;
        verify::checksum(layout, blocks, self.worker_threads())
    }

    /// Cumulative counters since the context was made.
    pub fn stats(&self) -> ContextStats {
        self.counters.snapshot(self.res.bounce_buffers())
    }

    /// The folder unnamed disk layouts of this context go in.
    pub fn disk_dir(&self) -> PathBuf {
        self.config.disk_dir()
    }
}

// The "thread-safe" promises of the C API rest on these.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Context>();
    send_sync::<Layout>();
    send_sync::<Transfer>();
};
