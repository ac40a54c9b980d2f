//! The SM copy kernel (`copy_blocks.cu`): built with NVRTC (once per process and GPU
//! architecture), loaded into each device's primary context, launched with a descriptor of the
//! two layouts and a table of their bases and the block pairs, so the host never expands
//! fragments. The table rides in the kernel parameter where it fits (one launch, nothing to
//! upload first), else in a pooled pinned buffer: read in place between host and device memory,
//! uploaded to a device buffer first device to device.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUstream;

use super::budget::Budget;
use crate::cuda::{CudaDevice, Direction, Entry, Module, TableBuffer};
use crate::error::{Error, Result};
use crate::layout::heads::Piece;
use crate::layout::{Layout, LayoutKind};
use crate::plan::CopyOp;
use crate::plan::copy_list::pack16;

const SOURCE: &str = include_str!("copy_blocks.cu");
const THREADS: u32 = 256;
/// Bytes one warp copies per item: regions larger than this are shared between warps.
const PIECE: u64 = 64 << 10;
/// Short transfers cut regions down to this, so that every warp has a piece.
const MIN_PIECE: u64 = 4 << 10;
/// Pieces from this size up are copied by a whole warp each; only smaller ones need the item
/// loop with the small-piece path (`copy_small` in copy_blocks.cu).
const SMALL_PIECE: u64 = 4 << 10;
/// Device-to-device bytes a warp copies between two of its layer counts (each a fence that
/// waits for the warp's stores): runs of consecutive items are made this long (`run_len`).
const FENCE_WORK: u64 = 64 << 10;

/// One side of the descriptor; mirrors `struct Side` in copy_blocks.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Side {
    kind: u64,
    num_blocks: u64,
    block_stride: u64,
    region: u64,
    bases: u64,
}

/// Mirrors `struct Desc` in copy_blocks.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    src: Side,
    dst: Side,
    region: u64,
    outer: u64,
    layer_begin: u64,
    layers: u64,
    piece: u64,
    pieces_per_region: u64,
    pairs: u64,
    pair_ids: u64,
    id_bytes: u64,
    items: u64,
    table: u64,
    signals: u64,
    system_fence: u64,
    pieces: u64,
    run: u64,
}

const DESC_WORDS: usize = std::mem::size_of::<Desc>() / 8;
/// Table words the inline kernels carry: `KVX_INLINE_TINY` / `_SMALL` in copy_blocks.cu, so
/// that descriptor and table make 1024 and 4096 bytes.
const INLINE_TINY: usize = 103;
const INLINE_SMALL: usize = 487;
const _: () = assert!((DESC_WORDS + INLINE_TINY) * 8 == 1024);
const _: () = assert!((DESC_WORDS + INLINE_SMALL) * 8 == 4096);

/// Entry points of one item loop (`copy_items<I, SMALL>` in copy_blocks.cu), by where the
/// table travels.
#[derive(Debug, Clone, Copy)]
struct Entries {
    /// Table in memory (pinned or uploaded).
    table: Entry,
    /// Table inside a 1 KB parameter (a launch copies less).
    tiny: Option<Entry>,
    /// Table inside a 4 KB parameter.
    small: Entry,
}

impl Entries {
    fn load(module: &Module, suffix: &str) -> Result<Self> {
        let name = |base: &str| {
            std::ffi::CString::new(format!("{base}{suffix}"))
                .map_err(|e| Error::Internal(format!("copy kernel entry name: {e}")))
        };
        Ok(Self {
            table: module.entry(&name("kvx_copy_blocks")?, THREADS)?,
            tiny: module.entry(&name("kvx_copy_blocks_p1k")?, THREADS).ok(),
            small: module.entry(&name("kvx_copy_blocks_p4k")?, THREADS)?,
        })
    }
}

/// The item loop of copy_blocks.cu (`copy_items<I, SMALL>`) that moves a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemLoop {
    /// 32-bit index math without the small-piece path.
    Lean,
    /// 32-bit index math with the small-piece path.
    SmallPieces,
    /// 64-bit index math with the small-piece path.
    Wide,
}

impl ItemLoop {
    /// The loop for `items` pieces of regions of `region` bytes, cut by a head transform or
    /// not. Pieces under SMALL_PIECE come only from a transform or small regions (a region's
    /// last piece may be shorter too, but then its batch mixes lengths, which the small-piece
    /// path does not take).
    fn of(transform: bool, region: u64, items: u64) -> Self {
        if items > u64::from(u32::MAX) {
            Self::Wide
        } else if transform || region < SMALL_PIECE {
            Self::SmallPieces
        } else {
            Self::Lean
        }
    }
}

/// The copy kernel's module on one device, with its entry points.
#[derive(Debug)]
pub(crate) struct Kernel {
    _module: Module,
    /// Items below 2^32 in pieces of at least SMALL_PIECE: 32-bit index math and no
    /// small-piece path. Beside an engine's tensor-core kernels this lean loop moves 4 KiB
    /// pieces at 0.90-0.94 of the link on 8 blocks where the general one moved 0.56-0.63 of it
    /// (copy_blocks.cu).
    lean: Entries,
    /// Items below 2^32 whose pieces may be smaller (head transforms, small regions).
    small_pieces: Entries,
    /// Any number of items (64-bit index math), table in memory (pinned or uploaded).
    wide: Entry,
    /// Copies of an explicit list (`kvx_copy_list`).
    list: Option<Entry>,
    /// Blocks each direction may take.
    budget: Budget,
}

/// What the kernel moves: `pairs[i] = (src id, dst id)` for the layers in `layers`, in
/// `direction` (which sets the blocks it may take: `Budget`).
pub(crate) struct Job<'a> {
    pub src: &'a Layout,
    pub dst: &'a Layout,
    pub src_blocks: &'a [u64],
    pub dst_blocks: &'a [u64],
    pub layers: std::ops::Range<u64>,
    pub direction: Direction,
    /// Per-layer counters the kernel counts up (device address; one u32 per layer in range)
    /// and whether the destination is host memory.
    pub signals: Option<(u64, bool)>,
    /// A head transform's pieces of one region pair (`Request::transform`), each at most
    /// PIECE bytes; `None`: regions move whole.
    pub pieces: Option<&'a [Piece]>,
    /// Checks the block ids (`Request::validate_ids`), given where the pairs go packed two to
    /// a word (16-bit ids) and saying whether it wrote them there in the same pass.
    pub check_ids: &'a dyn Fn(Option<&mut [u64]>) -> Result<bool>,
}

impl Job<'_> {
    /// The most items (warp-sized pieces) one layer can have, at the smallest piece size.
    pub(crate) fn max_items_per_layer(&self) -> u64 {
        let per_region = match self.pieces {
            Some(p) => p.len() as u64,
            None => self.src.region_len().div_ceil(MIN_PIECE),
        };
        self.src_blocks.len() as u64 * self.src.config().outer_dim * per_region
    }
}

/// What one launch took.
pub(crate) struct Launched {
    /// The pooled table it reads, to recycle once the stream passed the launch.
    pub table: Option<TableBuffer>,
    /// Blocks launched.
    pub ctas: u32,
    /// Items of each layer: what its counter counts up by.
    pub items_per_layer: u64,
    /// Whether the layers' counters reach their counts in layer order. Each warp takes the
    /// items whose index is its own modulo the number of warps, in ascending order (layers
    /// outermost), and publishes a layer's count only after the earlier layer's: when every
    /// layer has at least one item per warp, a layer's counter is complete only after every
    /// warp finished the layers before it. With fewer, a warp may still copy layer l while the
    /// warps of layer l + 1 are done.
    pub in_layer_order: bool,
}

fn side(l: &Layout, bases: usize) -> Side {
    Side {
        kind: match l.config().kind {
            LayoutKind::FullyContiguous => 0,
            LayoutKind::LayerSeparateBlockFirst => 1,
            LayoutKind::LayerSeparateOuterFirst => 2,
        },
        num_blocks: l.config().num_blocks,
        block_stride: l.geometry().block_stride,
        region: l.region_len(),
        bases: bases as u64,
    }
}

/// The narrowest id width (bytes) both layouts' ids fit.
fn id_bytes(src: &Layout, dst: &Layout) -> usize {
    let n = src.config().num_blocks.max(dst.config().num_blocks);
    if n <= 1 << 16 {
        2
    } else if n <= 1 << 32 {
        4
    } else {
        8
    }
}

/// Writes `bases`, then `job`'s pairs with `width` bytes per id, into `out`, the block ids
/// checked first (an error: nothing of use written).
/// 16-bit ids are checked in the pass that packs them: for 65536 pairs of ids the caller wrote
/// a while ago, the pack alone took 38-77 µs after the check on the H200 machines' hosts
/// (session 16, device runs 12-14), and its second read of 1 MB of ids is what one pass saves.
fn write_checked(out: &mut [u64], bases: &[u64], job: &Job<'_>, width: usize) -> Result<()> {
    let (b, ids) = out.split_at_mut(bases.len());
    b.copy_from_slice(bases);
    let packed = (job.check_ids)((width == 2).then_some(&mut *ids))?;
    if !packed {
        write_ids(ids, job.src_blocks, job.dst_blocks, width);
    }
    Ok(())
}

/// The pairs with `width` bytes per id, into `ids`.
fn write_ids(ids: &mut [u64], src: &[u64], dst: &[u64], width: usize) {
    let pairs = src.iter().zip(dst);
    // Little-endian: id i of the (src, dst, src, dst, ...) list sits at bytes
    // [i * width, (i + 1) * width); the ids fit `width` (see `id_bytes`).
    match width {
        2 => {
            // Two pairs a word, without a branch per id: a table of 65536 pairs (256 MiB of
            // 4 KiB blocks) took 70-120 µs to write one id at a time, before the kernel could
            // start (session 13, device run 7).
            let (s2, d2) = (src.chunks_exact(2), dst.chunks_exact(2));
            let (s_odd, d_odd) = (s2.remainder(), d2.remainder());
            let mut words = ids.iter_mut();
            for ((s, d), w) in s2.zip(d2).zip(&mut words) {
                *w = pack16(s[0], d[0], s[1], d[1]);
            }
            if let (Some(&s), Some(&d), Some(w)) = (s_odd.first(), d_odd.first(), words.next()) {
                *w = pack16(s, d, 0, 0);
            }
        }
        4 => {
            for (w, (s, d)) in ids.iter_mut().zip(pairs) {
                *w = s | (d << 32);
            }
        }
        _ => {
            for (w, (s, d)) in ids.chunks_exact_mut(2).zip(pairs) {
                w[0] = *s;
                w[1] = *d;
            }
        }
    }
}

impl Kernel {
    /// Compiles (once per architecture) and loads the kernel on `dev`, with an SM budget of
    /// `max_sms` (0 = auto: host <-> device sized from the measured link, device <-> device one
    /// full wave).
    pub(crate) fn build(dev: &Arc<CudaDevice>, max_sms: u32) -> Result<Self> {
        let module = Module::build(dev, "copy_blocks.cu", SOURCE)
            .map_err(|e| Error::Unavailable(format!("the copy kernel: {e}")))?;
        let mut this = Self {
            lean: Entries::load(&module, "")?,
            small_pieces: Entries::load(&module, "_small")?,
            wide: module.entry(c"kvx_copy_blocks_wide", THREADS)?,
            list: module.entry(c"kvx_copy_list", THREADS).ok(),
            _module: module,
            budget: Budget::full(),
        };
        this.budget = Budget::new(dev, &this, max_sms);
        Ok(this)
    }

    /// Blocks a launch in `direction` may take (one per SM while SMs have room).
    pub(crate) fn ctas(&self, direction: Direction) -> u32 {
        self.budget.ctas(direction)
    }

    /// Blocks and the piece size (bytes a warp copies per item) for `bytes` in `direction`:
    /// pieces as large as PIECE, but small enough (down to MIN_PIECE) that every warp of the
    /// launch has one, so that a short transfer is in flight at once.
    fn shape(&self, entry: Entry, direction: Direction, bytes: u64) -> (u32, u64) {
        let ctas = self
            .budget
            .launch(direction, bytes, THREADS / 32)
            .clamp(1, entry.max_blocks);
        let warps = u64::from(ctas) * u64::from(THREADS / 32);
        let per_warp = (bytes / warps).max(1);
        let piece = if per_warp >= PIECE {
            PIECE
        } else {
            (1u64 << per_warp.ilog2()).max(MIN_PIECE)
        };
        (ctas, piece)
    }

    /// The SMs a launch of `ctas` blocks runs on, as stats report it.
    pub(crate) fn sms(&self, dev: &CudaDevice, ctas: u32) -> u32 {
        ctas.min(dev.sm_count)
    }

    /// Whether `enqueue_list` can run.
    pub(crate) fn has_list(&self) -> bool {
        self.list.is_some()
    }

    /// Launches `kvx_copy_list` for `copies` on `stream` on at most `ctas` blocks, copies
    /// longer than PIECE cut into PIECE-sized ones so that many warps share them. The list is
    /// uploaded through a pooled table, which is returned with the blocks launched: it must
    /// stay untouched until the stream has passed this work.
    ///
    /// # Safety
    /// `stream` is a live stream of `dev`; every copy's two ranges are memory the SMs of `dev`
    /// can address (its device memory, CUDA-pinned host memory), valid and not written by
    /// anything else until the stream has passed this work.
    pub(crate) unsafe fn enqueue_list(
        &self,
        dev: &CudaDevice,
        stream: CUstream,
        copies: &[CopyOp],
        ctas: u32,
    ) -> Result<(TableBuffer, u32)> {
        let prepared = self.prepare_list(dev, copies.iter().copied())?;
        // SAFETY: forwarded to the caller.
        unsafe { self.launch_list(stream, prepared, ctas) }
    }

    /// The first half of `enqueue_list`, for copies computed on the way into the table (a
    /// bounce buffer's packed side): written into a pooled table, ready to be launched later (a
    /// pipeline writes the next hop's table while host copies run).
    pub(crate) fn prepare_list<'d>(
        &self,
        dev: &'d CudaDevice,
        copies: impl Iterator<Item = CopyOp> + Clone,
    ) -> Result<PreparedList<'d>> {
        if self.list.is_none() {
            return Err(Error::Unavailable(
                "the copy kernel has no list entry".into(),
            ));
        }
        let n: u64 = copies.clone().map(|c| c.len.div_ceil(PIECE)).sum();
        let words = (3 * n) as usize;
        let table = dev.table(words.max(1))?;
        // SAFETY: the host table holds at least `words` u64s, none read by queued work (pool
        // contract).
        let host = unsafe { std::slice::from_raw_parts_mut(table.host, words) };
        for (t, op) in host.chunks_exact_mut(3).zip(list_ops(copies)) {
            t.copy_from_slice(&op);
        }
        Ok(PreparedList {
            dev,
            table: Some(table),
            n,
        })
    }

    /// The second half of `enqueue_list`: uploads a prepared table and launches the list
    /// kernel for it on `stream` (of the device it was prepared on).
    ///
    /// # Safety
    /// As `enqueue_list`, for the copies the table was prepared with.
    pub(crate) unsafe fn launch_list(
        &self,
        stream: CUstream,
        mut prepared: PreparedList<'_>,
        ctas: u32,
    ) -> Result<(TableBuffer, u32)> {
        // Without an entry the table goes back to the pool with `prepared`.
        let Some(entry) = self.list else {
            return Err(Error::Unavailable(
                "the copy kernel has no list entry".into(),
            ));
        };
        let Some(table) = prepared.table.take() else {
            return Err(Error::Internal(
                "a prepared copy list without its table".into(),
            ));
        };
        let (dev, n) = (prepared.dev, prepared.n);
        let words = (3 * n) as usize;
        let mut list = [table.device, n];
        let mut run = || -> Result<u32> {
            // SAFETY: `stream` is of the table's device (caller); the table is the transfer's
            // until the stream passed this work.
            unsafe { table.upload(words, stream, "cuMemcpyHtoDAsync (copy list)") }?;
            // SAFETY: the entry takes (const List) by value: two u64s.
            unsafe {
                launch(
                    entry,
                    stream,
                    list.as_mut_ptr().cast(),
                    blocks_for(entry, n, ctas),
                )
            }
        };
        match run() {
            Ok(ctas) => Ok((table, ctas)),
            Err(e) => {
                dev.abandon(stream, Some(table));
                Err(e)
            }
        }
    }

    /// Makes the launch for `job` ready: its shape, and its table with the block ids checked
    /// (`Job::check_ids`) in the pass that writes them. A table that fits a kernel parameter
    /// goes with the launch; a larger one into a pooled pinned buffer, which the kernel reads in
    /// place between host and device memory and as an uploaded copy device to device. Nothing
    /// is queued: an error here (bad ids among them) leaves the stream as it was.
    pub(crate) fn prepare<'d>(
        &self,
        dev: &'d CudaDevice,
        job: &Job<'_>,
    ) -> Result<PreparedJob<'d>> {
        let entered = std::time::Instant::now();
        let (src, dst) = (job.src, job.dst);
        let (src_regions, dst_regions) = (src.memory().regions(), dst.memory().regions());
        let n_bases = src_regions.len() + dst_regions.len();
        let bases: Vec<u64> = src_regions
            .iter()
            .chain(dst_regions)
            .map(|r| r.addr)
            .collect();
        let pairs = job.src_blocks.len();
        let width = id_bytes(src, dst);
        let id_words = (2 * pairs * width).div_ceil(8);
        let piece_words = job.pieces.map_or(0, |p| 3 * p.len());
        let words = n_bases + id_words + piece_words;
        let region = src.region_len();
        let outer = src.config().outer_dim;
        let layers = job.layers.end - job.layers.start;
        let moved = job.pieces.map_or(region, |p| p.iter().map(|p| p.len).sum());
        let bytes = pairs as u64 * layers * outer * moved;
        let transform = job.pieces.is_some();
        // The entries for the item count `shape` leads to (which needs an entry's block limit):
        // one of the 32-bit loops, unless the count turns out larger.
        let entries = match ItemLoop::of(transform, region, 0) {
            ItemLoop::Lean => self.lean,
            _ => self.small_pieces,
        };
        let inline = if let (true, Some(tiny)) = (words <= INLINE_TINY, entries.tiny) {
            Some((tiny, INLINE_TINY))
        } else if words <= INLINE_SMALL {
            Some((entries.small, INLINE_SMALL))
        } else {
            None
        };
        let entry = inline.map_or(entries.table, |(e, _)| e);
        let (ctas, piece) = self.shape(entry, job.direction, bytes);
        let pieces_per_region = match job.pieces {
            Some(p) => p.len() as u64,
            None => region.div_ceil(piece),
        };
        let items_per_layer = pairs as u64 * outer * pieces_per_region;
        let items = items_per_layer * layers;
        // The 64-bit loop takes its table in memory, not in the parameter.
        let (inline, entry) = match ItemLoop::of(transform, region, items) {
            ItemLoop::Wide => (None, self.wide),
            _ => (inline, entry),
        };
        let blocks = blocks_for(entry, items, ctas);
        let warps = u64::from(blocks) * u64::from(THREADS / 32);
        let run = run_len(
            job.direction,
            moved / pieces_per_region.max(1),
            items,
            warps,
        );
        let mut desc = Desc {
            src: side(src, 0),
            dst: side(dst, src_regions.len()),
            region,
            outer,
            layer_begin: job.layers.start,
            layers,
            piece,
            pieces_per_region,
            pairs: pairs as u64,
            pair_ids: n_bases as u64,
            id_bytes: width as u64,
            items,
            table: 0,
            signals: job.signals.map_or(0, |(a, _)| a),
            system_fence: u64::from(job.signals.is_some_and(|(_, host)| host)),
            pieces: if job.pieces.is_some() {
                (n_bases + id_words) as u64
            } else {
                0
            },
            run,
        };
        let param = if let Some((_, capacity)) = inline {
            let mut param = vec![0u64; DESC_WORDS + capacity];
            let (head, table) = param.split_at_mut(DESC_WORDS);
            head.copy_from_slice(&desc_words(&desc));
            write_checked(table, &bases, job, width)?;
            write_pieces(&mut table[n_bases + id_words..], job.pieces);
            Param::Inline(param)
        } else {
            let table = dev.table(words)?;
            // Between host and device memory the kernel reads the table where the host wrote
            // it: a 256 KB table's upload took 25-50 µs of the submitting thread before the
            // launch (65536 pairs, session 14, device runs 4-6), and its reads, one per 32
            // pieces a warp, cost no measurable speed on a link the pieces cross anyway
            // (session 13, device run 1). Device to device, those reads would cross the link
            // while the pieces do not: the kernel then ran 0.02-0.04 slower, so it reads an
            // uploaded copy.
            let in_place = job.direction != Direction::DeviceToDevice && table.mapped != 0;
            desc.table = if in_place { table.mapped } else { table.device };
            // SAFETY: the host table holds at least `words` u64s, none read by queued work
            // (pool contract).
            let host = unsafe { std::slice::from_raw_parts_mut(table.host, words) };
            if let Err(e) = write_checked(host, &bases, job, width) {
                dev.recycle_table(table);
                return Err(e);
            }
            write_pieces(&mut host[n_bases + id_words..], job.pieces);
            Param::Table {
                table,
                upload: !in_place,
            }
        };
        Ok(PreparedJob {
            dev,
            entry,
            blocks,
            desc,
            param: Some(param),
            words,
            items_per_layer,
            in_layer_order: in_layer_order(items_per_layer, run, ctas),
            direction: job.direction,
            prepare_ns: entered.elapsed().as_nanos() as u64,
        })
    }

    /// Queues a prepared launch on `stream` (of the device it was prepared on). A table in
    /// memory is returned with the launch: it must stay untouched until the stream has passed
    /// this work.
    ///
    /// # Safety
    /// `stream` is a live stream of the job's device; both layouts' memory stays alive until
    /// the stream has passed this work.
    pub(crate) unsafe fn launch(
        &self,
        stream: CUstream,
        mut job: PreparedJob<'_>,
    ) -> Result<Launched> {
        let t0 = std::time::Instant::now();
        let (dev, entry, blocks) = (job.dev, job.entry, job.blocks);
        let (items_per_layer, in_layer_order) = (job.items_per_layer, job.in_layer_order);
        let launched = |table, ctas| Launched {
            table,
            ctas,
            items_per_layer,
            in_layer_order,
        };
        match job.param.take() {
            Some(Param::Inline(mut param)) => {
                // SAFETY: `param` holds the whole Inline<capacity> parameter the entry takes;
                // the driver copies it during the call.
                let ctas = unsafe { launch(entry, stream, param.as_mut_ptr().cast(), blocks) }?;
                // How long the table took to write (its ids checked on the way) and the driver
                // to queue the launch (KVX_LOG=kvxfer=trace).
                tracing::trace!(
                    words = job.words,
                    param_words = param.len() - DESC_WORDS,
                    ctas,
                    prepare_ns = job.prepare_ns,
                    launch_ns = t0.elapsed().as_nanos() as u64,
                    "copy kernel launched"
                );
                Ok(launched(None, ctas))
            }
            Some(Param::Table { table, upload }) => {
                let (words, mut desc) = (job.words, job.desc);
                let mut queue = || -> Result<u32> {
                    if upload {
                        // SAFETY: `stream` is of `dev`, the table's device (caller); the table
                        // is this transfer's until the stream passed it. Ordered before the
                        // launch.
                        unsafe {
                            table.upload(words, stream, "cuMemcpyHtoDAsync (copy kernel table)")
                        }?;
                    }
                    // SAFETY: the entry takes (const Desc) by value.
                    unsafe { launch(entry, stream, (&mut desc as *mut Desc).cast(), blocks) }
                };
                let ran = queue();
                tracing::trace!(
                    words,
                    in_place = !upload,
                    prepare_ns = job.prepare_ns,
                    launch_ns = t0.elapsed().as_nanos() as u64,
                    "copy kernel launched with its table in pinned memory"
                );
                match ran {
                    Ok(ctas) => Ok(launched(Some(table), ctas)),
                    Err(e) => {
                        dev.abandon(stream, Some(table));
                        Err(e)
                    }
                }
            }
            None => Err(Error::Internal(
                "a prepared launch without its parameter".into(),
            )),
        }
    }
}

/// Items in one run of consecutive items a warp copies (`copy_items` in copy_blocks.cu): a
/// power of two from 1 to 32. Device to device, runs of FENCE_WORK bytes: a warp publishes a
/// layer's count (a fence that waits for its stores, with nothing of its own in flight) when
/// its next item is of another layer, and with single items strided over the whole range it
/// did so after every item once a layer had fewer items than the launch has warps (256 MiB of
/// 4 KiB pieces moved at 0.70 of one large copy in device time, 0.86-0.89 with runs:
/// docs/BENCHMARKS.md, session 11). Longer runs make the layers complete in coarser steps
/// (`in_layer_order`), and never so long that some warps have no run. Host <-> device, single
/// items: the link, not the fences, sets the pace, and layer-by-layer reloads want the finest
/// steps.
fn run_len(direction: Direction, item_bytes: u64, items: u64, warps: u64) -> u64 {
    if direction != Direction::DeviceToDevice {
        return 1;
    }
    let want = FENCE_WORK / item_bytes.max(1);
    let most = items / warps.max(1);
    let r = want.min(most).clamp(1, 32);
    1 << r.ilog2()
}

/// `Launched::in_layer_order` for `items_per_layer` items of each layer in runs of `run` on
/// `ctas` blocks. Warp w owns runs w, w + warps, ... of `run` items each, which recur every
/// `run × warps` items: any `run × warps` consecutive items hold some of every warp's.
fn in_layer_order(items_per_layer: u64, run: u64, ctas: u32) -> bool {
    items_per_layer >= run * u64::from(ctas) * u64::from(THREADS / 32)
}

/// A transform's pieces as (source offset, destination offset, length) triples.
fn write_pieces(out: &mut [u64], pieces: Option<&[Piece]>) {
    for (w, p) in out.chunks_exact_mut(3).zip(pieces.unwrap_or_default()) {
        w.copy_from_slice(&[p.src, p.dst, p.len]);
    }
}

/// Cuts pieces longer than PIECE, so that warps share long runs (equal heads in equal orders
/// are one piece of a whole region).
pub(crate) fn split_pieces(pieces: &[Piece]) -> Vec<Piece> {
    pieces
        .iter()
        .flat_map(|p| {
            (0..p.len.div_ceil(PIECE)).map(move |i| Piece {
                src: p.src + i * PIECE,
                dst: p.dst + i * PIECE,
                len: PIECE.min(p.len - i * PIECE),
            })
        })
        .collect()
}

/// A list kernel's table, written and not yet launched (`Kernel::prepare_list`); back to the
/// device's pool if it never is.
pub(crate) struct PreparedList<'d> {
    dev: &'d CudaDevice,
    table: Option<TableBuffer>,
    n: u64,
}

impl Drop for PreparedList<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            self.dev.recycle_table(t);
        }
    }
}

/// A job's launch, its table written and its ids checked, not yet queued
/// (`Kernel::prepare`); its pooled table goes back to the device's pool if it never is.
pub(crate) struct PreparedJob<'d> {
    dev: &'d CudaDevice,
    entry: Entry,
    blocks: u32,
    desc: Desc,
    param: Option<Param>,
    /// Table words (bases, ids, pieces), for the trace.
    words: usize,
    items_per_layer: u64,
    in_layer_order: bool,
    direction: Direction,
    prepare_ns: u64,
}

/// How a launch takes its table.
enum Param {
    /// The descriptor and the table in one kernel parameter (1 or 4 KB).
    Inline(Vec<u64>),
    /// The descriptor alone (`PreparedJob::desc`), pointing at a pooled table the kernel
    /// reads in place or, with `upload`, as a copy uploaded to device memory before the launch.
    Table { table: TableBuffer, upload: bool },
}

impl PreparedJob<'_> {
    /// The direction its counters publish for (where their waits are queued).
    pub(crate) fn direction(&self) -> Direction {
        self.direction
    }
}

impl Drop for PreparedJob<'_> {
    fn drop(&mut self) {
        if let Some(Param::Table { table, .. }) = self.param.take() {
            self.dev.recycle_table(table);
        }
    }
}

/// `copies` as kvx_copy_list's (source, destination, length) entries of at most PIECE bytes.
fn list_ops(copies: impl Iterator<Item = CopyOp>) -> impl Iterator<Item = [u64; 3]> {
    copies.flat_map(|c| {
        (0..c.len.div_ceil(PIECE)).map(move |i| {
            let off = i * PIECE;
            [c.src + off, c.dst + off, PIECE.min(c.len - off)]
        })
    })
}

fn desc_words(d: &Desc) -> [u64; DESC_WORDS] {
    // SAFETY: Desc is DESC_WORDS plain u64 fields, no padding.
    unsafe { std::mem::transmute(*d) }
}

/// Blocks a launch of `entry` for `items` takes: enough warps for them, at most `ctas` and one
/// wave, at least one.
fn blocks_for(entry: Entry, items: u64, ctas: u32) -> u32 {
    let warps_per_block = u64::from(THREADS / 32);
    items
        .div_ceil(warps_per_block)
        .min(u64::from(ctas.clamp(1, entry.max_blocks)))
        .max(1) as u32
}

/// Launches `entry` on `blocks` blocks (`blocks_for`); returns them.
///
/// # Safety
/// As `Entry::launch`.
unsafe fn launch(entry: Entry, stream: CUstream, param: *mut c_void, blocks: u32) -> Result<u32> {
    // SAFETY: forwarded to the caller.
    unsafe { entry.launch(stream, param, blocks) }?;
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::{ItemLoop, PIECE, THREADS, in_layer_order, list_ops, run_len, write_ids};
    use crate::cuda::Direction;
    use crate::plan::CopyOp;

    /// Each lane's item of each batch warp `w` of `warps` takes, as `copy_items` in
    /// copy_blocks.cu computes them (`None`: no item).
    fn batches_of(w: u64, warps: u64, items: u64, run: u64) -> Vec<Vec<Option<u64>>> {
        let per_batch = 32 / run;
        let mut out = Vec::new();
        let mut b = 0;
        while (b * per_batch * warps + w) * run < items {
            out.push(
                (0..32u64)
                    .map(|lane| {
                        let mine = ((b * per_batch + lane / run) * warps + w) * run + lane % run;
                        (mine < items).then_some(mine)
                    })
                    .collect(),
            );
            b += 1;
        }
        out
    }

    fn items_of(w: u64, warps: u64, items: u64, run: u64) -> Vec<u64> {
        batches_of(w, warps, items, run)
            .into_iter()
            .flatten()
            .flatten()
            .collect()
    }

    #[test]
    fn runs_cover_every_item_once_in_ascending_lane_prefixes() {
        for warps in [1u64, 8, 96, 256, 2112] {
            for items in [1u64, 7, 95, 96, 97, 300, 4096, 65536] {
                for run in [1u64, 2, 4, 16, 32] {
                    let mut seen = vec![0u8; items as usize];
                    for w in 0..warps {
                        for batch in batches_of(w, warps, items, run) {
                            // The lanes with an item come first (the kernel counts them).
                            let n = batch.iter().take_while(|i| i.is_some()).count();
                            assert!(batch[n..].iter().all(Option::is_none));
                            assert!(n > 0, "an empty batch");
                            let mine: Vec<u64> = batch.into_iter().flatten().collect();
                            assert!(mine.windows(2).all(|p| p[0] < p[1]), "ascending");
                            for i in mine {
                                seen[i as usize] += 1;
                            }
                        }
                    }
                    assert!(
                        seen.iter().all(|&n| n == 1),
                        "{items} items, {warps} warps, runs of {run}"
                    );
                }
            }
        }
    }

    #[test]
    fn single_item_runs_are_the_strided_walk() {
        let (warps, items) = (96u64, 10_000u64);
        for w in [0, 5, 95] {
            let strided: Vec<u64> = (w..items).step_by(warps as usize).collect();
            assert_eq!(items_of(w, warps, items, 1), strided);
        }
    }

    #[test]
    fn runs_are_long_only_device_to_device_and_leave_no_warp_idle() {
        let d2d = Direction::DeviceToDevice;
        // 256 MiB of 4 KiB pieces on a full wave (2112 warps): 16 items of 64 KiB per run.
        assert_eq!(run_len(d2d, 4096, 65536, 2112), 16);
        assert_eq!(run_len(d2d, 16 << 10, 65536, 2112), 4);
        assert_eq!(run_len(d2d, 64 << 10, 4096, 2112), 1);
        assert_eq!(run_len(d2d, 256, 1 << 20, 2112), 32);
        // Fewer items than warps times the run: shorter runs, every warp has one.
        assert_eq!(run_len(d2d, 4096, 256, 256), 1);
        assert_eq!(run_len(d2d, 4096, 3 * 2112, 2112), 2);
        for direction in [Direction::HostToDevice, Direction::DeviceToHost] {
            assert_eq!(run_len(direction, 4096, 65536, 96), 1);
        }
    }

    #[test]
    fn layers_complete_in_order_when_every_warp_has_items_of_every_layer() {
        for ctas in [1u32, 12, 264] {
            let warps = u64::from(ctas * THREADS / 32);
            for run in [1u64, 4, 16] {
                for per_layer in [1u64, 32, 95, 96, 1536, 2048, 8192] {
                    let layers = 8;
                    let items = per_layer * layers;
                    let every = (0..warps).all(|w| {
                        let mut touched = vec![false; layers as usize];
                        for i in items_of(w, warps, items, run) {
                            touched[(i / per_layer) as usize] = true;
                        }
                        touched.iter().all(|&t| t)
                    });
                    if in_layer_order(per_layer, run, ctas) {
                        assert!(every, "{per_layer} per layer, runs of {run}, {ctas} blocks");
                    }
                }
            }
        }
        // 12 blocks: 96 warps.
        assert!(in_layer_order(96, 1, 12));
        assert!(!in_layer_order(95, 1, 12));
        assert!(!in_layer_order(96, 2, 12));
        assert!(in_layer_order(32, 1, 1));
    }

    #[test]
    fn a_warp_crosses_few_layer_boundaries_device_to_device() {
        // 256 MiB of 4 KiB pieces in 32 layers on a full wave of an H200 (2112 warps): with
        // single items each warp touches 31 layers, with the runs `run_len` picks at most two.
        let (warps, per_layer) = (2112u64, 2048u64);
        let items = 32 * per_layer;
        let layers_of = |w, run| {
            let mut l: Vec<u64> = items_of(w, warps, items, run)
                .iter()
                .map(|i| i / per_layer)
                .collect();
            l.dedup();
            l.len()
        };
        assert_eq!(layers_of(0, 1), 32);
        let run = run_len(Direction::DeviceToDevice, 4096, items, warps);
        assert!((0..warps).all(|w| layers_of(w, run) <= 2));
    }

    #[test]
    fn list_entries_cover_every_byte_once_in_pieces() {
        let copies = [
            CopyOp {
                src: 0x1000,
                dst: 0x9000_0000,
                len: 4096,
            },
            CopyOp {
                src: 0x10_0000,
                dst: 0x20_0000,
                len: 2 * PIECE + 24,
            },
            CopyOp {
                src: 7,
                dst: 9,
                len: PIECE,
            },
        ];
        let ops: Vec<[u64; 3]> = list_ops(copies.iter().copied()).collect();
        assert_eq!(
            ops,
            vec![
                [0x1000, 0x9000_0000, 4096],
                [0x10_0000, 0x20_0000, PIECE],
                [0x10_0000 + PIECE, 0x20_0000 + PIECE, PIECE],
                [0x10_0000 + 2 * PIECE, 0x20_0000 + 2 * PIECE, 24],
                [7, 9, PIECE],
            ]
        );
        let n: u64 = copies.iter().map(|c| c.len.div_ceil(PIECE)).sum();
        assert_eq!(ops.len() as u64, n);
    }

    #[test]
    fn pieces_of_4_kib_and_more_take_the_lean_loop_and_huge_counts_the_wide_one() {
        assert_eq!(ItemLoop::of(false, 4096, 1 << 20), ItemLoop::Lean);
        assert_eq!(
            ItemLoop::of(false, 2 << 20, u64::from(u32::MAX)),
            ItemLoop::Lean
        );
        assert_eq!(ItemLoop::of(false, 2048, 1 << 20), ItemLoop::SmallPieces);
        assert_eq!(ItemLoop::of(true, 64 << 10, 1 << 20), ItemLoop::SmallPieces);
        assert_eq!(ItemLoop::of(false, 4096, 1 << 32), ItemLoop::Wide);
        assert_eq!(ItemLoop::of(true, 256, 1 << 40), ItemLoop::Wide);
    }

    /// Reads id `i` of the table's pair list the way copy_blocks.cu's `block_id` does.
    fn id(ids: &[u64], width: usize, i: usize) -> u64 {
        let bytes: Vec<u8> = ids.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&bytes[i * width..(i + 1) * width]);
        u64::from_le_bytes(v)
    }

    #[test]
    fn tables_hold_bases_then_pairs_at_each_id_width() {
        for (width, max) in [(2, (1u64 << 16) - 1), (4, (1 << 32) - 1), (8, u64::MAX)] {
            for pairs in [0usize, 1, 2, 3, 7] {
                let src: Vec<u64> = (0..pairs as u64).map(|i| max - 2 * i).collect();
                let dst: Vec<u64> = (0..pairs as u64).map(|i| i * 3).collect();
                let bases = [0x1000, 0x2000, 0x3000];
                let words = bases.len() + (2 * pairs * width).div_ceil(8);
                let mut out = vec![u64::MAX; words];
                out[..3].copy_from_slice(&bases);
                write_ids(&mut out[3..], &src, &dst, width);
                assert_eq!(out[..3], bases);
                for p in 0..pairs {
                    assert_eq!(id(&out[3..], width, 2 * p), src[p], "width {width}");
                    assert_eq!(id(&out[3..], width, 2 * p + 1), dst[p], "width {width}");
                }
                // Padding after an odd number of u16 pairs is zero, not stale.
                if width == 2 && pairs % 2 == 1 {
                    assert_eq!(out[words - 1] >> 32, 0);
                }
            }
        }
    }
}
