//! The NIXL executor: host <-> disk through the context agent's POSIX (or GDS) backend and
//! local <-> peer through UCX. Descriptor lists come from the copy list; requests are made by
//! the submitting thread and posted and watched by one progress thread per context (`xfer.rs`).

mod submit;
pub(crate) mod xfer;

use std::sync::Arc;

pub(crate) use submit::submit;

use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::memory::UseGuard;
use crate::nixl::{Backends, NixlAgent};
use crate::transfer::Completion;
use xfer::{NixlProgress, Xfer};

/// A context's agent and the thread that posts and completes its requests.
pub(crate) struct NixlExec {
    // Dropped first: in-flight requests finish before the agent goes.
    progress: NixlProgress,
    /// Shared with the peer control thread, which outlives the context while exported layouts
    /// or peers do.
    pub(crate) agent: Arc<NixlAgent>,
    /// The agent's name: a disk transfer's "remote" agent is the agent itself.
    pub(crate) name: String,
}

impl std::fmt::Debug for NixlExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.agent.fmt(f)
    }
}

impl NixlExec {
    /// Loads NIXL if needed and makes the agent `name` with `backends` (see `NixlAgent::new`).
    pub(crate) fn new(name: &str, backends: Backends, gpu_rdma: bool) -> Result<Self> {
        let agent = Arc::new(NixlAgent::new(name, backends, gpu_rdma)?);
        Ok(Self {
            progress: NixlProgress::new(agent.agent())?,
            agent,
            name: name.to_string(),
        })
    }

    /// Hands `t` to the progress thread (see `NixlProgress::post`); `gds_batch`: cut it into
    /// pieces posted one after the other, one such transfer at a time (a device <-> disk
    /// transfer on an agent with NIXL's GDS batch backend); `use_guard`: the transfer's use of
    /// a peer's layout, held until it finished; `gate`: posted only after the work queued on a
    /// caller's stream.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post(
        &self,
        t: Xfer<'_>,
        completion: Arc<Completion>,
        error: fn(String) -> Error,
        gds_batch: bool,
        use_guard: Option<UseGuard>,
        gate: Option<Arc<StreamGate>>,
    ) -> Result<()> {
        self.progress.post(
            self.agent.agent(),
            t,
            completion,
            error,
            gds_batch,
            use_guard,
            gate,
        )
    }
}
