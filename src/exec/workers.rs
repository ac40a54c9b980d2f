//! The context's worker threads, which are its progress engine for host copies: jobs arrive on
//! a channel, a worker blocks on it (no polling), runs each job to the end and reports to the
//! transfer's completion, which wakes its waiters. Dropping the pool finishes the queued jobs,
//! then joins.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

use crate::cuda::StreamGate;
use crate::error::{Error, Result};
use crate::transfer::Completion;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub(crate) struct Workers {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub(crate) fn new(count: usize, name: &str) -> Result<Self> {
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Error::OutOfMemory(format!("cannot start worker thread: {e}")))?;
            threads.push(handle);
        }
        Ok(Self {
            tx: Some(tx),
            threads,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.threads.len()
    }

    /// Queues `job` as one part of `completion`. It starts once `gate` passed; its result, or
    /// an internal error if it panics, is the part's outcome; `keep` (the memory it reads and
    /// writes) is released only after it ran, so freeing a layout cannot release memory under
    /// it.
    pub(crate) fn spawn_part<K: Send + 'static>(
        &self,
        completion: Arc<Completion>,
        gate: Option<Arc<StreamGate>>,
        keep: K,
        job: impl FnOnce() -> Result<()> + Send + 'static,
    ) {
        let run = move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(g) = &gate {
                    g.wait()?;
                }
                job()
            }))
            .unwrap_or_else(|_| Err(Error::Internal("a worker job panicked".into())));
            drop((keep, gate));
            completion.part_done(result);
        };
        if let Some(tx) = &self.tx {
            // Sending only fails once every receiver is gone, which happens after drop.
            let _ = tx.send(Box::new(run));
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
