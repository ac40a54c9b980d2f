//! The host executor: memcpy between host kinds, cut into equal shares over the context's
//! worker threads.

use std::sync::Arc;

use super::memcpy;
use super::workers::Workers;
use crate::cuda::StreamGate;
use crate::options::{Mechanism, TransferStats};
use crate::plan::{Plan, Request};
use crate::transfer::{Completion, Transfer};

/// Starts `request` on `workers`. `gate`: start after the work queued on a caller's stream.
pub(crate) fn submit(
    workers: &Workers,
    request: &Request<'_>,
    plan: Plan,
    gate: Option<Arc<StreamGate>>,
    cuda_context: bool,
) -> Transfer {
    let list = request.build();
    let shares = memcpy::split(&list.copies, workers.count());
    let stats = TransferStats::of(&list, plan, Mechanism::Memcpy);
    let streaming = list.bytes >= memcpy::STREAMING_MIN_BYTES;
    let completion = Completion::new(shares.len());
    for share in shares {
        let keep = (request.src.memory().clone(), request.dst.memory().clone());
        workers.spawn_part(completion.clone(), gate.clone(), keep, move || {
            // SAFETY: the request was validated: every range lies in memory that `keep` holds
            // alive, and no destination overlaps a source or another destination.
            unsafe { memcpy::copy_all(&share, streaming) };
            Ok(())
        });
    }
    Transfer::new(completion, stats, cuda_context)
}
