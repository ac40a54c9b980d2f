//! `kvx_context`: configuration, creation and release.

use std::ffi::{CStr, c_char};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::boundary::{deref, fail, flag, null_argument, opt_str, slice, write_out};
use super::status::KVX_STATUS_OK;
use crate::context::Context;
use crate::error::Error;
use crate::nixl::Backends;
use crate::options::{ContextConfig, Counter};
use crate::peer::PeerKey;
use crate::plan::Capabilities;

const _: () = assert!(
    KVX_BACKEND_UCX == Backends::UCX.bits()
        && KVX_BACKEND_POSIX == Backends::POSIX.bits()
        && KVX_BACKEND_GDS == Backends::GDS.bits()
        && KVX_BACKEND_GDS_MT == Backends::GDS_MT.bits()
);

/// NIXL backend bit: UCX (remote peers).
pub const KVX_BACKEND_UCX: u32 = 1;
/// NIXL backend bit: POSIX files (disk tier).
pub const KVX_BACKEND_POSIX: u32 = 2;
/// NIXL backend bit: GPUDirect Storage.
pub const KVX_BACKEND_GDS: u32 = 4;
/// NIXL backend bit: GPUDirect Storage, multi-threaded.
pub const KVX_BACKEND_GDS_MT: u32 = 8;

/// Context configuration. Always start from kvx_context_config_init(), then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_context_config {
    /// NIXL agent name (copied); NULL generates a unique one.
    pub agent_name: *const c_char,
    /// KVX_BACKEND_* bits; default UCX | POSIX. Any bit makes the context load NIXL and create a
    /// NIXL agent with those backends; 0 needs no NIXL (host and GPU tiers only).
    pub nixl_backends: u32,
    /// CUDA device ordinal to bind, or -1 for none; default 0. With a driver, an ordinal the
    /// driver does not list is INVALID_ARGUMENT. On a machine without an NVIDIA driver or device
    /// any ordinal >= 0 makes the context without CUDA (DEVICE storage is then UNAVAILABLE), as
    /// -1 does everywhere.
    pub cuda_device: i32,
    /// 1 allows Device <-> Disk directly through GPUDirect Storage; default 0. With NIXL
    /// backends it needs KVX_BACKEND_GDS or KVX_BACKEND_GDS_MT among them (else the context is
    /// refused), that backend needs cuFile, and cuFile must take a probe file in disk_dir
    /// (else the context is UNAVAILABLE, kvx_last_error() saying why).
    pub allow_gds: u8,
    /// 1 allows Device <-> Remote through GPU RDMA; default 0. With it, NIXL's UCX backend
    /// runs four dedicated worker threads and UCX's cuda_ipc GET (see the README).
    pub allow_gpu_rdma: u8,
    /// Folder for unnamed disk layouts (copied); NULL uses the temporary folder.
    pub disk_dir: *const c_char,
    /// Worker threads for host copies; 0 picks the number of CPUs; at most 256.
    pub worker_threads: u32,
    /// The deployment's shared secret (0.2; copied), at least 16 bytes, or NULL with
    /// peer_key_len 0 (the default). With it, kvx_context_export() authenticates the blob with
    /// a keyed MAC (BLAKE3) over all its bytes, and kvx_context_import() refuses any blob not
    /// made with the same secret (KVX_STATUS_PEER) before NIXL sees a byte of it. Without it,
    /// the peer's NIXL metadata is trusted: kvxfer checks what it can (checksum, every field,
    /// the agent name), but UCX parses the addresses inside, and forged metadata can crash
    /// the importing process there. Give every context of a deployment the same secret.
    pub peer_key: *const u8,
    /// Bytes at peer_key; 0 without a key.
    pub peer_key_len: usize,
    /// SM budget of kvxfer's copy kernel (0.2); 0 (the default) = auto: host <-> device
    /// takes the fewest SMs that reach the link (measured once per process and GPU, a few
    /// milliseconds at the first context), device <-> device one full wave. Any other value
    /// is the budget of every direction (more than the GPU has means all of them). The kernel's streams
    /// run at the highest stream priority, so its few blocks are scheduled as soon as an SM
    /// has room. kvx_transfer_stats.sms says how many SMs a transfer used.
    pub max_sms: u32,
    /// 1 keeps same-host peers on NIXL (0.2); default 0: transfers between device memory of
    /// this context and a same-host peer's device memory map the peer's allocations through
    /// CUDA IPC and run kvxfer's kernel (KVX_MECHANISM_IPC). With 1, this context's exports
    /// carry no IPC handles and its imports never map a peer's memory
    /// (kvx_transfer_ipc_fallback says KVX_IPC_FALLBACK_DISABLED).
    pub disable_ipc: u8,
}

/// A context: capabilities, worker threads, the CUDA device (its primary context, one stream per
/// copy direction, the copy kernel) and the NIXL agent with its backends. Thread-safe: any
/// number of threads may use one context at once. Layouts and transfers made from it stay valid
/// after kvx_context_free(); freeing the context waits for the work already submitted on it.
pub struct kvx_context {
    pub(crate) inner: Context,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<kvx_context>()
};

/// Writes the defaults into *config. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_context_config_init(config: *mut kvx_context_config) {
    ffi_boundary! {
        if config.is_null() {
            return;
        }
        let d = ContextConfig::default();
        let c = kvx_context_config {
            agent_name: std::ptr::null(),
            nixl_backends: d.nixl_backends.bits(),
            cuda_device: d.cuda_device,
            allow_gds: 0,
            allow_gpu_rdma: 0,
            disk_dir: std::ptr::null(),
            worker_threads: 0,
            peer_key: std::ptr::null(),
            peer_key_len: 0,
            max_sms: d.max_sms,
            disable_ipc: u8::from(d.disable_ipc),
        };
        // SAFETY: non-NULL checked; the caller passes a writable struct.
        unsafe { write_out(config, c) }
    }
}

/// Creates a context. On KVX_STATUS_OK *context_out owns a new context, released with
/// kvx_context_free(). On error *context_out is untouched.
/// Errors: NULL_ARGUMENT (also peer_key NULL with peer_key_len > 0), INVALID_ARGUMENT (a
/// peer_key shorter than 16 bytes, unknown backend bits, cuda_device < -1 or an ordinal the
/// driver does not list where there is a driver, flags other than 0/1, empty or non-UTF-8
/// agent_name, too many threads), UNAVAILABLE (nixl_backends asks for NIXL but it cannot be loaded, with how to
/// install it in kvx_last_error(); or a backend cannot be created, named there), NIXL, CUDA,
/// OUT_OF_MEMORY.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_context_new(
    config: *const kvx_context_config,
    context_out: *mut *mut kvx_context,
) -> i32 {
    ffi_boundary! {
        crate::log::install();
        // SAFETY: the caller passes a valid config or NULL.
        let c = try_status!(unsafe { deref(config, "config") });
        if context_out.is_null() {
            return null_argument("context_out");
        }
        // SAFETY: a non-NULL agent_name is a NUL-terminated string (the config's contract).
        let agent_name = try_status!(unsafe { opt_str(c.agent_name, "agent_name") });
        let disk_dir = if c.disk_dir.is_null() {
            None
        } else {
            // SAFETY: a non-NULL disk_dir is a NUL-terminated string (the config's contract).
            let bytes = unsafe { CStr::from_ptr(c.disk_dir) }.to_bytes();
            Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
        };
        let Some(nixl_backends) = Backends::from_bits(c.nixl_backends) else {
            return fail(Error::InvalidArgument(format!(
                "unknown NIXL backend bits {:#x} (known: UCX=1, POSIX=2, GDS=4, GDS_MT=8)",
                c.nixl_backends & !Backends::all().bits()
            )));
        };
        // SAFETY: peer_key holds peer_key_len bytes (the config's contract).
        let secret = try_status!(unsafe { slice(c.peer_key, c.peer_key_len, "peer_key") });
        let peer_key = match (c.peer_key.is_null(), secret) {
            (true, _) => None,
            (false, s) => Some(try_core!(PeerKey::new(s))),
        };
        let config = ContextConfig {
            agent_name,
            peer_key,
            nixl_backends,
            cuda_device: c.cuda_device,
            capabilities: Capabilities {
                allow_gds: try_status!(flag(c.allow_gds, "allow_gds")),
                allow_gpu_rdma: try_status!(flag(c.allow_gpu_rdma, "allow_gpu_rdma")),
            },
            disk_dir,
            worker_threads: c.worker_threads,
            max_sms: c.max_sms,
            disable_ipc: try_status!(flag(c.disable_ipc, "disable_ipc")),
        };
        let inner = try_core!(Context::new(config));
        let handle = Box::into_raw(Box::new(kvx_context { inner }));
        // SAFETY: context_out checked non-NULL above.
        unsafe { write_out(context_out, handle) };
        KVX_STATUS_OK
    }
}

/// Releases a context after the host copies submitted on it have finished. NULL is a no-op.
/// Layouts and transfers made from it stay valid. Freeing twice is undefined behaviour.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_context_free(context: *mut kvx_context) {
    ffi_boundary! {
        if !context.is_null() {
            // SAFETY: a non-NULL pointer came from kvx_context_new and is freed once.
            drop(unsafe { Box::from_raw(context) });
        }
    }
}

/// Transfers, bytes and failures of one kind since the context was made.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct kvx_counter {
    /// Transfers submitted.
    pub transfers: u64,
    /// Bytes they move.
    pub bytes: u64,
    /// Transfers that failed after they were submitted (refused submits are not counted).
    pub errors: u64,
}

/// A context's cumulative counters, for a runtime's metrics system (kvx_context_get_stats).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct kvx_context_stats {
    /// By what moved the bytes, indexed by KVX_MECHANISM_* (0.2: five, with IPC).
    pub by_mechanism: [kvx_counter; 5],
    /// By the plan's first strategy, indexed by KVX_STRATEGY_* (KVX_STRATEGY_INVALID stays 0).
    pub by_strategy: [kvx_counter; 11],
    /// Two-hop transfers through the pinned bounce pool, and their bytes.
    pub bounce_transfers: u64,
    pub bounce_bytes: u64,
    /// Pinned bounce buffers the pool holds (made on first use, two per pair, at most four).
    pub bounce_buffers: u64,
    /// Peers imported, in total.
    pub peers_imported: u64,
    /// Layouts exported (each once, however often).
    pub layouts_exported: u64,
    /// Exported layouts revoked at their importers when freed.
    pub revocations: u64,
    /// Importers that did not acknowledge a revocation within 5 s (taken for dead).
    pub importers_lost: u64,
}

fn counter(c: Counter) -> kvx_counter {
    kvx_counter {
        transfers: c.transfers,
        bytes: c.bytes,
        errors: c.errors,
    }
}

/// Writes the context's cumulative counters into *stats_out. Thread-safe; cheap (a few atomic
/// loads). Errors: NULL_ARGUMENT.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_context_get_stats(
    context: *const kvx_context,
    stats_out: *mut kvx_context_stats,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid context or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        if stats_out.is_null() {
            return null_argument("stats_out");
        }
        let s = ctx.inner.stats();
        let out = kvx_context_stats {
            by_mechanism: s.by_mechanism.map(counter),
            by_strategy: s.by_strategy.map(counter),
            bounce_transfers: s.bounce_transfers,
            bounce_bytes: s.bounce_bytes,
            bounce_buffers: s.bounce_buffers,
            peers_imported: s.peers_imported,
            layouts_exported: s.layouts_exported,
            revocations: s.revocations,
            importers_lost: s.importers_lost,
        };
        // SAFETY: stats_out checked non-NULL above.
        unsafe { write_out(stats_out, out) };
        KVX_STATUS_OK
    }
}
