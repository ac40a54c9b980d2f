//! A context's NIXL agent and its backends.

use std::collections::VecDeque;
use std::sync::Mutex;

use nixl_sys::{Agent, AgentConfig, Backend, MemType, MemoryRegion, NixlDescriptor, OptArgs};

use super::{Backends, loader};
use crate::error::{Error, Result, bail};

/// The first bytes of kvxfer's own notifications (peer control messages); a runtime's
/// notifications never start with them (kvx_transfer_submit refuses such a notify_msg).
pub(crate) const CONTROL_PREFIX: &[u8] = b"\0kvxfer-control\0";

/// Fallback wake-up of NIXL's progress thread, whose wake-ups are otherwise event driven.
/// Each wake-up costs: an idle context with a NIXL agent used ~3% of a core with 1 ms (build
/// machine, 5 s idle), ~1.5% with 20 ms, transfers over TCP and shared memory as fast and
/// every NIXL test passing. Agents that move device memory (GPU RDMA) keep 1 ms until it is
/// measured on a GPU: UCX's CUDA transports may finish copies only when progressed.
const PROGRESS_TIMEOUT_US: u64 = 20_000;
const PROGRESS_TIMEOUT_GPU_US: u64 = 1000;

pub(crate) struct NixlAgent {
    agent: Agent,
    backends: Vec<&'static str>,
    /// Handles of the backends, by plugin name, for registrations that must leave some out.
    handles: Vec<(&'static str, Backend)>,
    /// Notifications fetched from NIXL and not yet handed out: (sender agent, message).
    notifications: Mutex<VecDeque<(String, Vec<u8>)>>,
    /// kvxfer's own messages among them (CONTROL_PREFIX), for the peer control thread.
    control: Mutex<VecDeque<(String, Vec<u8>)>>,
    /// Peers' agents loaded into this one, counted per name.
    remotes: super::remote::RemoteCounts,
}

impl std::fmt::Debug for NixlAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixlAgent")
            .field("name", &self.agent.name())
            .field("backends", &self.backends)
            .finish()
    }
}

/// NIXL UCX backend parameters of a context with `allow_gpu_rdma`, measured between two
/// processes on one H100 without NVLink, layer-separate layouts, 4, 16 and 64 KiB pieces
/// (docs/BENCHMARKS.md, "Two GPUs, GPU RDMA between processes, GDS, two-hop again"):
/// - `engine_config` (UCX settings): UCX turns cuda_ipc's GET off where it sees no NVLink, so
///   reads of another process's device memory fell to software emulation over TCP: 0.24-0.52
///   GB/s. With GET on: 0.46 / 1.85 / 7.1 GB/s. A `UCX_CUDA_IPC_ENABLE_GET_ZCOPY` in the
///   environment still wins.
/// - `num_threads`: four dedicated worker threads split each descriptor list (NIXL's thread
///   pool engine; one more worker stays shared). cuda_ipc costs ~8 us per fragment on one
///   thread; with four, 4 KiB went 0.47 -> 1.33 GB/s and 16 KiB 1.86 -> 5.4 (8 threads: 1.66
///   and 5.3).
const UCX_GPU_RDMA_PARAMS: &[(&str, &str)] = &[
    ("engine_config", "CUDA_IPC_ENABLE_GET_ZCOPY=y"),
    ("num_threads", "4"),
    ("num_workers", "5"),
];

/// `KVX_UCX_PARAMS="key=value,..."`: parameters of NIXL's UCX backend over its defaults (for
/// example `num_threads=4,num_workers=5`, which splits large descriptor lists over dedicated
/// worker threads). A malformed value is an error, not ignored.
fn ucx_params_from_env() -> Result<Vec<(String, String)>> {
    let Some(v) = std::env::var_os("KVX_UCX_PARAMS") else {
        return Ok(Vec::new());
    };
    let Some(v) = v.to_str() else {
        bail!(InvalidArgument, "KVX_UCX_PARAMS is not UTF-8");
    };
    parse_ucx_params(v)
}

fn parse_ucx_params(v: &str) -> Result<Vec<(String, String)>> {
    v.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Error::InvalidArgument(format!(
                "KVX_UCX_PARAMS: {kv:?} is not key=value"
            ))),
        })
        .collect()
}

impl NixlAgent {
    /// Loads NIXL if needed, then makes an agent named `name` with the backends in `bits`. The
    /// agent runs its own progress thread, so transfers progress without kvxfer polling. With
    /// `gpu_rdma`, the UCX backend is set up for device memory (`UCX_GPU_RDMA_PARAMS`).
    pub(crate) fn new(name: &str, bits: Backends, gpu_rdma: bool) -> Result<Self> {
        loader::load()?;
        let config = AgentConfig {
            enable_prog_thread: true,
            // NIXL's UCX progress thread waits in poll() on the workers' event fds with this
            // as its timeout (rounded up to whole ms). The default, 0, makes it spin: once a
            // peer is connected every context burns a core, and on a small machine the disk
            // requests kvxfer polls ran 5-9x slower behind it. Events still wake it at once.
            pthr_delay_us: if gpu_rdma {
                PROGRESS_TIMEOUT_GPU_US
            } else {
                PROGRESS_TIMEOUT_US
            },
            ..AgentConfig::default()
        };
        if bits.is_empty() {
            bail!(InvalidArgument, "a NIXL agent needs at least one backend");
        }
        let mut ucx_overrides: Vec<(String, String)> = Vec::new();
        if gpu_rdma {
            ucx_overrides.extend(
                UCX_GPU_RDMA_PARAMS
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        }
        // Later entries win: the environment's over kvxfer's.
        ucx_overrides.extend(ucx_params_from_env()?);
        let agent = Agent::new_configured(name, &config)
            .map_err(|e| Error::Nixl(format!("cannot create NIXL agent {name:?}: {e}")))?;
        let mut backends = Vec::new();
        let mut handles = Vec::new();
        for (bit, plugin) in Backends::PLUGINS {
            if !bits.contains(bit) {
                continue;
            }
            let created = agent
                .get_plugin_params(plugin)
                .and_then(|(_mems, mut params)| {
                    if plugin == "UCX" {
                        for (k, v) in &ucx_overrides {
                            params.set(k, v)?;
                        }
                    }
                    agent.create_backend(plugin, &params)
                });
            match created {
                Ok(b) => handles.push((plugin, b)),
                Err(e) => {
                    return Err(Error::Unavailable(format!(
                        "NIXL backend {plugin} could not be created ({e}); leave its bit out \
                         of nixl_backends if this machine does not support it"
                    )));
                }
            }
            backends.push(plugin);
        }
        tracing::info!(agent = name, ?backends, gpu_rdma, "NIXL agent made");
        Ok(Self {
            agent,
            backends,
            handles,
            notifications: Mutex::default(),
            control: Mutex::default(),
            remotes: Default::default(),
        })
    }

    /// Registration arguments that name the GDS and GDS_MT backends alone.
    pub(crate) fn gds_args(&self) -> Result<OptArgs> {
        self.args_of(|name| name.starts_with("GDS"))
    }

    fn args_of(&self, pick: impl Fn(&str) -> bool) -> Result<OptArgs> {
        let nixl = |e: nixl_sys::NixlError| Error::Nixl(format!("NIXL registration: {e}"));
        let mut args = OptArgs::new().map_err(nixl)?;
        for (_, b) in self.handles.iter().filter(|(n, _)| pick(n)) {
            args.add_backend(b).map_err(nixl)?;
        }
        Ok(args)
    }

    /// Whether a GDS or GDS_MT backend was created.
    pub fn has_gds(&self) -> bool {
        self.handles.iter().any(|(n, _)| n.starts_with("GDS"))
    }

    /// Registration arguments for a disk file's buffered descriptor when this agent has a GDS
    /// backend: every backend but GDS and GDS_MT. cuFile accepts only O_DIRECT descriptors
    /// (`cuFileHandleRegister`: unsupported file open flags; docs/BENCHMARKS.md,
    /// "Two GPUs, GPU RDMA between processes, GDS, two-hop again"), so GDS gets the
    /// file through its O_DIRECT descriptor alone. `None`: register with every backend.
    pub fn buffered_file_args(&self) -> Result<Option<OptArgs>> {
        if !self.has_gds() {
            return Ok(None);
        }
        self.args_of(|name| !name.starts_with("GDS")).map(Some)
    }

    /// Whether a UCX backend was created (peers; landing arenas).
    pub fn has_ucx(&self) -> bool {
        self.handles.iter().any(|(n, _)| *n == "UCX")
    }

    /// Queues a notification from `sender` as if NIXL had delivered it: a peer's write that
    /// kvxfer scattered here itself ends with the notification it carried, after its bytes.
    pub(crate) fn deliver(&self, sender: &str, msg: Vec<u8>) {
        self.notifications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((sender.to_string(), msg));
    }

    /// Whether NIXL's GDS (batch) backend was created; GDS_MT needs no batching.
    pub fn has_gds_batch(&self) -> bool {
        self.handles.iter().any(|(n, _)| *n == "GDS")
    }

    /// Moves what NIXL received into the two queues: kvxfer's own messages (CONTROL_PREFIX)
    /// and the runtime's notifications.
    fn fetch(&self, user: &mut VecDeque<(String, Vec<u8>)>) -> Result<()> {
        let nixl = |e: nixl_sys::NixlError| Error::Nixl(format!("NIXL notifications: {e}"));
        let mut map = nixl_sys::NotificationMap::new().map_err(nixl)?;
        self.agent.get_notifications(&mut map, None).map_err(nixl)?;
        let senders: Vec<String> = map
            .agents()
            .filter_map(|a| a.ok())
            .map(str::to_string)
            .collect();
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        for sender in senders {
            let n = map.get_notifications_size(&sender).unwrap_or(0);
            for i in 0..n {
                if let Ok(msg) = map.get_notification_bytes(&sender, i) {
                    if msg.starts_with(CONTROL_PREFIX) {
                        control.push_back((sender.clone(), msg));
                    } else {
                        user.push_back((sender.clone(), msg));
                    }
                }
            }
        }
        Ok(())
    }

    /// The oldest notification a peer sent to this agent with a write, if `fits(sender,
    /// message)` accepts it (the caller's buffers are large enough); it is dequeued only then.
    /// kvxfer's own control messages are never handed out here.
    pub fn next_notification<T>(
        &self,
        fits: impl FnOnce(&str, &[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut queue = self.notifications.lock().unwrap_or_else(|p| p.into_inner());
        if queue.is_empty() {
            self.fetch(&mut queue)?;
        }
        let Some((sender, msg)) = queue.front() else {
            return Ok(None);
        };
        let out = fits(sender, msg)?;
        queue.pop_front();
        Ok(Some(out))
    }

    /// kvxfer's control messages received so far: (sender agent, message).
    pub(crate) fn take_control(&self) -> Result<Vec<(String, Vec<u8>)>> {
        {
            let mut queue = self.notifications.lock().unwrap_or_else(|p| p.into_inner());
            self.fetch(&mut queue)?;
        }
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        Ok(control.drain(..).collect())
    }

    /// Sends `msg` to the agent `to`, whose metadata is loaded. An agent no peer handle holds
    /// any more (its metadata invalidated) is refused here: NIXL would log an error for it.
    pub(crate) fn send(&self, to: &str, msg: &[u8]) -> Result<()> {
        let loaded = self
            .remotes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .is_some_and(|&n| n > 0);
        if !loaded && self.agent.name() != to {
            bail!(Peer, "no metadata of agent {to:?} is loaded any more");
        }
        self.agent
            .send_notification(to, msg, None)
            .map_err(|e| Error::Peer(format!("NIXL could not notify {to:?}: {e}")))
    }

    /// Loads a peer's metadata, which must name `expected` (see `RemoteAgent::load`).
    pub(crate) fn load_remote(&self, md: &[u8], expected: &str) -> Result<super::RemoteAgent> {
        super::RemoteAgent::load(&self.agent, &self.remotes, md, expected)
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The backends this agent created, by NIXL plugin name.
    pub fn backends(&self) -> &[&'static str] {
        &self.backends
    }
}

/// One span of memory (a host or device address, or a file offset) as NIXL registers it.
#[derive(Debug)]
pub(crate) struct NixlRegion {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) mem: MemType,
    /// The device ordinal, or a file's descriptor.
    pub(crate) device: u64,
}

impl MemoryRegion for NixlRegion {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.addr as *const u8
    }

    fn size(&self) -> usize {
        self.len as usize
    }
}

impl NixlDescriptor for NixlRegion {
    fn mem_type(&self) -> MemType {
        self.mem
    }

    fn device_id(&self) -> u64 {
        self.device
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ucx_params;

    #[test]
    fn ucx_params_are_key_value_pairs_split_at_the_first_equals_sign() {
        let p = parse_ucx_params("num_threads=8,engine_config=CUDA_IPC_ENABLE_GET_ZCOPY=n,,x=")
            .unwrap();
        let want = [
            ("num_threads", "8"),
            ("engine_config", "CUDA_IPC_ENABLE_GET_ZCOPY=n"),
            ("x", ""),
        ];
        assert_eq!(
            p,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
        assert!(parse_ucx_params("num_threads").is_err());
        assert!(parse_ucx_params("=4").is_err());
        assert_eq!(parse_ucx_params("").unwrap(), Vec::new());
    }
}
