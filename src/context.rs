//! The context: capabilities, worker threads, and the operations a runtime calls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result, bail};
use crate::exec::{memcpy, workers::Workers};
use crate::layout::{Layout, LayoutConfig};
use crate::memory::{Memory, Region, StorageKind};
use crate::plan::{Capabilities, Location, Plan, Request, Strategy, copy_list, select};
use crate::transfer::{Completion, Transfer, TransferStats};
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

/// What moves blocks. Thread-safe: every method takes `&self`.
#[derive(Debug)]
pub struct Context {
    id: u64,
    name: String,
    config: ContextConfig,
    workers: Workers,
}

fn unavailable_storage(kind: StorageKind) -> Error {
    match kind {
        StorageKind::Device => Error::Unavailable(
            "DEVICE storage is not available: this version of kvxfer has no CUDA support \
             (GPU tiers are not built yet)"
                .into(),
        ),
        _ => Error::Unavailable(
            "DISK storage is not available: this version of kvxfer has no NIXL support \
             (disk and remote tiers are not built yet)"
                .into(),
        ),
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
        let threads = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(4, |n| n.get()),
            n => n as usize,
        };
        let id = NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = config
            .agent_name
            .clone()
            .unwrap_or_else(|| format!("kvxfer-{}-{id}", std::process::id()));
        let workers = Workers::new(threads, "kvx-worker")?;
        Ok(Self {
            id,
            name,
            config,
            workers,
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

    /// Whether this context drives a GPU. Not in this version.
    pub fn has_cuda(&self) -> bool {
        false
    }

    /// A layout over memory kvxfer allocates and frees with it.
    pub fn new_layout(&self, config: LayoutConfig, storage: &StorageSpec) -> Result<Layout> {
        let g = config.validate()?;
        match storage.kind {
            StorageKind::System | StorageKind::Pinned => {
                let sizes = vec![g.allocation_len; g.allocations as usize];
                let mem = Memory::allocate_host(storage.kind, &sizes, u64::from(config.alignment))?;
                Layout::new(config, mem, self.id)
            }
            kind => Err(unavailable_storage(kind)),
        }
    }

    /// A layout over memory the caller owns: one region for fully contiguous, one per layer
    /// for layer-separate. kvxfer never frees it.
    pub fn wrap_layout(
        &self,
        config: LayoutConfig,
        storage: &StorageSpec,
        regions: &[Region],
    ) -> Result<Layout> {
        config.validate()?;
        match storage.kind {
            StorageKind::System | StorageKind::Pinned => {
                let mem = Memory::caller_owned(storage.kind, 0, regions.to_vec());
                Layout::new(config, mem, self.id)
            }
            kind => Err(unavailable_storage(kind)),
        }
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
        Location::local(layout.storage_kind())
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
        if options.cuda_stream.is_some() && !self.has_cuda() {
            bail!(
                Unavailable,
                "cuda_stream was given but this context has no CUDA support"
            );
        }
        if options.notify.is_some() {
            bail!(
                InvalidArgument,
                "notify_msg applies only to writes to a remote peer; this transfer is local"
            );
        }
        match plan {
            Plan::Direct(Strategy::Memcpy) => Ok(self.submit_memcpy(&request, plan)),
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

    fn submit_memcpy(&self, request: &Request<'_>, plan: Plan) -> Transfer {
        let list = request.build();
        let shares = memcpy::split(&list.copies, self.workers.count());
        let stats = TransferStats {
            bytes: list.bytes,
            fragments: list.fragments,
            copies: list.copies.len() as u64,
            plan,
            elapsed_ns: 0,
        };
        let streaming = list.bytes >= memcpy::STREAMING_MIN_BYTES;
        let completion = Completion::new(shares.len());
        for share in shares {
            let completion = completion.clone();
            // The job owns both memories, so freeing a layout cannot release them under it.
            let keep = (request.src.memory().clone(), request.dst.memory().clone());
            self.workers.spawn(Box::new(move || {
                let result = std::panic::catch_unwind(|| {
                    // SAFETY: the request was validated: every range lies in host memory that
                    // `keep` holds alive, and no destination overlaps a source or another
                    // destination.
                    unsafe { memcpy::copy_all(&share, streaming) }
                })
                .map_err(|_| Error::Internal("a copy worker panicked".into()));
                drop(keep);
                completion.part_done(result);
            }));
        }
        Transfer::new(completion, stats)
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
