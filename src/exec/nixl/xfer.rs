//! Transfers through NIXL: descriptor lists from the copy list, a request posted on the
//! context's agent, and a progress thread that learns when requests finish. NIXL reports
//! completion only through status checks, so while requests are in flight the thread checks
//! them with a short, growing pause (10 µs to 200 µs); with none in flight it sleeps on its
//! channel.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use nixl_sys::{Agent, MemType, XferDescList, XferOp, XferRequest, XferStatus};

use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::plan::CopyOp;
use crate::transfer::Completion;

struct Pending {
    req: XferRequest,
    completion: Arc<Completion>,
    /// The memories the request reads and writes stay alive until it finished.
    _hold: Vec<Arc<Memory>>,
}

/// How a host ↔ disk transfer is posted: host memory is always NIXL's local side (the seed's
/// NixlWrite for host → disk, NixlReadFlipped for disk → host).
pub struct HostDisk<'a> {
    pub write: bool,
    pub host: &'a Arc<Memory>,
    pub disk: &'a Arc<Memory>,
    /// Copies as (source, destination) in the transfer's direction.
    pub copies: &'a [CopyOp],
}

pub struct NixlProgress {
    tx: Option<Sender<Pending>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NixlProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NixlProgress")
    }
}

fn run(agent: Agent, rx: Receiver<Pending>) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut pause = Duration::from_micros(10);
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(p) => pending.push(p),
                Err(_) => return, // closed and nothing in flight
            }
        } else {
            match rx.recv_timeout(pause) {
                Ok(p) => pending.push(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Closing: finish what is in flight before leaving.
                    std::thread::sleep(pause);
                }
            }
        }
        let before = pending.len();
        pending.retain(|p| match agent.get_xfer_status(&p.req) {
            Ok(XferStatus::InProgress) => true,
            Ok(XferStatus::Success) => {
                p.completion.part_done(Ok(()));
                false
            }
            Err(e) => {
                p.completion
                    .part_done(Err(Error::Io(format!("NIXL transfer failed: {e}"))));
                false
            }
        });
        pause = if pending.len() < before {
            Duration::from_micros(10)
        } else {
            (pause * 2).min(Duration::from_micros(200))
        };
    }
}

impl NixlProgress {
    pub fn new(agent: &Agent) -> Result<Self> {
        let (tx, rx) = unbounded();
        let agent = agent.clone();
        let thread = std::thread::Builder::new()
            .name("kvx-nixl".into())
            .spawn(move || run(agent, rx))
            .map_err(|e| Error::OutOfMemory(format!("cannot start NIXL progress thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Posts a host ↔ disk transfer; `completion` (one part) completes when NIXL says so.
    pub(crate) fn post_host_disk(
        &self,
        agent: &Agent,
        t: HostDisk<'_>,
        completion: Arc<Completion>,
    ) -> Result<()> {
        let fd = t.disk.device_id().max(0) as u64;
        let nixl = |e: nixl_sys::NixlError| Error::Nixl(format!("NIXL disk transfer: {e}"));
        let mut local = XferDescList::new(MemType::Dram).map_err(nixl)?;
        let mut remote = XferDescList::new(MemType::File).map_err(nixl)?;
        for c in t.copies {
            let (host, file) = if t.write {
                (c.src, c.dst)
            } else {
                (c.dst, c.src)
            };
            local.add_desc(host as usize, c.len as usize, 0);
            remote.add_desc(file as usize, c.len as usize, fd);
        }
        let op = if t.write { XferOp::Write } else { XferOp::Read };
        // The disk is this agent's own: the "remote" agent of the request is the agent itself.
        let req = agent
            .create_xfer_req(op, &local, &remote, &agent.name(), None)
            .map_err(nixl)?;
        let in_flight = agent
            .post_xfer_req(&req, None)
            .map_err(|e| Error::Io(format!("NIXL could not start the disk transfer: {e}")))?;
        if !in_flight {
            completion.part_done(Ok(()));
            return Ok(());
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Pending {
                req,
                completion,
                _hold: vec![t.host.clone(), t.disk.clone()],
            });
        }
        Ok(())
    }
}

impl Drop for NixlProgress {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
