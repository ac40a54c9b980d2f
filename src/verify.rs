//! Verification content. `fill` writes bytes that depend only on (seed, block id, position in
//! the block), where the position counts the block's bytes in (layer, outer, byte) order; the
//! checksum hashes the same bytes in the same order. So equal content has an equal checksum in
//! any layout kind or tier, and different blocks (or seeds) differ.

use std::ffi::c_void;

use cudarc::driver::sys;
use xxhash_rust::xxh3::Xxh3;

use crate::cuda::{CudaDevice, check};
use crate::error::{Result, bail};
use crate::layout::Layout;
use crate::memory::StorageKind;

/// Below this many bytes per thread, verification stays on the calling thread.
const MIN_BYTES_PER_THREAD: u64 = 8 << 20;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn block_key(seed: u64, block: u64) -> u64 {
    splitmix64(seed ^ splitmix64(block ^ 0x6B76_7866_6572_0001))
}

/// The 8 pattern bytes at word index `word` of a block.
fn word(key: u64, word: u64) -> u64 {
    splitmix64(key ^ word.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Fills `dst`, which holds the block's bytes from position `pos` on.
fn fill_bytes(key: u64, mut pos: u64, dst: &mut [u8]) {
    let head = ((8 - pos % 8) % 8).min(dst.len() as u64) as usize;
    let (head_bytes, rest) = dst.split_at_mut(head);
    for b in head_bytes {
        *b = (word(key, pos / 8) >> (8 * (pos % 8))) as u8;
        pos += 1;
    }
    let mut chunks = rest.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&word(key, pos / 8).to_le_bytes());
        pos += 8;
    }
    for b in chunks.into_remainder() {
        *b = (word(key, pos / 8) >> (8 * (pos % 8))) as u8;
        pos += 1;
    }
}

/// How verification reaches a layout's bytes: in place for host memory, staged through a host
/// buffer for device memory.
enum Access<'a> {
    Host,
    Device(&'a CudaDevice),
    Disk(&'a crate::memory::disk::DiskFile),
}

/// Moves one region between a staging buffer and a device or disk layout.
fn stage(access: &Access<'_>, addr: u64, buf: &mut [u8], write: bool) -> Result<()> {
    match access {
        Access::Disk(f) if write => f.write_at(buf, addr),
        Access::Disk(f) => f.read_at(buf, addr),
        // SAFETY: `addr` is a checked region of the layout's device memory, which the layout
        // keeps alive; `buf` holds exactly the region's bytes.
        Access::Device(_) if write => check(
            unsafe { sys::cuMemcpyHtoD_v2(addr, buf.as_ptr().cast(), buf.len()) },
            "cuMemcpyHtoD (fill)",
        ),
        // SAFETY: as above.
        Access::Device(_) => check(
            unsafe { sys::cuMemcpyDtoH_v2(buf.as_mut_ptr().cast::<c_void>(), addr, buf.len()) },
            "cuMemcpyDtoH (checksum)",
        ),
        Access::Host => Ok(()),
    }
}

fn access<'a>(layout: &'a Layout, what: &str) -> Result<Access<'a>> {
    let kind = layout.storage_kind();
    if layout.memory().is_remote() {
        bail!(
            Unavailable,
            "{what} of a remote peer's layout is not possible here: its memory is in another process"
        );
    }
    let memory = layout.memory();
    match (kind, memory.device(), memory.disk_file()) {
        (k, _, _) if k.is_host() => Ok(Access::Host),
        (StorageKind::Device, Some(dev), _) => Ok(Access::Device(dev)),
        (StorageKind::Disk, _, Some(file)) => Ok(Access::Disk(file)),
        _ => bail!(
            Unavailable,
            "{what} of {kind} layouts is not available in this version of kvxfer"
        ),
    }
}

/// Runs `f(i, block)` for every entry of `blocks`, spread over up to `threads` threads.
fn for_blocks<F>(layout: &Layout, blocks: &[u64], threads: usize, f: F)
where
    F: Fn(usize, u64) + Sync,
{
    let c = layout.config();
    let block_bytes = c.num_layers * c.outer_dim * layout.region_len();
    let total = block_bytes.saturating_mul(blocks.len() as u64);
    let threads = (total / MIN_BYTES_PER_THREAD).clamp(1, threads.max(1) as u64) as usize;
    let per = blocks.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (chunk_index, chunk) in blocks.chunks(per).enumerate() {
            let f = &f;
            let run = move || {
                for (j, &b) in chunk.iter().enumerate() {
                    f(chunk_index * per + j, b);
                }
            };
            if threads == 1 {
                run();
            } else {
                s.spawn(run);
            }
        }
    });
}

/// Writes the verification pattern of `seed` into `blocks` of a host layout.
///
/// The caller must not run a transfer touching these blocks at the same time.
pub fn fill(layout: &Layout, blocks: &[u64], seed: u64, threads: usize) -> Result<()> {
    let access = access(layout, "fill")?;
    layout.check_blocks(blocks, "blocks")?;
    let c = *layout.config();
    let region = layout.region_len();
    if !matches!(access, Access::Host) {
        if let Access::Device(dev) = access {
            dev.bind()?;
        }
        let mut buf = vec![0u8; region as usize];
        for &b in blocks {
            let key = block_key(seed, b);
            for (i, (l, o)) in pieces(c.num_layers, c.outer_dim).enumerate() {
                fill_bytes(key, i as u64 * region, &mut buf);
                stage(&access, layout.addr_unchecked(b, l, o), &mut buf, true)?;
            }
        }
        return Ok(());
    }
    for_blocks(layout, blocks, threads, |_, b| {
        let key = block_key(seed, b);
        for (i, (l, o)) in pieces(c.num_layers, c.outer_dim).enumerate() {
            let addr = layout.addr_unchecked(b, l, o);
            // SAFETY: indices are checked, so [addr, addr+region) lies in the layout's host
            // memory, which the layout keeps alive; no other thread writes this block
            // (distinct threads get distinct list entries; a repeated id writes equal bytes).
            let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, region as usize) };
            fill_bytes(key, i as u64 * region, dst);
        }
    });
    Ok(())
}

/// One checksum per entry of `blocks` over all its layers, in (layer, outer, byte) order.
pub fn checksum(layout: &Layout, blocks: &[u64], threads: usize) -> Result<Vec<u64>> {
    let access = access(layout, "checksum")?;
    layout.check_blocks(blocks, "blocks")?;
    let c = *layout.config();
    let region = layout.region_len();
    if !matches!(access, Access::Host) {
        if let Access::Device(dev) = access {
            dev.bind()?;
        }
        let mut buf = vec![0u8; region as usize];
        let mut sums = Vec::with_capacity(blocks.len());
        for &b in blocks {
            let mut h = Xxh3::new();
            for (l, o) in pieces(c.num_layers, c.outer_dim) {
                stage(&access, layout.addr_unchecked(b, l, o), &mut buf, false)?;
                h.update(&buf);
            }
            sums.push(h.digest());
        }
        return Ok(sums);
    }
    let sums: Vec<std::sync::atomic::AtomicU64> =
        blocks.iter().map(|_| Default::default()).collect();
    for_blocks(layout, blocks, threads, |i, b| {
        let mut h = Xxh3::new();
        for (l, o) in pieces(c.num_layers, c.outer_dim) {
            let addr = layout.addr_unchecked(b, l, o);
            // SAFETY: as in `fill`; reading only.
            let src = unsafe { std::slice::from_raw_parts(addr as *const u8, region as usize) };
            h.update(src);
        }
        sums[i].store(h.digest(), std::sync::atomic::Ordering::Relaxed);
    });
    Ok(sums.into_iter().map(|s| s.into_inner()).collect())
}

/// (layer, outer) in the order the bytes of a block are counted.
fn pieces(layers: u64, outer: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..layers).flat_map(move |l| (0..outer).map(move |o| (l, o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_based_whatever_the_split() {
        let key = block_key(7, 3);
        let mut whole = vec![0u8; 100];
        fill_bytes(key, 5, &mut whole);
        let mut pieces = vec![0u8; 100];
        let (a, rest) = pieces.split_at_mut(3);
        let (b, c) = rest.split_at_mut(41);
        fill_bytes(key, 5, a);
        fill_bytes(key, 8, b);
        fill_bytes(key, 49, c);
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 100];
        fill_bytes(block_key(7, 4), 5, &mut other);
        assert_ne!(whole, other);
        fill_bytes(block_key(8, 3), 5, &mut other);
        assert_ne!(whole, other);
    }
}
