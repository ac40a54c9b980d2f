//! The context's worker threads, which are its progress engine for host copies: jobs arrive on
//! a channel, a worker blocks on it (no polling), runs each job to the end and reports to the
//! transfer's completion, which wakes its waiters. Dropping the pool finishes the queued jobs,
//! then joins.

use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

use crate::error::{Error, Result};

pub type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub struct Workers {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn new(count: usize, name: &str) -> Result<Self> {
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

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Queues `job`; it runs on one of the workers.
    pub fn spawn(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Sending only fails once every receiver is gone, which happens after drop.
            let _ = tx.send(job);
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
