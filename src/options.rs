//! Plain configuration, option and statistics types: what a runtime sets and reads. They hold
//! values only; the modules that act on them check them.

use std::path::PathBuf;

use crate::error::{Error, Result, bail};
use crate::memory::{IpcFallback, StorageKind};
use crate::nixl::Backends;
use crate::peer::PeerKey;
use crate::plan::copy_list::CopyList;
use crate::plan::{Capabilities, Plan};

/// Upper bound on worker threads, so a typo cannot start thousands of threads.
pub(crate) const MAX_WORKER_THREADS: u32 = 256;

/// How a context is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextConfig {
    /// NIXL agent name; `None` generates a unique one.
    pub agent_name: Option<String>,
    /// Backends of the context's NIXL agent; empty: no NIXL (no disk, no peers).
    pub nixl_backends: Backends,
    /// CUDA device to bind, or -1 for none.
    pub cuda_device: i32,
    pub capabilities: Capabilities,
    /// Folder for unnamed disk layouts; `None` is the system's temporary folder.
    pub disk_dir: Option<PathBuf>,
    /// Worker threads for host copies; 0 picks the number of CPUs.
    pub worker_threads: u32,
    /// The deployment's secret: exports are authenticated with it, and imports refuse any
    /// export not made with the same one. `None`: peers' NIXL metadata is trusted.
    pub peer_key: Option<PeerKey>,
    /// SM budget of kvxfer's copy kernel; 0 = auto: host <-> device takes the fewest SMs that
    /// reach the link (measured), device <-> device one full wave. Any other value is every direction's budget.
    pub max_sms: u32,
    /// Same-host peers' device memory is reached through NIXL even where CUDA IPC could map
    /// it (and this context's device layouts are exported without IPC handles).
    pub disable_ipc: bool,
}

impl ContextConfig {
    /// The folder for unnamed disk layouts.
    pub fn disk_dir(&self) -> PathBuf {
        self.disk_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            agent_name: None,
            nixl_backends: Backends::UCX | Backends::POSIX,
            cuda_device: 0,
            capabilities: Capabilities::default(),
            disk_dir: None,
            worker_threads: 0,
            peer_key: None,
            max_sms: 0,
            disable_ipc: false,
        }
    }
}

/// How the CUDA executor may move bytes (host transfers ignore it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// The SM kernel for small fragments and device-to-device work, copy engines otherwise.
    #[default]
    Auto,
    /// The GPU's DMA engines only: no SM is used.
    CopyEngine,
    /// kvxfer's SM copy kernel.
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

/// What moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// CPU copies on the context's worker threads.
    Memcpy = 0,
    /// The GPU's copy engines (`cuMemcpyBatchAsync`, `cuMemcpyAsync` or a blocking copy).
    CopyEngine = 1,
    /// kvxfer's SM gather/scatter kernel.
    Kernel = 2,
    /// A NIXL transfer (disk or remote).
    Nixl = 3,
    /// kvxfer's kernel (or the copy engines) over a same-host peer's device memory mapped
    /// through CUDA IPC.
    Ipc = 4,
}

/// What a transfer moves, known when it is submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    /// Bytes moved (source to destination, counted once).
    pub bytes: u64,
    /// (block, layer, outer) pieces requested.
    pub fragments: u64,
    /// Copies issued after coalescing.
    pub copies: u64,
    pub plan: Plan,
    pub mechanism: Mechanism,
    /// AUTO wanted the SM kernel, but it could not be built or loaded: copy engines ran.
    pub kernel_fallback: bool,
    /// The bytes went through the context's pinned bounce pool (pageable host memory <->
    /// device, device <-> disk, disk <-> disk).
    pub bounced: bool,
    /// SMs the copy kernel ran on (its blocks, at most the GPU's SMs); 0 without the kernel.
    pub sms: u32,
    /// A transfer between device memory here and a same-host peer's that went through NIXL:
    /// why CUDA IPC did not move it. `None` for every other transfer.
    pub ipc_fallback: Option<IpcFallback>,
    /// Submit to completion; 0 while the transfer is pending.
    pub elapsed_ns: u64,
}

impl TransferStats {
    /// The stats of a transfer of `list` by `mechanism`, pending: no fallback, no bounce.
    pub(crate) fn of(list: &CopyList, plan: Plan, mechanism: Mechanism) -> Self {
        Self {
            bytes: list.bytes,
            fragments: list.fragments,
            copies: list.copies.len() as u64,
            plan,
            mechanism,
            kernel_fallback: false,
            bounced: false,
            ipc_fallback: None,
            sms: 0,
            elapsed_ns: 0,
        }
    }
}

/// Transfers, bytes and failures of one kind, since the context was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Transfers submitted.
    pub transfers: u64,
    /// Bytes they move.
    pub bytes: u64,
    /// Transfers that failed after they were submitted.
    pub errors: u64,
}

/// A context's cumulative counters, for a runtime's metrics system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextStats {
    /// By what moved the bytes, indexed by `Mechanism as usize`.
    pub by_mechanism: [Counter; 5],
    /// By the plan's first strategy, indexed by `Strategy as usize`.
    pub by_strategy: [Counter; 11],
    /// Two-hop transfers through the pinned bounce pool, and their bytes.
    pub bounce_transfers: u64,
    pub bounce_bytes: u64,
    /// Pinned bounce buffers the pool holds (made on first use, two per pair, at most four).
    pub bounce_buffers: u64,
    /// Peers imported, in total.
    pub peers_imported: u64,
    /// Layouts exported (each once, however often it is exported).
    pub layouts_exported: u64,
    /// Exported layouts revoked at their importers when freed.
    pub revocations: u64,
    /// Importers that did not acknowledge a revocation in time (taken for dead).
    pub importers_lost: u64,
}
