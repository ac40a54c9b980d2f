//! The host executor: host memcpy between host kinds, and blocking CUDA copies between pageable
//! memory and a device, cut into equal shares over the context's worker threads.

use std::sync::Arc;

use super::cuda::copy;
use super::memcpy;
use super::workers::Workers;
use crate::cuda::{CudaDevice, Direction, StreamGate};
use crate::options::{Mechanism, TransferStats};
use crate::plan::{Plan, Request};
use crate::transfer::{Completion, Transfer};

/// Starts `request` on `workers`: memcpy when `cuda` is `None`, else blocking copies in the
/// given direction on that device. `gate`: start after the work queued on a caller's stream.
pub(crate) fn submit(
    workers: &Workers,
    request: &Request<'_>,
    plan: Plan,
    cuda: Option<(Arc<CudaDevice>, Direction)>,
    gate: Option<Arc<StreamGate>>,
    cuda_context: bool,
) -> Transfer {
    let list = request.build();
    let shares = memcpy::split(&list.copies, workers.count());
    let stats = TransferStats {
        bytes: list.bytes,
        fragments: list.fragments,
        copies: list.copies.len() as u64,
        plan,
        mechanism: if cuda.is_some() {
            Mechanism::CopyEngine
        } else {
            Mechanism::Memcpy
        },
        kernel_fallback: false,
        elapsed_ns: 0,
    };
    let streaming = list.bytes >= memcpy::STREAMING_MIN_BYTES;
    let completion = Completion::new(shares.len());
    for share in shares {
        let keep = (request.src.memory().clone(), request.dst.memory().clone());
        let cuda = cuda.clone();
        workers.spawn_part(completion.clone(), gate.clone(), keep, move || {
            match &cuda {
                // SAFETY: the request was validated: every range lies in memory that `keep`
                // holds alive, and no destination overlaps a source or another destination.
                None => unsafe { memcpy::copy_all(&share, streaming) },
                // SAFETY: as above.
                Some((dev, dir)) => unsafe { copy::copy_blocking(dev, *dir, &share)? },
            }
            Ok(())
        });
    }
    Transfer::new(completion, stats, cuda_context)
}
