// Runs the copy kernel's source (src/exec/cuda/copy_blocks.cu) on the CPU under simt.h's
// lane-lockstep emulation and checks every byte it writes against a plain reference copy:
// layout kinds, id widths, pieces of a region, head-transform pieces, layer ranges, grids, the
// per-layer counts, and the list kernel. Built and run by tests/kernel_emulation.rs (with
// AddressSanitizer and UBSan there, so that an access outside the layouts fails too). Prints
// "N cases, F failures" and exits non-zero on any failure.
#include "simt.h"

#include "../../src/exec/cuda/copy_blocks.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

namespace {

// Runs `body` as every warp of a grid of `blocks` blocks of 256 threads, one warp after the
// other, on 32 lane threads: the kernel's loops are warp-uniform, so its lanes leave each
// warp's call together.
template <class F>
void run_grid(unsigned blocks, F body) {
  blockDim.x = 256;
  gridDim.x = blocks;
  WarpSync ws;
  g_warp = &ws;
  std::vector<std::thread> lanes;
  for (unsigned lane = 0; lane < 32; ++lane) {
    lanes.emplace_back([&, lane] {
      for (unsigned b = 0; b < blocks; ++b) {
        for (unsigned w = 0; w < 8; ++w) {
          blockIdx.x = b;
          threadIdx.x = w * 32 + lane;
          body();
          ws.bar.arrive_and_wait();
        }
      }
    });
  }
  for (auto& t : lanes) t.join();
}

// One layout: its allocations (one for FC, one per layer for LS), exactly as large as the
// kind needs, so that AddressSanitizer sees any access outside them.
struct Layout {
  u64 kind, blocks, layers, outer, region;
  std::vector<unsigned char*> allocs;
  u64 alloc_len;

  Layout(u64 kind_, u64 blocks_, u64 layers_, u64 outer_, u64 region_)
      : kind(kind_), blocks(blocks_), layers(layers_), outer(outer_), region(region_) {
    const u64 n = kind == KVX_FC ? 1 : layers;
    alloc_len = kind == KVX_FC ? blocks * layers * outer * region : blocks * outer * region;
    for (u64 i = 0; i < n; ++i) {
      // 16-byte aligned, as the layouts kvxfer makes and wraps are for the kernel.
      auto* p = static_cast<unsigned char*>(std::aligned_alloc(16, (alloc_len + 15) / 16 * 16));
      allocs.push_back(p);
    }
  }
  ~Layout() {
    for (auto* p : allocs) std::free(p);
  }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;

  u64 block_stride() const {
    if (kind == KVX_FC) return layers * outer * region;
    if (kind == KVX_LS_BLOCK_FIRST) return outer * region;
    return region;
  }
  unsigned char* at(u64 b, u64 l, u64 o) const {
    if (kind == KVX_FC) return allocs[0] + b * block_stride() + (l * outer + o) * region;
    if (kind == KVX_LS_BLOCK_FIRST) return allocs[l] + b * block_stride() + o * region;
    return allocs[l] + o * blocks * region + b * region;
  }
  Side side(u64 bases_at) const {
    return Side{kind, blocks, block_stride(), region, bases_at};
  }
  void fill(std::mt19937_64& rng) {
    for (auto* p : allocs)
      for (u64 i = 0; i < alloc_len; ++i) p[i] = static_cast<unsigned char>(rng());
  }
  std::vector<unsigned char> bytes() const {
    std::vector<unsigned char> out;
    for (auto* p : allocs) out.insert(out.end(), p, p + alloc_len);
    return out;
  }
};

struct Piece {
  u64 src, dst, len;
};

struct Case {
  u64 src_kind, dst_kind, region, piece, id_bytes, layer_begin, layers_moved;
  unsigned blocks;
  bool transform;
  u64 run;  // consecutive items per run of a warp (kernel.rs `run_len`)
  // The item loop (copy_items' template): 0 32-bit, 1 32-bit with the small-piece path,
  // 2 64-bit with it. Every loop copies every piece size right; the host picks by speed.
  int loop;
};

// The (src id, dst id) pairs packed `width` bytes per id, little-endian, after the bases.
void put_ids(std::vector<u64>& t, const std::vector<u64>& sb, const std::vector<u64>& db,
             u64 width) {
  std::vector<unsigned char> raw;
  for (size_t i = 0; i < sb.size(); ++i)
    for (u64 id : {sb[i], db[i]})
      for (u64 k = 0; k < width; ++k) raw.push_back(static_cast<unsigned char>(id >> (8 * k)));
  raw.resize((raw.size() + 7) / 8 * 8, 0);
  for (size_t i = 0; i < raw.size(); i += 8) {
    u64 w;
    std::memcpy(&w, raw.data() + i, 8);
    t.push_back(w);
  }
}

bool run_case(const Case& c, std::mt19937_64& rng) {
  const u64 layers = 4, outer = 2, nb = 37, pairs = 23;
  Layout src(c.src_kind, nb, layers, outer, c.region);
  Layout dst(c.dst_kind, nb, layers, outer, c.region);
  src.fill(rng);
  dst.fill(rng);
  std::vector<u64> ids(nb);
  for (u64 i = 0; i < nb; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<u64> sb(ids.begin(), ids.begin() + pairs);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<u64> db(ids.begin(), ids.begin() + pairs);

  // A head transform's pieces: the two halves of each region swapped, the second cut in two.
  std::vector<Piece> pieces;
  if (c.transform) {
    const u64 h = c.region / 2, q = h / 2;
    pieces = {{0, h, h}, {h, 0, q}, {h + q, q, h - q}};
  }
  std::vector<u64> t;
  for (auto* p : src.allocs) t.push_back(reinterpret_cast<u64>(p));
  for (auto* p : dst.allocs) t.push_back(reinterpret_cast<u64>(p));
  const u64 pair_ids = t.size();
  put_ids(t, sb, db, c.id_bytes);
  const u64 pieces_at = c.transform ? t.size() : 0;
  for (const auto& p : pieces) t.insert(t.end(), {p.src, p.dst, p.len});

  const u64 ppr = c.transform ? pieces.size() : (c.region + c.piece - 1) / c.piece;
  std::vector<unsigned> counters(c.layers_moved, 0);
  Desc d{};
  d.src = src.side(0);
  d.dst = dst.side(src.allocs.size());
  d.region = c.region;
  d.outer = outer;
  d.layer_begin = c.layer_begin;
  d.layers = c.layers_moved;
  d.piece = c.piece;
  d.pieces_per_region = ppr;
  d.pairs = pairs;
  d.pair_ids = pair_ids;
  d.id_bytes = c.id_bytes;
  d.items = pairs * c.layers_moved * outer * ppr;
  d.signals = reinterpret_cast<u64>(counters.data());
  d.system_fence = 0;
  d.pieces = pieces_at;
  d.run = c.run;

  // The reference: what the destination must hold afterwards.
  std::vector<std::vector<unsigned char>> want_allocs;
  for (auto* p : dst.allocs) want_allocs.emplace_back(p, p + dst.alloc_len);
  auto want_at = [&](u64 b, u64 l, u64 o) {
    const u64 off = dst.at(b, l, o) - dst.allocs[dst.kind == KVX_FC ? 0 : l];
    return want_allocs[dst.kind == KVX_FC ? 0 : l].data() + off;
  };
  for (u64 l = c.layer_begin; l < c.layer_begin + c.layers_moved; ++l)
    for (u64 i = 0; i < pairs; ++i)
      for (u64 o = 0; o < outer; ++o) {
        if (c.transform) {
          for (const auto& p : pieces)
            std::memcpy(want_at(db[i], l, o) + p.dst, src.at(sb[i], l, o) + p.src, p.len);
        } else {
          std::memcpy(want_at(db[i], l, o), src.at(sb[i], l, o), c.region);
        }
      }

  run_grid(c.blocks, [&] {
    if (c.loop == 0) copy_items<unsigned, false>(d, t.data());
    if (c.loop == 1) copy_items<unsigned, true>(d, t.data());
    if (c.loop == 2) copy_items<u64, true>(d, t.data());
  });

  bool ok = true;
  for (size_t a = 0; a < dst.allocs.size(); ++a)
    if (std::memcmp(dst.allocs[a], want_allocs[a].data(), dst.alloc_len) != 0) ok = false;
  for (u64 l = 0; l < c.layers_moved; ++l)
    if (counters[l] != pairs * outer * ppr) ok = false;
  if (!ok) {
    std::printf("FAIL kinds %llu->%llu region %llu piece %llu ids %llu layers [%llu, +%llu) "
                "blocks %u transform %d run %llu loop %d; counters",
                c.src_kind, c.dst_kind, c.region, c.piece, c.id_bytes, c.layer_begin,
                c.layers_moved, c.blocks, c.transform, c.run, c.loop);
    for (auto n : counters) std::printf(" %u", n);
    std::printf(" (want %llu each)\n", pairs * outer * ppr);
  }
  return ok;
}

// The list kernel: copies of assorted lengths and alignments between two buffers.
bool run_list(std::mt19937_64& rng, unsigned blocks) {
  const size_t len = 1 << 20;
  std::vector<unsigned char> a(len), b(len), want;
  for (auto& x : a) x = static_cast<unsigned char>(rng());
  for (auto& x : b) x = static_cast<unsigned char>(rng());
  want = b;
  std::vector<u64> ops;
  u64 at = 0;
  for (u64 n : {16ull, 4096ull, 64ull << 10, 100ull, 7ull, 8192ull + 48, 4096ull}) {
    const u64 s = at + (n % 3), dd = len - at - n - 16;
    ops.insert(ops.end(), {reinterpret_cast<u64>(a.data() + s), reinterpret_cast<u64>(b.data() + dd), n});
    std::memcpy(want.data() + dd, a.data() + s, n);
    at += n + 32;
  }
  List l{reinterpret_cast<u64>(ops.data()), ops.size() / 3};
  run_grid(blocks, [&] { copy_list(l); });
  const bool ok = b == want;
  if (!ok) std::printf("FAIL list kernel on %u blocks\n", blocks);
  return ok;
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261201);
  int cases = 0, failures = 0;
  const u64 kinds[][2] = {{KVX_LS_BLOCK_FIRST, KVX_LS_BLOCK_FIRST},
                          {KVX_FC, KVX_LS_OUTER_FIRST},
                          {KVX_LS_OUTER_FIRST, KVX_FC}};
  for (const auto& k : kinds) {
    // 64 B: the batched small-piece copy; 1040 B: pieces that are no power of two of 16-byte
    // chunks; 4 KiB and 8 KiB + 48: one warp per piece, with a tail.
    for (u64 region : {64ull, 1040ull, 4096ull, 8240ull}) {
      for (u64 width : {2ull, 4ull, 8ull}) {
        for (bool transform : {false, true}) {
          Case c{};
          c.src_kind = k[0];
          c.dst_kind = k[1];
          c.region = region;
          // Regions cut into pieces (as short transfers are) or whole.
          c.piece = (rng() & 1) && region >= 128 ? (region / 2 + 15) / 16 * 16 : region;
          c.id_bytes = width;
          c.layer_begin = rng() % 2;
          c.layers_moved = 4 - c.layer_begin - rng() % 2;
          c.blocks = (rng() & 1) ? 1 : 3;
          c.transform = transform;
          // Runs of 1 (host <-> device) to 32 items; 23 pairs x 2 x pieces make 46 to 552
          // items, so some runs leave warps idle and some batches end inside a run.
          for (u64 run : {1ull, 2ull, 4ull, 16ull, 32ull}) {
            c.run = run;
            c.loop = cases % 3;
            ++cases;
            failures += !run_case(c, rng);
          }
        }
      }
    }
  }
  for (unsigned blocks : {1u, 2u}) {
    ++cases;
    failures += !run_list(rng, blocks);
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
