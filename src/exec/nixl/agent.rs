//! A context's NIXL agent and its backends.

use nixl_sys::{Agent, AgentConfig};

use super::loader;
use super::xfer::{HostDisk, NixlProgress};
use crate::context::backend;
use crate::error::{Error, Result};
use crate::transfer::Completion;
use std::sync::Arc;

/// NIXL plugin names by kvxfer backend bit.
const PLUGINS: [(u32, &str); 4] = [
    (backend::UCX, "UCX"),
    (backend::POSIX, "POSIX"),
    (backend::GDS, "GDS"),
    (backend::GDS_MT, "GDS_MT"),
];

pub struct NixlAgent {
    // Dropped first: in-flight requests finish before the agent goes.
    progress: NixlProgress,
    agent: Agent,
    backends: Vec<&'static str>,
}

impl std::fmt::Debug for NixlAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixlAgent")
            .field("name", &self.agent.name())
            .field("backends", &self.backends)
            .finish()
    }
}

impl NixlAgent {
    /// Loads NIXL if needed, then makes an agent named `name` with the backends in `bits`. The
    /// agent runs its own progress thread, so transfers progress without kvxfer polling.
    pub fn new(name: &str, bits: u32) -> Result<Self> {
        loader::load()?;
        let config = AgentConfig {
            enable_prog_thread: true,
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(name, &config)
            .map_err(|e| Error::Nixl(format!("cannot create NIXL agent {name:?}: {e}")))?;
        let mut backends = Vec::new();
        for (bit, plugin) in PLUGINS {
            if bits & bit == 0 {
                continue;
            }
            let created = agent
                .get_plugin_params(plugin)
                .and_then(|(_mems, params)| agent.create_backend(plugin, &params));
            if let Err(e) = created {
                return Err(Error::Unavailable(format!(
                    "NIXL backend {plugin} could not be created ({e}); leave its bit out of \
                     nixl_backends if this machine does not support it"
                )));
            }
            backends.push(plugin);
        }
        Ok(Self {
            progress: NixlProgress::new(&agent)?,
            agent,
            backends,
        })
    }

    pub fn name(&self) -> String {
        self.agent.name()
    }

    /// Posts a host ↔ disk transfer whose completion NIXL's progress thread reports.
    pub(crate) fn post_host_disk(
        &self,
        t: HostDisk<'_>,
        completion: Arc<Completion>,
    ) -> Result<()> {
        self.progress.post_host_disk(&self.agent, t, completion)
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The backends this agent created, by NIXL plugin name.
    pub fn backends(&self) -> &[&'static str] {
        &self.backends
    }
}
