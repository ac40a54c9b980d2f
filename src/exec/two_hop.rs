//! Two-hop transfers through the context's pool of pinned bounce buffers. Disk -> disk is the
//! seed's plan: NixlReadFlipped into a bounce buffer, then NixlWrite out of it. Chunks
//! alternate between the two buffers of a pair, so the read of chunk k+1 overlaps the write of
//! chunk k; memory stays bounded (at most MAX_PAIRS pairs of CHUNK-byte buffers), and a job
//! that finds every pair in use waits for one.

use std::sync::{Arc, Condvar, Mutex};

use nixl_sys::Agent;

use crate::error::{Error, Result};
use crate::exec::nixl::xfer::{Xfer, direct_fd, finish, start};
use crate::memory::Memory;
use crate::plan::CopyOp;
use crate::plan::copy_list::sort_by_dst;

/// Bytes of one bounce buffer: one chunk of the pipeline.
pub const CHUNK: u64 = 8 << 20;
/// Pairs of buffers at most, however many two-hop transfers run at once.
pub const MAX_PAIRS: usize = 2;

type Pair = [Arc<Memory>; 2];

#[derive(Debug, Default)]
pub struct BouncePool {
    state: Mutex<(Vec<Pair>, usize)>,
    returned: Condvar,
}

/// A pair taken from the pool; it goes back when dropped.
pub struct Lease<'a> {
    pool: &'a BouncePool,
    pair: Option<Pair>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pair.take() {
            let mut s = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0.push(p);
            self.pool.returned.notify_one();
        }
    }
}

impl BouncePool {
    /// A free pair, a new one made with `make` while fewer than MAX_PAIRS exist, or else the next
    /// one returned.
    pub fn take(&self, make: impl Fn() -> Result<Arc<Memory>>) -> Result<Lease<'_>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(p) = s.0.pop() {
                return Ok(Lease {
                    pool: self,
                    pair: Some(p),
                });
            }
            if s.1 < MAX_PAIRS {
                s.1 += 1;
                drop(s);
                let made = make().and_then(|a| Ok([a, make()?]));
                return match made {
                    Ok(pair) => Ok(Lease {
                        pool: self,
                        pair: Some(pair),
                    }),
                    Err(e) => {
                        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        s.1 -= 1;
                        Err(e)
                    }
                };
            }
            s = self.returned.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Cuts (src offset, dst offset, len) copies into chunks of at most CHUNK bytes each.
fn chunks(copies: &[CopyOp]) -> Vec<Vec<CopyOp>> {
    let mut out = vec![Vec::new()];
    let mut room = CHUNK;
    for &c in copies {
        let mut c = c;
        while c.len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = CHUNK;
            }
            let n = c.len.min(room);
            out.last_mut()
                .expect("non-empty")
                .push(CopyOp { len: n, ..c });
            c = CopyOp {
                src: c.src + n,
                dst: c.dst + n,
                len: c.len - n,
            };
            room -= n;
        }
    }
    out.retain(|c| !c.is_empty());
    out
}

/// Disk -> disk through `lease`'s two buffers, on the calling (worker) thread.
pub fn disk_to_disk(
    agent: &Agent,
    src: &Arc<Memory>,
    dst: &Arc<Memory>,
    copies: &[CopyOp],
    lease: &Lease<'_>,
) -> Result<()> {
    let pair = lease
        .pair
        .as_ref()
        .ok_or_else(|| Error::Internal("empty bounce lease".into()))?;
    let name = agent.name();
    let hop = |i: usize, chunk: &[CopyOp], read: bool| {
        let buf = &pair[i % 2];
        let mut at = buf.regions()[0].addr;
        // Each piece packed into the buffer: (buffer address, disk offset, length).
        let mut pieces: Vec<CopyOp> = chunk
            .iter()
            .map(|c| {
                let p = CopyOp {
                    src: at,
                    dst: if read { c.src } else { c.dst },
                    len: c.len,
                };
                at += c.len;
                p
            })
            .collect();
        // Ascending file offsets; pieces next to each other on disk and in the buffer merge.
        sort_by_dst(&mut pieces);
        let remote = if read { src } else { dst };
        let t = Xfer {
            write: !read,
            local: buf,
            remote,
            remote_agent: &name,
            copies: &pieces,
            notify: None,
            remote_fd: direct_fd(remote, &pieces),
        };
        start(agent, &t, Error::Io)
    };
    // In destination order, so that each chunk's write is a few long runs where ids allow.
    let mut copies = copies.to_vec();
    sort_by_dst(&mut copies);
    let chunks = chunks(&copies);
    if chunks.is_empty() {
        return Ok(());
    }
    finish(agent, hop(0, &chunks[0], true)?, Error::Io, true)?;
    let mut writing: Option<nixl_sys::XferRequest> = None;
    for i in 0..chunks.len() {
        let w = hop(i, &chunks[i], false)?;
        // The other buffer is free once the previous chunk's write finished.
        finish(agent, writing.take(), Error::Io, true)?;
        if i + 1 < chunks.len() {
            let r = hop(i + 1, &chunks[i + 1], true)?;
            finish(agent, r, Error::Io, true)?;
        }
        writing = w;
    }
    finish(agent, writing, Error::Io, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_byte_once() {
        let copies = vec![
            CopyOp {
                src: 0,
                dst: 1 << 40,
                len: CHUNK + 5,
            },
            CopyOp {
                src: 3 << 30,
                dst: 2 << 40,
                len: 7,
            },
        ];
        let c = chunks(&copies);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            vec![CopyOp {
                src: 0,
                dst: 1 << 40,
                len: CHUNK
            }]
        );
        assert_eq!(
            c[1],
            vec![
                CopyOp {
                    src: CHUNK,
                    dst: (1 << 40) + CHUNK,
                    len: 5
                },
                CopyOp {
                    src: 3 << 30,
                    dst: 2 << 40,
                    len: 7
                },
            ]
        );
        assert!(chunks(&[]).is_empty());
    }
}
