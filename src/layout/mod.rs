//! Layouts: how a pool of KV blocks is laid out over its memory, with every index checked.

mod config;
pub(crate) mod heads;

pub use config::{Geometry, LayoutConfig, LayoutKind};
pub use heads::{HeadOrder, Heads};

use std::sync::{Arc, OnceLock};

use crate::error::{Result, bail};
use crate::memory::{Memory, Region, StorageKind};

/// Checks that `regions` can hold a layout of `config`: one region per allocation, each large
/// enough and aligned as the config asks, none at address 0 (but disk offsets) or wrapping.
pub fn check_regions(
    config: &LayoutConfig,
    kind: StorageKind,
    regions: &[Region],
) -> Result<Geometry> {
    let geometry = config.validate()?;
    if regions.len() as u64 != geometry.allocations {
        bail!(
            InvalidArgument,
            "a {} layout needs {} memory region(s), got {}",
            config.kind.short_name(),
            geometry.allocations,
            regions.len()
        );
    }
    for (i, r) in regions.iter().enumerate() {
        if r.addr == 0 && kind != StorageKind::Disk {
            bail!(InvalidArgument, "region {i} has address 0");
        }
        if r.addr.checked_add(r.len).is_none() {
            bail!(
                InvalidArgument,
                "region {i} wraps around the address space ({:#x} + {})",
                r.addr,
                r.len
            );
        }
        if r.len < geometry.allocation_len {
            bail!(
                InvalidArgument,
                "region {i} holds {} bytes but the layout needs {} bytes per region",
                r.len,
                geometry.allocation_len
            );
        }
        if r.addr % u64::from(config.alignment) != 0 {
            bail!(
                InvalidArgument,
                "region {i} at {:#x} is not aligned to the layout's alignment {}",
                r.addr,
                config.alignment
            );
        }
    }
    // The bytes each layer uses must be its own: a transfer between two layers of one layout is
    // checked for overlap by address, and that check needs distinct regions.
    let mut used: Vec<(u64, usize)> = regions
        .iter()
        .enumerate()
        .map(|(i, r)| (r.addr, i))
        .collect();
    used.sort_unstable();
    for w in used.windows(2) {
        let ((a, i), (b, j)) = (w[0], w[1]);
        if a + geometry.allocation_len > b {
            bail!(
                InvalidArgument,
                "regions {i} ({a:#x}) and {j} ({b:#x}) overlap: each of the {} bytes a region \
                 holds must belong to that region alone",
                geometry.allocation_len
            );
        }
    }
    Ok(geometry)
}

/// Revokes an exported layout at the peers that imported it (peer::Control), called with its
/// export id when the layout is dropped, before its memory can be released.
pub(crate) trait Revoke: Send + Sync {
    fn revoke(&self, export_id: u64);
}

/// How peers know an exported layout, and who revokes it.
struct Export {
    id: u64,
    by: Arc<dyn Revoke>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Export({:#x})", self.id)
    }
}

/// A pool of blocks over some memory. Immutable once made, so it can be shared by threads.
#[derive(Debug)]
pub struct Layout {
    config: LayoutConfig,
    geometry: Geometry,
    memory: Arc<Memory>,
    /// The context that made or imported it; a transfer only takes layouts of its own context.
    context_id: u64,
    /// For a peer's layout, the peer's agent name.
    peer: Option<Arc<str>>,
    /// Set when the layout is first exported.
    export: OnceLock<Export>,
}

impl Layout {
    /// Puts `config` over `memory`, checking that every allocation is present, large enough and
    /// aligned as the config asks.
    pub(crate) fn new(config: LayoutConfig, memory: Memory, context_id: u64) -> Result<Self> {
        let geometry = check_regions(&config, memory.kind(), memory.regions())?;
        Ok(Self {
            config,
            geometry,
            memory: Arc::new(memory),
            context_id,
            peer: None,
            export: OnceLock::new(),
        })
    }

    /// A layout of the peer `agent`, over memory in the peer's process.
    pub(crate) fn new_remote(
        config: LayoutConfig,
        memory: Memory,
        context_id: u64,
        agent: Arc<str>,
    ) -> Result<Self> {
        let mut l = Self::new(config, memory, context_id)?;
        l.peer = Some(agent);
        Ok(l)
    }

    /// The id peers know this layout by, given on its first export; `by` revokes it at them
    /// when it is dropped.
    pub(crate) fn export_id(&self, by: impl FnOnce() -> Arc<dyn Revoke>) -> u64 {
        self.export
            .get_or_init(|| Export {
                // Never 0, and unguessable across the exporter's lifetime.
                id: fastrand::u64(1..),
                by: by(),
            })
            .id
    }

    /// The agent name of the peer that owns this layout; `None` for local layouts.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    pub fn is_remote(&self) -> bool {
        self.peer.is_some()
    }

    pub fn config(&self) -> &LayoutConfig {
        &self.config
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn storage_kind(&self) -> StorageKind {
        self.memory.kind()
    }

    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    pub(crate) fn context_id(&self) -> u64 {
        self.context_id
    }

    /// Bytes of one (block, layer, outer) piece.
    pub fn region_len(&self) -> u64 {
        self.geometry.region
    }

    /// The heads of this layout's regions as one side of a transform; `None` when opaque.
    pub(crate) fn head_side(&self) -> Option<heads::Side> {
        let c = &self.config;
        (!c.heads.is_opaque()).then(|| heads::Side {
            heads: c.heads,
            page_size: c.page_size,
            head_bytes: c.inner_dim / u64::from(c.heads.num_heads) * u64::from(c.dtype_width),
        })
    }

    /// The memory of (block, layer, outer), after checking every index.
    pub fn region(&self, block: u64, layer: u64, outer: u64) -> Result<Region> {
        self.config.check_index(block, layer, outer)?;
        Ok(Region {
            addr: self.addr_unchecked(block, layer, outer),
            len: self.geometry.region,
        })
    }

    /// Address of (block, layer, outer) whose indices the caller has checked.
    pub(crate) fn addr_unchecked(&self, block: u64, layer: u64, outer: u64) -> u64 {
        let (alloc, off) = self
            .config
            .offset_unchecked(&self.geometry, block, layer, outer);
        self.memory.regions()[alloc].addr + off
    }

    /// Checks that every id in `blocks` names a block of this layout.
    pub fn check_blocks(&self, blocks: &[u64], what: &str) -> Result<()> {
        if all_below(blocks, self.config.num_blocks) {
            return Ok(());
        }
        if let Some((i, &b)) = blocks
            .iter()
            .enumerate()
            .find(|&(_, &b)| b >= self.config.num_blocks)
        {
            bail!(
                OutOfRange,
                "{what}[{i}] = {b} is out of range (layout has {} blocks)",
                self.config.num_blocks
            );
        }
        Ok(())
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        if let Some(e) = self.export.get() {
            e.by.revoke(e.id);
        }
    }
}

/// Whether every id is below `n`, in a form that vectorises with plain SSE2 (which has no
/// unsigned 64-bit compare): for `b, n < 2^63`, `b < n` exactly when `b - n` wraps around and
/// sets the top bit. This runs on every submit over thousands of ids.
pub(crate) fn all_below(ids: &[u64], n: u64) -> bool {
    const TOP: u64 = 1 << 63;
    if n > TOP {
        return ids.iter().all(|&b| b < n);
    }
    // Eight lanes, so the reduction is not one serial chain.
    let mut lanes = [TOP; 8];
    let mut chunks = ids.chunks_exact(8);
    for c in &mut chunks {
        for (l, &b) in lanes.iter_mut().zip(c) {
            *l &= b.wrapping_sub(n) & !b;
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(TOP, |acc, &b| acc & b.wrapping_sub(n) & !b);
    lanes.iter().fold(tail, |a, &l| a & l) & TOP != 0
}

#[cfg(test)]
mod tests {
    use super::all_below;

    #[test]
    fn all_below_matches_the_plain_comparison() {
        let top = 1u64 << 63;
        let values = [0, 1, 5, 6, 7, 63, 64, top - 1, top, top + 1, u64::MAX];
        for n in [0, 1, 6, 7, 64, top - 1, top, top + 1, u64::MAX] {
            for len in 0..20 {
                // Every value at every position, including the 8-lane tail.
                for &v in &values {
                    for at in 0..len {
                        let mut ids = vec![0u64; len];
                        if n > 0 {
                            ids.fill(n - 1);
                        }
                        ids[at] = v;
                        assert_eq!(
                            all_below(&ids, n),
                            ids.iter().all(|&b| b < n),
                            "n {n}, ids {ids:?}"
                        );
                    }
                }
            }
            assert!(all_below(&[], n));
        }
    }
}
