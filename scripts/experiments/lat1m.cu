// Session 14's experiment: the floor of one layer's reload, host to device (issue: busy engine,
// point 5: 1 MiB = 32 scattered blocks x K,V x 16 KiB, submit -> wait p50 <= 30 us). On the GPU
// machine, from the repository root:
//   nvcc -O3 -arch=sm_90 -o /tmp/lat1m scripts/experiments/lat1m.cu -lcuda && /tmp/lat1m
// For each way of moving the layer it prints, over 2000 rounds after 200 warm-up ones: the wall
// time from the first enqueue to the completion seen by a thread spinning on an event (p50, p99),
// the host time of the enqueue calls alone (p50), and the device time of the same work held
// behind a stream until it was all queued (p50). Layers rotate over 32 (256 MiB each side, as
// `bench --gpu --latency` does), 32 of 256 blocks picked the same way. Every way is checked to
// have moved every byte first. The ways: an empty kernel (the launch's own round trip), one
// contiguous copy-engine copy of the same MiB (the bench's "raw copy"), 64 copy-engine copies
// and one cudaMemcpyBatchAsync of the 64 pieces, kvxfer's kernel (copy_blocks.cu included, its
// lean entry with the table in the parameter), a plain warp-per-piece copy with 1-8 KiB items
// on 16-128 blocks, the same with an L2 prefetch-size hint on each load, and Hopper bulk
// copies (TMA) through shared memory. Session 14, device runs 2 (the first version: no hinted
// or bulk ways, and the check of the copy-engine ways raced with the memset before it, which
// printed WRONG) and 3 (this program): docs/BENCHMARKS.md, "Session 14".
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "../../src/exec/cuda/copy_blocks.cu"
#include "common.cuh"

#define CU(x)                                                  \
  do {                                                         \
    CUresult e = (x);                                          \
    if (e != CUDA_SUCCESS) {                                   \
      fprintf(stderr, "%s:%d %s: %d\n", __FILE__, __LINE__, #x, (int)e); \
      exit(1);                                                 \
    }                                                          \
  } while (0)

constexpr unsigned BLOCKS = 256, LAYERS = 32, PICK = 32, REGION = 16384;
constexpr size_t BLOCK_STRIDE = 2 * REGION, LAYER_BYTES = BLOCKS * BLOCK_STRIDE;
constexpr size_t TOTAL = LAYER_BYTES * LAYERS, BYTES = PICK * BLOCK_STRIDE;

// The layer's 64 pieces as pointers, in the kernel parameter.
struct Ptrs {
  const char* src[2 * PICK];
  char* dst[2 * PICK];
};

// LOADS 16-byte loads in flight per lane, each with the L2 hint HINT (common.cuh): a
// warp-item is 512 x LOADS bytes of one piece.
template <int LOADS, int HINT>
__global__ void __launch_bounds__(256) plain(const __grid_constant__ Ptrs p) {
  constexpr unsigned ITEM = 512 * LOADS, PER = REGION / ITEM;
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const unsigned warps = (gridDim.x * blockDim.x) >> 5;
  for (unsigned i = warp; i < 2 * PICK * PER; i += warps) {
    const uint4* s = (const uint4*)(p.src[i / PER] + (i % PER) * ITEM) + lane;
    uint4* d = (uint4*)(p.dst[i / PER] + (i % PER) * ITEM) + lane;
    uint4 v[LOADS];
#pragma unroll
    for (int k = 0; k < LOADS; ++k) v[k] = load16<HINT>(s + 32 * k);
#pragma unroll
    for (int k = 0; k < LOADS; ++k) d[32 * k] = v[k];
  }
}

// Hopper's bulk copy (TMA) through shared memory: one warp a block, its lane 0 loads CHUNK
// bytes of a piece into shared memory (cp.async.bulk, completing on an mbarrier) and stores
// them with a second bulk copy. The copy engine of each SM may ask the link for larger pieces
// than loads do.
template <unsigned CHUNK>
__global__ void __launch_bounds__(32) bulk(const __grid_constant__ Ptrs p) {
  extern __shared__ __align__(128) char buf[];
  __shared__ __align__(8) unsigned long long bar;
  constexpr unsigned PER = REGION / CHUNK;
  const unsigned b = (unsigned)__cvta_generic_to_shared(&bar);
  const unsigned sb = (unsigned)__cvta_generic_to_shared(buf);
  if (threadIdx.x != 0) return;
  asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(b));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  unsigned phase = 0;
  for (unsigned i = blockIdx.x; i < 2 * PICK * PER; i += gridDim.x) {
    const char* src = p.src[i / PER] + (i % PER) * CHUNK;
    char* dst = p.dst[i / PER] + (i % PER) * CHUNK;
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(b), "r"(CHUNK) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(sb),
        "l"(src), "r"(CHUNK), "r"(b)
        : "memory");
    unsigned done = 0;
    while (!done) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(b), "r"(phase)
          : "memory");
    }
    phase ^= 1;
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(sb),
                 "r"(CHUNK)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

__global__ void empty() {}

static double pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[(size_t)((v.size() - 1) * p + 0.5)];
}

int main() {
  CK(cudaSetDevice(0));
  CK(cudaFree(0));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  char *host, *dev;
  CK(cudaHostAlloc(&host, TOTAL, cudaHostAllocPortable));
  CK(cudaMalloc(&dev, TOTAL));
  for (size_t i = 0; i < TOTAL; i += 8) *(unsigned long long*)(host + i) = i * 0x9E3779B97F4A7C15ull;
  // The gate: the stream waits on a pinned word until everything is queued.
  unsigned* flag;
  CK(cudaHostAlloc(&flag, 64, cudaHostAllocMapped | cudaHostAllocPortable));
  CUdeviceptr flag_dev;
  CU(cuMemHostGetDevicePointer(&flag_dev, flag, 0));
  *flag = 0;
  unsigned gate_value = 0;
  cudaEvent_t done, g0, g1;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CK(cudaEventCreate(&g0));
  CK(cudaEventCreate(&g1));
  std::vector<unsigned> src_ids(BLOCKS), dst_ids(BLOCKS);
  for (unsigned i = 0; i < BLOCKS; ++i) src_ids[i] = dst_ids[i] = i;
  std::mt19937_64 rng(3);
  std::shuffle(src_ids.begin(), src_ids.end(), rng);
  std::shuffle(dst_ids.begin(), dst_ids.end(), rng);
  // Round r's layer and blocks, as the bench picks them.
  auto pick = [&](unsigned r, unsigned& layer, const unsigned*& sb, const unsigned*& db) {
    const unsigned k = (r * PICK) % (BLOCKS - PICK + 1);
    layer = r % LAYERS;
    sb = &src_ids[k];
    db = &dst_ids[k];
  };
  auto piece = [&](char* base, unsigned layer, unsigned block, unsigned o) {
    return base + layer * LAYER_BYTES + block * BLOCK_STRIDE + o * REGION;
  };
  auto ptrs = [&](unsigned r) {
    unsigned l;
    const unsigned *sb, *db;
    pick(r, l, sb, db);
    Ptrs p;
    for (unsigned b = 0; b < PICK; ++b)
      for (unsigned o = 0; o < 2; ++o) {
        p.src[2 * b + o] = piece(host, l, sb[b], o);
        p.dst[2 * b + o] = piece(dev, l, db[b], o);
      }
    return p;
  };
  // kvxfer's own kernel (the lean loop, table in the parameter) for round r.
  auto lib = [&](unsigned r, unsigned ctas, cudaStream_t s) {
    unsigned l;
    const unsigned *sb, *db;
    pick(r, l, sb, db);
    Inline<KVX_INLINE_TINY> p = {};
    for (unsigned i = 0; i < LAYERS; ++i) {
      p.table[i] = (u64)(host + i * LAYER_BYTES);
      p.table[LAYERS + i] = (u64)(dev + i * LAYER_BYTES);
    }
    unsigned short* ids = (unsigned short*)(p.table + 2 * LAYERS);
    for (unsigned b = 0; b < PICK; ++b) {
      ids[2 * b] = sb[b];
      ids[2 * b + 1] = db[b];
    }
    Desc& d = p.d;
    d.src = Side{KVX_LS_BLOCK_FIRST, BLOCKS, BLOCK_STRIDE, REGION, 0};
    d.dst = Side{KVX_LS_BLOCK_FIRST, BLOCKS, BLOCK_STRIDE, REGION, LAYERS};
    d.region = REGION; d.outer = 2; d.layer_begin = l; d.layers = 1; d.piece = 4096;
    d.pieces_per_region = REGION / 4096; d.pairs = PICK; d.pair_ids = 2 * LAYERS;
    d.id_bytes = 2; d.items = PICK * 2 * (REGION / 4096); d.run = 1;
    kvx_copy_blocks_p1k<<<ctas, 256, 0, s>>>(p);
  };
  struct Way {
    std::string name;
    std::function<void(unsigned, cudaStream_t)> go;
  };
  std::vector<Way> ways;
  ways.push_back({"empty kernel", [&](unsigned, cudaStream_t s) { empty<<<1, 32, 0, s>>>(); }});
  ways.push_back({"ce contiguous 1 MiB", [&](unsigned r, cudaStream_t s) {
                    unsigned l = r % LAYERS;
                    CK(cudaMemcpyAsync(dev + l * LAYER_BYTES, host + l * LAYER_BYTES, BYTES,
                                       cudaMemcpyHostToDevice, s));
                  }});
  ways.push_back({"ce 64 x 16 KiB", [&](unsigned r, cudaStream_t s) {
                    Ptrs p = ptrs(r);
                    for (unsigned i = 0; i < 2 * PICK; ++i)
                      CK(cudaMemcpyAsync(p.dst[i], p.src[i], REGION, cudaMemcpyHostToDevice, s));
                  }});
#if CUDART_VERSION >= 12080
  ways.push_back({"ce batch 64 x 16 KiB", [&](unsigned r, cudaStream_t s) {
                    Ptrs p = ptrs(r);
                    void* d[2 * PICK];
                    const void* sp[2 * PICK];
                    size_t sz[2 * PICK];
                    for (unsigned i = 0; i < 2 * PICK; ++i) {
                      d[i] = p.dst[i];
                      sp[i] = p.src[i];
                      sz[i] = REGION;
                    }
                    cudaMemcpyAttributes a = {};
                    a.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
                    a.flags = cudaMemcpyFlagPreferOverlapWithCompute;
                    size_t idx = 0;
#if CUDART_VERSION >= 13000
                    CK(cudaMemcpyBatchAsync(d, sp, sz, 2 * PICK, &a, &idx, 1, s));
#else
                    size_t fail = 0;
                    CK(cudaMemcpyBatchAsync(d, (void**)sp, sz, 2 * PICK, &a, &idx, 1, &fail, s));
#endif
                  }});
#endif
  for (unsigned ctas : {32u}) {
    ways.push_back({"lib lean 4 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { lib(r, ctas, s); }});
  }
  for (unsigned ctas : {32u, 64u}) {
    ways.push_back({"plain 4 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<8, 0><<<ctas, 256, 0, s>>>(ptrs(r)); }});
    ways.push_back({"plain 2 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<4, 0><<<ctas, 256, 0, s>>>(ptrs(r)); }});
    ways.push_back({"plain 1 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<2, 0><<<ctas, 256, 0, s>>>(ptrs(r)); }});
  }
  for (unsigned ctas : {32u, 64u}) {
    ways.push_back({"L2::128B 4 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<8, 128><<<ctas, 256, 0, s>>>(ptrs(r)); }});
    ways.push_back({"L2::256B 4 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<8, 256><<<ctas, 256, 0, s>>>(ptrs(r)); }});
    ways.push_back({"L2::256B 2 KiB items, " + std::to_string(ctas) + " blocks",
                    [&, ctas](unsigned r, cudaStream_t s) { plain<4, 256><<<ctas, 256, 0, s>>>(ptrs(r)); }});
  }
  ways.push_back({"bulk 16 KiB, 64 blocks",
                  [&](unsigned r, cudaStream_t s) { bulk<16384><<<64, 32, 16384, s>>>(ptrs(r)); }});
  ways.push_back({"bulk 4 KiB, 256 blocks",
                  [&](unsigned r, cudaStream_t s) { bulk<4096><<<256, 32, 4096, s>>>(ptrs(r)); }});
  ways.push_back({"bulk 2 KiB, 512 blocks",
                  [&](unsigned r, cudaStream_t s) { bulk<2048><<<512, 32, 2048, s>>>(ptrs(r)); }});
  ways.push_back({"plain 8 KiB items, 16 blocks",
                  [&](unsigned r, cudaStream_t s) { plain<16, 0><<<16, 256, 0, s>>>(ptrs(r)); }});
  printf("# layer %zu bytes, %u pieces of %u; %u rounds\n", BYTES, 2 * PICK, REGION, 2000);
  printf("%-36s %8s %8s %10s %10s %10s\n", "way", "p50", "p99", "enqueue", "device", "sync p50");
  std::vector<char> check(BYTES);
  for (auto& w : ways) {
    // Correctness: round 5's pieces arrive.
    if (w.name != "empty kernel") {
      CK(cudaMemset(dev, 0, TOTAL));
      CK(cudaDeviceSynchronize());
      w.go(5, st);
      CK(cudaStreamSynchronize(st));
      size_t bad = 0;
      if (w.name.rfind("ce contiguous", 0) == 0) {
        unsigned l = 5 % LAYERS;
        CK(cudaMemcpy(check.data(), dev + l * LAYER_BYTES, BYTES, cudaMemcpyDeviceToHost));
        bad = memcmp(check.data(), host + l * LAYER_BYTES, BYTES) != 0;
      } else {
        Ptrs p = ptrs(5);
        for (unsigned i = 0; i < 2 * PICK; ++i) {
          CK(cudaMemcpy(check.data(), p.dst[i], REGION, cudaMemcpyDeviceToHost));
          bad += memcmp(check.data(), p.src[i], REGION) != 0;
        }
      }
      if (bad) printf("# WRONG: %s left %zu pieces uncopied\n", w.name.c_str(), bad);
    }
    std::vector<double> wall, enq, devt, sync;
    using clk = std::chrono::steady_clock;
    for (unsigned r = 0; r < 2200; ++r) {
      // Submit -> completion seen by spinning on an event.
      auto t0 = clk::now();
      w.go(r, st);
      CK(cudaEventRecord(done, st));
      auto t1 = clk::now();
      while (cudaEventQuery(done) == cudaErrorNotReady) {
      }
      auto t2 = clk::now();
      // The same with a stream synchronize.
      auto t3 = clk::now();
      w.go(r + 7, st);
      CK(cudaStreamSynchronize(st));
      auto t4 = clk::now();
      // Device time: held behind the gate until queued.
      ++gate_value;
      CU(cuStreamWaitValue32((CUstream)st, flag_dev, gate_value, CU_STREAM_WAIT_VALUE_GEQ));
      CK(cudaEventRecord(g0, st));
      w.go(r + 13, st);
      CK(cudaEventRecord(g1, st));
      __atomic_store_n(flag, gate_value, __ATOMIC_RELEASE);
      CK(cudaEventSynchronize(g1));
      float ms;
      CK(cudaEventElapsedTime(&ms, g0, g1));
      if (r >= 200) {
        wall.push_back(std::chrono::duration<double, std::micro>(t2 - t0).count());
        enq.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        sync.push_back(std::chrono::duration<double, std::micro>(t4 - t3).count());
        devt.push_back(ms * 1000.0);
      }
    }
    printf("%-36s %8.1f %8.1f %10.1f %10.1f %10.1f\n", w.name.c_str(), pct(wall, 0.5),
           pct(wall, 0.99), pct(enq, 0.5), pct(devt, 0.5), pct(sync, 0.5));
    fflush(stdout);
  }
  return 0;
}
