//! The context's pool of pinned bounce buffers: pairs of CHUNK bytes, at most MAX_PAIRS pairs
//! however many two-hop transfers run at once; a transfer that finds every pair in use waits for
//! one.

use std::sync::{Arc, Condvar, Mutex};

use super::{CHUNK, MAX_PAIRS};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::memory::Memory;

pub(crate) type Pair = [Arc<Memory>; 2];

#[derive(Debug, Default)]
pub(crate) struct BouncePool {
    state: Mutex<(Vec<Pair>, usize)>,
    returned: Condvar,
}

/// A pair taken from the pool; it goes back when dropped.
pub(crate) struct Lease<'a> {
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
    /// Buffers made so far (two per pair).
    pub(crate) fn buffers(&self) -> u64 {
        2 * self.state.lock().unwrap_or_else(|e| e.into_inner()).1 as u64
    }

    /// A free pair, a new one made with `make` while fewer than MAX_PAIRS exist, or else the next
    /// one returned.
    pub(crate) fn take(&self, make: impl Fn() -> Result<Arc<Memory>>) -> Result<Lease<'_>> {
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

impl Lease<'_> {
    /// The two buffers of the pair.
    pub(crate) fn pair(&self) -> Result<&Pair> {
        self.pair
            .as_ref()
            .ok_or_else(|| Error::Internal("empty bounce lease".into()))
    }
}

/// One bounce buffer: pinned for `dev` where there is a device (NIXL registers it when a disk
/// hop first uses it).
pub(crate) fn make_buffer(dev: Option<&Arc<CudaDevice>>) -> Result<Arc<Memory>> {
    Ok(Arc::new(Memory::allocate_pinned(dev, &[CHUNK], 4096)?))
}
