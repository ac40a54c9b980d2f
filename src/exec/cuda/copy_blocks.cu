// kvxfer's SM copy kernel. It moves KV blocks between two layouts without a per-fragment list:
// the host passes both layouts' descriptors and the (source id, destination id) block pairs, and
// each warp computes the addresses of its (pair, layer, outer, piece) item with the same formulas
// as kvxfer's layout module. Host work is O(blocks), not O(fragments). Compiled with NVRTC at run
// time (or nvcc at build), the same source either way.
//
// The table (both layouts' bases, then the pairs) travels inside the kernel parameter where it
// fits (4 KB), so a transfer is one launch. A larger one is written into pinned host memory,
// which the kernel reads in place between host and device memory (kernel.rs says why) and as a
// copy uploaded to device memory device to device. The upload costs 10-14 us of GPU time
// before the kernel (H100, docs/BENCHMARKS.md, "GPU tiers, third pass"), but a 32 KB parameter
// cost more: the driver took 14-70 us of the submitting thread to launch it, and 1 GiB of
// 4 KiB pieces arrived 0.02-0.04 later than with the upload (H200, session 10, device run 6).
//
// A piece is copied by one warp with 16-byte accesses, eight in flight per lane, through plain
// loads and stores: evict-first (.cs) accesses ran device-to-device copies 3-4% slower on an
// H200 (docs/BENCHMARKS.md, "GPU tiers, second pass"), more blocks per SM or sixteen accesses in flight per lane did not help.
// Nor did (H100, 2026-11-26): 32-bit index math, lanes computing 32 items' addresses at once,
// contiguous item ranges per warp, two items in flight per warp, or Hopper bulk copies through
// shared memory (0.82-0.87 of a 1 GiB cudaMemcpy against 0.93-0.94 for this kernel).
typedef unsigned long long u64;

// Layout kinds, as kvxfer's LayoutKind.
#define KVX_FC 0u
#define KVX_LS_BLOCK_FIRST 1u
#define KVX_LS_OUTER_FIRST 2u

struct Side {
  u64 kind;
  u64 num_blocks;
  u64 block_stride;
  u64 region;  // bytes of one (block, layer, outer) piece of this side
  u64 bases;   // word index in the table of the bases: one for FC, one per layer for LS
};

struct Desc {
  Side src;
  Side dst;
  u64 region;             // bytes of one (block, layer, outer) piece
  u64 outer;              // outer_dim
  u64 layer_begin;
  u64 layers;             // layers in the transferred range
  u64 piece;              // bytes a warp copies at most per item
  u64 pieces_per_region;
  u64 pairs;              // number of block pairs
  u64 pair_ids;           // word index in the table of the (src id, dst id) pairs
  u64 id_bytes;           // 2, 4 or 8: the narrowest width both layouts' ids fit
  u64 items;              // pairs * layers * outer * pieces_per_region
  u64 table;              // the table's address on the device (kvx_copy_blocks, _wide only)
  u64 signals;            // device address of one u32 counter per layer in range, or 0
  u64 system_fence;       // 1: the destination is host memory (fence at system scope)
  u64 pieces;             // head transform: word index in the table of pieces_per_region
                          // (source offset, destination offset, length) triples; 0: none
  u64 run;                // consecutive items in one run of a warp: 1, 2, 4, 8, 16 or 32
};

// Table sizes, in u64 words, that fit the two inline kernels' parameters (1024 and 4096 bytes
// with the descriptor); kernel.rs mirrors these. The driver copies the whole
// parameter at each launch, so a small table takes the smallest.
#define KVX_INLINE_TINY 103
#define KVX_INLINE_SMALL 487

__device__ __forceinline__ u64 address(const Side& s, const u64* t, u64 outer, u64 b, u64 l,
                                       u64 o) {
  const u64* bases = t + s.bases;
  if (s.kind == KVX_FC) return bases[0] + b * s.block_stride + (l * outer + o) * s.region;
  if (s.kind == KVX_LS_BLOCK_FIRST) return bases[l] + b * s.block_stride + o * s.region;
  return bases[l] + o * s.num_blocks * s.region + b * s.region;
}

__device__ __forceinline__ u64 block_id(const Desc& d, const u64* t, u64 i) {
  const u64* ids = t + d.pair_ids;
  if (d.id_bytes == 2) return ((const unsigned short*)ids)[i];
  if (d.id_bytes == 4) return ((const unsigned*)ids)[i];
  return ids[i];
}

__device__ __forceinline__ void copy_piece(const char* src, char* dst, u64 len, unsigned lane) {
  if ((((u64)src | (u64)dst) & 15u) == 0) {
    const uint4* s = (const uint4*)src;
    uint4* d = (uint4*)dst;
    const u64 n = len >> 4;
    u64 j = lane;
    for (; j + 224 < n; j += 256) {
      uint4 v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = s[j + 32 * k];
#pragma unroll
      for (int k = 0; k < 8; ++k) d[j + 32 * k] = v[k];
    }
    for (; j < n; j += 32) d[j] = s[j];
    for (u64 k = (n << 4) + lane; k < len; k += 32) dst[k] = src[k];
  } else {
    for (u64 k = lane; k < len; k += 32) dst[k] = src[k];
  }
}

// An item's position: (piece, outer, pair, layer in range), piece fastest.
struct Pos {
  u64 piece, o, p, l;
};

// I: the index type of the division, 32-bit wherever the items fit (see the entry points).
template <typename I>
__device__ __forceinline__ Pos split(const Desc& d, I i) {
  const I per_region = (I)d.pieces_per_region, outer = (I)d.outer, pairs = (I)d.pairs;
  Pos x;
  x.piece = i % per_region;
  i /= per_region;
  x.o = i % outer;
  i /= outer;
  x.p = i % pairs;
  x.l = i / pairs;
  return x;
}

// Publishes `n` pieces of layer `lr` this warp copied: fenced first (at system scope when the
// destination is host memory), so that whoever sees the count sees the bytes.
__device__ __forceinline__ void count(const Desc& d, u64 lr, unsigned n, unsigned lane) {
  if (d.system_fence) {
    __threadfence_system();
  } else {
    __threadfence();
  }
  __syncwarp();
  if (lane == 0) atomicAdd((unsigned*)d.signals + lr, n);
}

// Counts one more piece of layer `lk` (in range) for this warp: the pieces counted so far go
// to their layer's counter first when `lk` is another layer. Pieces are counted before or after
// they are copied, but published only when the warp moves on to another layer or ends, after
// it copied them.
__device__ __forceinline__ void tally(const Desc& d, u64 lk, unsigned& pending, u64& counting,
                                      unsigned lane) {
  if (pending && lk != counting) {
    count(d, counting, pending, lane);
    pending = 0;
  }
  counting = lk;
  ++pending;
}

// Pieces under 4 KiB (a head of a token: 256 B to 2 KiB) one warp at a time would leave lanes
// idle and one load per lane in flight (copy_piece unrolls only from 4 KiB on): 1 KiB head
// slices moved at 0.6 of a plain copy. When the batch's n pieces (one per lane's src/dst/len)
// are all one power-of-two number of 16-byte chunks, aligned, the warp copies their chunks as
// one flat range instead: lanes take consecutive chunks (so each piece's chunks stay coalesced),
// eight loads in flight per lane. Returns whether it did.
__device__ __forceinline__ bool copy_small(u64 src, u64 dst, u64 len, unsigned n, unsigned lane) {
  const u64 m = __shfl_sync(0xffffffffu, len, 0);
  const bool fits = lane >= n || (len == m && ((src | dst) & 15u) == 0);
  const u64 per = m >> 4;
  if (!__all_sync(0xffffffffu, fits) || (m & 15u) != 0 || m >= 4096 || per == 0 ||
      (per & (per - 1)) != 0) {
    return false;
  }
  const unsigned shift = __ffsll((long long)per) - 1;
  const unsigned total = n << shift;
  for (unsigned q0 = 0; q0 < total; q0 += 256) {
    uint4 v[8];
    u64 to[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const unsigned q = q0 + 32u * u + lane;
      const unsigned item = (q >> shift) & 31u;
      const u64 s = __shfl_sync(0xffffffffu, src, item);
      const u64 dd = __shfl_sync(0xffffffffu, dst, item);
      const u64 c = (u64)(q & (unsigned)(per - 1)) << 4;
      if (q < total) v[u] = *(const uint4*)(s + c);
      to[u] = dd + c;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (q0 + 32u * u + lane < total) *(uint4*)to[u] = v[u];
    }
  }
  return true;
}

// Items run layer by layer (layer outermost). A warp owns runs of d.run consecutive items,
// runs w, w + warps, w + 2 warps, ... (with runs of one item: the items whose index is its own
// modulo the number of warps), and takes 32 of its items at a time, in ascending order, so
// that layers finish in order. Each lane works out one item's addresses, then the warp copies
// the 32 pieces one after the other, taking each one's addresses from its lane. Address
// arithmetic (divisions, table reads, the layout formulas) is then one pass per 32 pieces
// instead of one per piece: beside an engine whose warps take most issue slots, it was what
// limited the copy of small pieces. With signals, a warp adds the pieces of a layer to the
// layer's counter once they are in place, when it moves on to another layer (one fence per
// layer, not per piece: a fence per 4 KiB piece cost a fifth of device-to-device speed), and
// the host's stream waits for each counter to reach the layer's item count: per-layer
// completion from one launch. Runs longer than one item (kernel.rs, `run_len`) keep a warp in
// one layer for longer where layers have fewer items than the launch has warps.
template <typename I, bool SMALL>
__device__ __forceinline__ void copy_items(const Desc& d, const u64* t) {
  const unsigned lane = threadIdx.x & 31u;
  const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
  const u64 runs_per_batch = 32 / d.run;
  // This lane's run within a batch and its item within the run.
  const u64 j = lane / d.run, off = lane % d.run;
  unsigned pending = 0;
  u64 counting = 0;
  for (u64 b = 0; (b * runs_per_batch * warps + warp) * d.run < d.items; ++b) {
    // Items ascend with the lane, so the lanes that have one are 0 .. n - 1.
    const u64 mine = ((b * runs_per_batch + j) * warps + warp) * d.run + off;
    u64 src = 0, dst = 0, len = 0, lr = 0;
    if (mine < d.items) {
      const Pos x = split<I>(d, (I)mine);
      const u64 l = d.layer_begin + x.l;
      const u64 sb = block_id(d, t, 2 * x.p);
      const u64 db = block_id(d, t, 2 * x.p + 1);
      u64 src_off, dst_off;
      if (d.pieces) {
        const u64* pc = t + d.pieces + 3 * x.piece;
        src_off = pc[0];
        dst_off = pc[1];
        len = pc[2];
      } else {
        src_off = dst_off = x.piece * d.piece;
        len = min(d.piece, d.region - src_off);
      }
      src = address(d.src, t, d.outer, sb, l, x.o) + src_off;
      dst = address(d.dst, t, d.outer, db, l, x.o) + dst_off;
      lr = x.l;
    }
    const unsigned n = __popc(__ballot_sync(0xffffffffu, mine < d.items));
    if (SMALL && copy_small(src, dst, len, n, lane)) {
      if (d.signals) {
        for (unsigned k = 0; k < n; ++k) {
          tally(d, __shfl_sync(0xffffffffu, lr, k), pending, counting, lane);
        }
      }
      continue;
    }
    for (unsigned k = 0; k < n; ++k) {
      const u64 s = __shfl_sync(0xffffffffu, src, k);
      const u64 t2 = __shfl_sync(0xffffffffu, dst, k);
      const u64 m = __shfl_sync(0xffffffffu, len, k);
      if (d.signals) tally(d, __shfl_sync(0xffffffffu, lr, k), pending, counting, lane);
      copy_piece((const char*)s, (char*)t2, m, lane);
    }
  }
  if (d.signals && pending) count(d, counting, pending, lane);
}

template <int WORDS>
struct Inline {
  Desc d;
  u64 table[WORDS];
};

// The entry points: the table in memory (kvx_copy_blocks), or inside the parameter
// (_p1k, _p4k): __grid_constant__ lets the warps read it in place (constant cache)
// instead of each thread copying the parameter to local memory.
//
// Each in two item loops, and a third for the rest: 32-bit index math without the small-piece
// path (pieces of 4 KiB and more), 32-bit with it (_small: head transforms, regions under
// 4 KiB), and 64-bit with it (kvx_copy_blocks_wide, table in memory: more than 2^32
// items). One loop with 64-bit divisions and copy_small moved 4 KiB pieces between host and
// device beside a tensor-core load at 0.07 of the link per block (8 blocks: 0.56-0.63), where
// the same loop without both, or a plain warp-per-piece copy, moved 0.90-0.97 on 8 blocks
// (H200, session 13, device runs 2-5; either change alone did not help, nor did it take the
// blocks onto separate SMs, which they already were). Idle, all of them reach the link.
#define KVX_BLOCK_ENTRIES(SUFFIX, I, SMALL)                                                    \
  extern "C" __global__ void __launch_bounds__(256) kvx_copy_blocks##SUFFIX(const Desc d) {    \
    copy_items<I, SMALL>(d, (const u64*)d.table);                                             \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256)                                           \
      kvx_copy_blocks_p1k##SUFFIX(const __grid_constant__ Inline<KVX_INLINE_TINY> p) {         \
    copy_items<I, SMALL>(p.d, p.table);                                                       \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256)                                           \
      kvx_copy_blocks_p4k##SUFFIX(const __grid_constant__ Inline<KVX_INLINE_SMALL> p) {        \
    copy_items<I, SMALL>(p.d, p.table);                                                       \
  }

KVX_BLOCK_ENTRIES(, unsigned, false)
KVX_BLOCK_ENTRIES(_small, unsigned, true)

extern "C" __global__ void __launch_bounds__(256) kvx_copy_blocks_wide(const Desc d) {
  copy_items<u64, true>(d, (const u64*)d.table);
}

// A list of (source address, destination address, length) copies, three words each, in device
// memory: the two-hop path's hop between device memory and a pinned bounce buffer, whose pieces
// follow no layout. One warp per copy; the host cuts copies to at most 64 KiB. On copy engines
// a 16 MiB chunk of 4 KiB copies took milliseconds of driver time to queue and ran at ~9 GB/s
// (docs/BENCHMARKS.md, "GPU ↔ disk and GPU ↔ peer"), which left the disk waiting.
struct List {
  u64 ops;  // device address of the copies
  u64 n;
};

__device__ __forceinline__ void copy_list(const List& l) {
  const u64* ops = (const u64*)l.ops;
  const unsigned lane = threadIdx.x & 31u;
  const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
  for (u64 i = warp; i < l.n; i += warps) {
    copy_piece((const char*)ops[3 * i], (char*)ops[3 * i + 1], ops[3 * i + 2], lane);
  }
}

extern "C" __global__ void __launch_bounds__(256) kvx_copy_list(const List l) { copy_list(l); }
