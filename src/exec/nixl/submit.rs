//! Starting one NIXL transfer: host <-> disk on this agent, or local <-> a peer's layout.

use std::sync::Arc;

use super::NixlExec;
use super::xfer::{Xfer, direct_fd};
use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::memory::StorageKind;
use crate::options::{Mechanism, TransferStats};
use crate::plan::{CopyOp, Plan, Request, copy_list};
use crate::transfer::{Completion, Transfer};

/// Host <-> disk (this agent's POSIX backend) and local <-> peer (UCX) through the context's
/// NIXL agent: `write` when the local side is the source (the seed's NixlWrite), else the local
/// side is the destination (NixlReadFlipped, and NixlRead, the GDS plan disk -> device).
/// `gate`: the request is posted only after the work queued on a caller's stream (the
/// progress thread checks it without blocking).
pub(crate) fn submit(
    nixl: &NixlExec,
    request: &Request<'_>,
    plan: Plan,
    write: bool,
    notify: Option<&[u8]>,
    cuda_context: bool,
    gate: Option<Arc<StreamGate>>,
) -> Result<Transfer> {
    let agent = &nixl.agent;
    let (local, remote) = if write {
        (request.src, request.dst)
    } else {
        (request.dst, request.src)
    };
    let (remote_agent, error): (&str, fn(String) -> Error) = match remote.peer() {
        Some(peer) => (peer, Error::Peer),
        None => (&nixl.name, Error::Io),
    };
    // A peer's layout is used until the peer revokes it; after that nothing is sent to it.
    let use_guard = remote.memory().begin_remote_use()?;
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
    // NIXL's descriptors go (local, remote): a read is described from its destination.
    let mut copies: Vec<CopyOp> = if write {
        list.copies.clone()
    } else {
        list.copies.iter().map(|c| c.flipped()).collect()
    };
    if !remote.is_remote() {
        // A file: ascending offsets let the block layer merge and the disk read ahead.
        copy_list::sort_by_dst(&mut copies);
    }
    let remote_fd = if remote.is_remote() {
        None
    } else {
        let fd = direct_fd(remote.memory(), &copies);
        tracing::debug!(
            "disk I/O through the file's {} descriptor",
            if fd.is_some() { "O_DIRECT" } else { "buffered" }
        );
        fd
    };
    let completion = Completion::new(1);
    if copies.is_empty() && notify.is_none() {
        completion.part_done(Ok(()));
    } else {
        let job = Xfer {
            write,
            local: local.memory(),
            remote: remote.memory(),
            remote_agent,
            copies: &copies,
            notify,
            remote_fd,
        };
        let gds = !remote.is_remote()
            && [local.storage_kind(), remote.storage_kind()].contains(&StorageKind::Device);
        nixl.post(
            job,
            completion.clone(),
            error,
            gds && agent.has_gds_batch(),
            use_guard,
            gate,
        )
        .map_err(|e| match e {
            // Device <-> disk without a bounce buffer is GPUDirect Storage: say so.
            Error::Io(m) | Error::Nixl(m) if gds => Error::Unavailable(format!(
                "GPUDirect Storage could not take this transfer; NIXL's GDS backend needs \
                     cuFile to accept the file (nvidia-fs, or cuFile's compat mode) and the \
                     device memory: {m}"
            )),
            e => e,
        })?;
    }
    let stats = TransferStats {
        copies: copies.len() as u64,
        ..TransferStats::of(&list, plan, Mechanism::Nixl)
    };
    Ok(Transfer::new(completion, stats, cuda_context))
}
