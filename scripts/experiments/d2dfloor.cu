// The best a kvxfer-shaped device-to-device transfer can do from submit to completion on this
// machine, and kvxfer beside it (issue: busy engine, point 5: D2D >= 0.90 of one large copy as
// a runtime sees it). The same 1 GiB as `bench --gpu --quick --directions d2d` (layer-separate,
// 32 layers x K,V, 4096 / 1024 / 512 / 256 blocks of 4 / 16 / 32 / 64 KiB pieces, shuffled ids
// on both sides) moves with a bare kernel that has nothing kvxfer's has beyond what any such
// transfer needs (its ids checked as kvxfer must: every id below the block count, no
// destination twice; packed into a pinned table, uploaded, one launch, an event, a thread
// spinning on the event) and with kvxfer through the C API (wrapped layouts, AUTO). Columns,
// each a median of 25 rounds after 3 warm-up ones, every measurement right after an untimed
// copy of the whole GiB (the bench's `warm`), the columns' order rotating from round to round:
//   ce                    one contiguous copy-engine copy seen done (the bench's `limit`)
//   +check                the checked bare kernel, submit to seen done
//   gated +check          queued first (a wait on a host-written flag, the upload, the
//                         launch), then the ids checked and packed, then the flag released
//   +check greatest       the same on a stream of the greatest priority (as kvxfer's)
//   +check blocking       spun on a blocking-sync event instead of a plain one
//   +check, then blocking spun on a plain event recorded before a blocking-sync one
//   +check, sleeper       the same while another thread sleeps on the blocking-sync one (as
//                         kvxfer's progress engine)
//   held ...              device time behind a stream held until everything is queued (the
//                         launch hidden, as `bench --gpu`'s device time), entered and left
//                         through events on a second stream (of the greatest priority, and/or
//                         with blocking-sync events: `greatest`, `blocking`, `both`); kvxfer's
//                         held columns gate it on the held stream
//   kvxfer                submit -> wait -> free through the C API; `submit`: the call alone
//   argv[k]               kvxfer in a context of its own: a .cu file is an experiment build's
//                         kernel source (KVX_EXP_KERNEL, checked once against the source by
//                         checksums); any other argument names an experiment build's switch,
//                         set while the context is made and while it submits
// and per process the launch of a one-thread kernel until the host sees its store, on a stream
// of default and of greatest priority. An experiment build is kvxfer with
// scripts/experiments/s18-switches.patch applied (KVX_EXP_NOSIG: no per-layer counters;
// KVX_EXP_D2D_CTAS: blocks device to device; KVX_EXP_NOPRIO: default-priority streams;
// KVX_EXP_OLDWAIT: waiters watch blocking-sync events, as before session 18; KVX_EXP_NOWAKE:
// no blocking-sync end event, the progress engine polls; KVX_EXP_SPIN: the waiter spins from
// submit; kvx_exp_stages: where the last submit's time went); a plain build runs the same code
// in every kvxfer column. On the GPU machine, from the repository root, with .gpu/libkvxfer.so
// from `scripts/gpu-test build` (and its soname, libkvxfer.so.0.2, linked beside it):
//   nvcc -O3 -arch=sm_90 -o /tmp/d2dfloor scripts/experiments/d2dfloor.cu -L.gpu -lkvxfer \
//     -lcuda -Xlinker -rpath=$PWD/.gpu && /tmp/d2dfloor [KVX_EXP_... | kernel.cu ...]
// Sessions 16-18 (the columns grew with each; session 18's device runs 1-9 each name theirs):
// docs/BENCHMARKS.md.
#include <cuda.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include "common.cuh"
#include "kvx.cuh"

typedef unsigned long long u64;
// An experiment build's stage timestamps of its last submit (ns); absent elsewhere.
extern "C" __attribute__((weak)) void kvx_exp_stages(uint64_t* out, size_t n);
constexpr size_t TOTAL = 1ull << 30;
constexpr unsigned LAYERS = 32, OUTER = 2;

struct Job {
  const char* src;
  char* dst;
  const unsigned short* ids;  // (src, dst) pairs
  u64 piece;                  // bytes of one (block, layer, K/V) piece
  u64 pairs;
  u64 items;                  // LAYERS * pairs * OUTER
  u64 layer_bytes;            // blocks * OUTER * piece
  u64 run;                    // consecutive items a warp takes
};

// Items (layer, pair, K/V), K/V fastest; warp w takes runs w, w + warps, ... of `run` items
// (kvxfer's walk device to device), 8 loads of 16 bytes in flight per lane.
// Stores `v` into mapped host memory: the host sees when the kernel ran.
__global__ void stamp(volatile unsigned* p, unsigned v) {
  __threadfence_system();
  *p = v;
}

__global__ void __launch_bounds__(256) bare(const Job j) {
  const unsigned lane = threadIdx.x & 31u;
  const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
  for (u64 r = warp; r * j.run < j.items; r += warps) {
    for (u64 i = r * j.run; i < (r + 1) * j.run && i < j.items; ++i) {
      const u64 o = i % OUTER, p = (i / OUTER) % j.pairs, l = i / (OUTER * j.pairs);
      const u64 sb = j.ids[2 * p], db = j.ids[2 * p + 1];
      const uint4* s = (const uint4*)(j.src + l * j.layer_bytes + (sb * OUTER + o) * j.piece);
      uint4* d = (uint4*)(j.dst + l * j.layer_bytes + (db * OUTER + o) * j.piece);
      for (u64 k = lane; k < j.piece / 16; k += 256) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = s[k + 32 * u];
#pragma unroll
        for (int u = 0; u < 8; ++u) d[k + 32 * u] = v[u];
      }
    }
  }
}

// common.cuh's check_ids with a byte per block (kvxfer's check for small, dense id spaces
// since session 16).
static bool check_ids_bytes(const std::vector<u64>& s, const std::vector<u64>& d, u64 n,
                            std::vector<unsigned char>& marks) {
  u64 bad = 0;
  for (size_t i = 0; i < s.size(); ++i) bad |= (s[i] >= n) | (d[i] >= n);
  if (bad) return false;
  marks.assign(n, 0);
  for (u64 x : d) marks[x] = 1;
  size_t distinct = 0;
  for (unsigned char m : marks) distinct += m;
  return distinct == d.size();
}

int main(int argc, char** argv) {
  cudaStream_t st;
  const int sms = start(&st);
  char *src, *dst;
  CK(cudaMalloc(&src, TOTAL));
  CK(cudaMalloc(&dst, TOTAL));
  fill<<<1024, 256, 0, st>>>(src, TOTAL);
  unsigned short *pinned, *table;
  CK(cudaHostAlloc(&pinned, 1 << 20, cudaHostAllocPortable));
  CK(cudaMalloc(&table, 1 << 20));
  cudaEvent_t done, e0, e1, hop, hop2;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CK(cudaEventCreateWithFlags(&hop, cudaEventDisableTiming));
  CK(cudaEventCreateWithFlags(&hop2, cudaEventDisableTiming));
  // As kvxfer's: blocking-sync events.
  cudaEvent_t bhop, bhop2;
  CK(cudaEventCreateWithFlags(&bhop, cudaEventDisableTiming | cudaEventBlockingSync));
  CK(cudaEventCreateWithFlags(&bhop2, cudaEventDisableTiming | cudaEventBlockingSync));
  cudaStream_t st2;
  CK(cudaStreamCreateWithFlags(&st2, cudaStreamNonBlocking));
  // A thread that sleeps on the blocking event when asked, as kvxfer's progress engine does
  // on its own (the `+check, sleeper` column).
  struct {
    std::mutex m;
    std::condition_variable cv;
    unsigned asked = 0, slept = 0;
  } sleeper;
  std::thread sleeper_thread([&] {
    CK(cudaSetDevice(0));
    std::unique_lock<std::mutex> g(sleeper.m);
    for (;;) {
      sleeper.cv.wait(g, [&] { return sleeper.asked != sleeper.slept; });
      if (sleeper.asked == ~0u) return;
      g.unlock();
      CK(cudaEventSynchronize(bhop));
      g.lock();
      ++sleeper.slept;
      sleeper.cv.notify_all();
    }
  });
  unsigned *flag, *flag_dev;
  CK(cudaHostAlloc((void**)&flag, 4096, cudaHostAllocMapped));
  *flag = 0;
  CK(cudaHostGetDevicePointer((void**)&flag_dev, flag, 0));
  unsigned next = 0;
  int least = 0, greatest = 0;
  CK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cudaStream_t st_hi;
  CK(cudaStreamCreateWithPriority(&st_hi, cudaStreamNonBlocking, greatest));
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaStreamSynchronize(st));
  auto spin = [&](cudaStream_t on = nullptr) {
    CK(cudaEventRecord(done, on ? on : st));
    while (cudaEventQuery(done) == cudaErrorNotReady) {
    }
  };
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  // Device time of what `enqueue` queues on `st`, which waits on the flag until it is all queued.
  auto held = [&](const std::function<void()>& enqueue) {
    ++next;
    if (cuStreamWaitValue32((CUstream)st, (CUdeviceptr)flag_dev, next, CU_STREAM_WAIT_VALUE_GEQ) !=
        CUDA_SUCCESS) {
      fprintf(stderr, "cuStreamWaitValue32 failed\n");
      exit(1);
    }
    CK(cudaEventRecord(e0, st));
    enqueue();
    CK(cudaEventRecord(e1, st));
    __atomic_store_n(flag, next, __ATOMIC_SEQ_CST);
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1000.0;
  };
  auto ce = [&] { CK(cudaMemcpyAsync(dst, src, TOTAL, cudaMemcpyDeviceToDevice, st)); };
  auto warm = [&] {
    ce();
    CK(cudaStreamSynchronize(st));
  };
  // kvxfer's contexts: [0] with its own kernel, [k] with the kernel source argv[k] (an
  // experiment build reads KVX_EXP_KERNEL when a context builds its kernel, at its first
  // transfer).
  const int nk = argc < 8 ? argc : 8;
  kvx_context* kctx[8];
  // argv[k] not a .cu file: the name of an experiment build's switch, set while context k is
  // made and while it submits (KVX_EXP_NOPRIO: streams of the default priority;
  // KVX_EXP_OLDWAIT: waiters watch blocking-sync events, as before session 18).
  auto is_kernel = [&](int k) { return k > 0 && strstr(argv[k], ".cu") != nullptr; };
  auto switches = [&](int k) {
    for (int j = 1; j < nk; ++j)
      if (!is_kernel(j)) unsetenv(argv[j]);
    if (k > 0 && !is_kernel(k)) setenv(argv[k], "1", 1);
  };
  for (int k = 0; k < nk; ++k) {
    switches(k);
    kctx[k] = kvx_gpu_context();
    switches(0);
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# %s, %d SMs; 1 GiB device to device, layer-separate 32 layers x K,V; median of 25\n",
         prop.name, sms);
  {
    unsigned* mark;
    CK(cudaHostAlloc((void**)&mark, 4096, cudaHostAllocMapped));
    unsigned *mark_dev, seq = 0;
    CK(cudaHostGetDevicePointer((void**)&mark_dev, mark, 0));
    *mark = 0;
    auto lat = [&](cudaStream_t on) {
      std::vector<double> v;
      for (int i = 0; i < 31; ++i) {
        warm();
        ++seq;
        const auto t0 = now();
        stamp<<<1, 1, 0, on>>>(mark_dev, seq);
        while (__atomic_load_n(mark, __ATOMIC_ACQUIRE) != seq) {
        }
        v.push_back(us(t0, now()));
      }
      CK(cudaStreamSynchronize(on));
      return med(v);
    };
    const double a = lat(st), b = lat(st_hi), c = lat(st), d = lat(st_hi);
    printf("# launch -> seen: default priority %.1f / %.1f us, greatest %.1f / %.1f us\n", a, c, b, d);
  }
  std::mt19937_64 rng(11);
  std::vector<u64> seen;
  for (u64 piece : {4096ull, 16384ull, 32768ull, 65536ull}) {
    const u64 blocks = TOTAL / (LAYERS * OUTER * piece);
    std::vector<u64> s(blocks), d(blocks);
    for (u64 i = 0; i < blocks; ++i) s[i] = d[i] = i;
    std::shuffle(s.begin(), s.end(), rng);
    std::shuffle(d.begin(), d.end(), rng);
    Job j;
    j.src = src;
    j.dst = dst;
    j.ids = table;
    j.piece = piece;
    j.pairs = blocks;
    j.items = LAYERS * blocks * OUTER;
    j.layer_bytes = blocks * OUTER * piece;
    // kvxfer's run length: 64 KiB of pieces, at most 32, never fewer items than warps.
    const unsigned grid = sms * 3;
    const u64 warps = grid * 8;
    u64 run = std::min<u64>(std::max<u64>(65536 / piece, 1), std::max<u64>(j.items / warps, 1));
    run = std::min<u64>(run, 32);
    while (run & (run - 1)) run &= run - 1;
    j.run = run;
    // Host time of packing the ids, the upload call and the launch call (bare rounds).
    std::vector<double> tpack, tup, tlaunch;
    auto launch = [&](bool check, bool timed = false, cudaStream_t on = nullptr) {
      if (!on) on = st;
      if (check && !check_ids(s, d, blocks, seen)) {
        fprintf(stderr, "ids rejected\n");
        exit(1);
      }
      const auto a = now();
      for (u64 i = 0; i < blocks; ++i) {
        pinned[2 * i] = (unsigned short)s[i];
        pinned[2 * i + 1] = (unsigned short)d[i];
      }
      const auto b = now();
      CK(cudaMemcpyAsync(table, pinned, blocks * 4, cudaMemcpyHostToDevice, on));
      const auto c = now();
      bare<<<grid, 256, 0, on>>>(j);
      if (timed) {
        tpack.push_back(us(a, b));
        tup.push_back(us(b, c));
        tlaunch.push_back(us(c, now()));
      }
    };
    // Correctness once: every destination piece holds its source piece (first 8 bytes of
    // each 4 KiB of it checked on the host, through a small pinned buffer).
    CK(cudaMemsetAsync(dst, 0, TOTAL, st));
    launch(false);
    CK(cudaStreamSynchronize(st));
    u64 wrong = 0;
    for (unsigned l = 0; l < LAYERS; l += 7)
      for (u64 p = 0; p < blocks; p += blocks / 16)
        for (u64 o = 0; o < OUTER; ++o)
          for (u64 off = 0; off < piece; off += 4096) {
            u64 a = 0, b = 0;
            const u64 at = l * j.layer_bytes + o * piece + off;
            CK(cudaMemcpy(&a, src + at + s[p] * OUTER * piece, 8, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(&b, dst + at + d[p] * OUTER * piece, 8, cudaMemcpyDeviceToHost));
            wrong += a != b;
          }
    if (wrong) {
      printf("%-8llu WRONG (%llu samples)\n", piece, wrong);
      continue;
    }
    // kvxfer over the same memory: both sides wrapped as layer-separate layouts.
    kvx_layout_config lc;
    kvx_layout_config_init(&lc);
    lc.num_blocks = blocks; lc.num_layers = LAYERS; lc.outer_dim = OUTER; lc.page_size = 1;
    lc.inner_dim = piece / 2; lc.dtype_width_bytes = 2;
    lc.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST;
    kvx_storage ds = {KVX_STORAGE_KIND_DEVICE, 0, nullptr};
    kvx_memory sm[LAYERS], dm[LAYERS];
    for (unsigned l = 0; l < LAYERS; ++l) {
      sm[l] = {(uint64_t)(src + l * j.layer_bytes), j.layer_bytes};
      dm[l] = {(uint64_t)(dst + l * j.layer_bytes), j.layer_bytes};
    }
    kvx_layout *sl[8], *dl[8];
    for (int k = 0; k < nk; ++k) {
      if (kvx_layout_wrap(kctx[k], &lc, &ds, sm, LAYERS, &sl[k]) != KVX_STATUS_OK ||
          kvx_layout_wrap(kctx[k], &lc, &ds, dm, LAYERS, &dl[k]) != KVX_STATUS_OK) {
        printf("kvx_layout_wrap: %s\n", kvx_last_error());
        return 1;
      }
    }
    // The experiment build's switches: bit 0 no counters (KVX_EXP_NOSIG), bit 2: 396 blocks
    // device to device (3 per SM, as the bare kernel).
    auto variant = [&](int v, int k) {
      if (v & 1) setenv("KVX_EXP_NOSIG", "1", 1); else unsetenv("KVX_EXP_NOSIG");
      if (v & 4) setenv("KVX_EXP_D2D_CTAS", "396", 1); else unsetenv("KVX_EXP_D2D_CTAS");
      if (is_kernel(k)) setenv("KVX_EXP_KERNEL", argv[k], 1); else unsetenv("KVX_EXP_KERNEL");
      switches(k);
    };
    std::vector<double> tsub;
    // Stages of the default submit, us after its entry: 1 shape checked, 3 mechanism chosen,
    // 4 ids checked and table written, 5 table upload queued, 6 kernel queued, 7 event
    // recorded, 2 completion made, 8 handed to the progress engine, 9 returned, 10 seen done.
    const int stage_ids[] = {1, 3, 4, 5, 6, 7, 2, 8, 9, 10};
    std::vector<double> stages[10];
    auto kvx = [&](int v = 0, int k = 0) {
      variant(v, k);
      kvx_transfer* t = nullptr;
      const auto t0 = now();
      const int rc = kvx_transfer_submit(kctx[k], sl[k], (const uint64_t*)s.data(), dl[k],
                                         (const uint64_t*)d.data(), blocks, nullptr, &t);
      if (v == 0 && k == 0) tsub.push_back(us(t0, now()));
      if (rc != KVX_STATUS_OK || kvx_transfer_wait(t, -1) != KVX_STATUS_OK) {
        printf("kvxfer: %s\n", kvx_last_error());
        exit(1);
      }
      if (v == 0 && k == 0 && kvx_exp_stages) {
        uint64_t st_ns[16] = {0};
        kvx_exp_stages(st_ns, 16);
        for (int i = 0; i < 10; ++i)
          stages[i].push_back(((double)st_ns[stage_ids[i]] - (double)st_ns[0]) / 1e3);
      }
      kvx_transfer_free(t);
      variant(0, 0);
    };
    // kvxfer gated on the held stream, which waits for it in turn.
    auto kvx_held = [&](int v, int k = 0) {
      variant(v, k);
      kvx_transfer_options o;
      kvx_transfer_options_init(&o);
      o.cuda_stream = st;
      kvx_transfer* t = nullptr;
      const double dv = held([&] {
        if (kvx_transfer_submit(kctx[k], sl[k], (const uint64_t*)s.data(), dl[k],
                                (const uint64_t*)d.data(), blocks, &o, &t) != KVX_STATUS_OK ||
            kvx_transfer_stream_wait(t, st) != KVX_STATUS_OK) {
          printf("kvxfer (held): %s\n", kvx_last_error());
          exit(1);
        }
      });
      if (kvx_transfer_wait(t, -1) != KVX_STATUS_OK) exit(1);
      kvx_transfer_free(t);
      variant(0, 0);
      return dv;
    };
    // Each kernel source's result checked once (checksums of both sides through kvxfer).
    for (int k = 1; k < nk; ++k) {
      if (!is_kernel(k)) continue;
      CK(cudaMemsetAsync(dst, 0, TOTAL, st));
      CK(cudaStreamSynchronize(st));
      kvx(0, k);
      std::vector<uint64_t> a(blocks), b(blocks);
      if (kvx_layout_checksum(kctx[k], sl[k], (const uint64_t*)s.data(), blocks, a.data()) != KVX_STATUS_OK ||
          kvx_layout_checksum(kctx[k], dl[k], (const uint64_t*)d.data(), blocks, b.data()) != KVX_STATUS_OK) {
        printf("kvx_layout_checksum: %s\n", kvx_last_error());
        return 1;
      }
      if (a != b) printf("%-8llu kernel %s: WRONG\n", piece, argv[k]);
    }
    auto bare_hi = [&] {
      launch(true, false, st_hi);
      spin(st_hi);
    };
    // Through a second stream (of the greatest priority with `hi`), with kvxfer's kind of
    // events (`blocking`).
    auto bare_held = [&](bool hi = false, bool blocking = false) {
      cudaStream_t on = hi ? st_hi : st2;
      cudaEvent_t a = blocking ? bhop : hop, b = blocking ? bhop2 : hop2;
      return held([&] {
        CK(cudaEventRecord(a, st));
        CK(cudaStreamWaitEvent(on, a, 0));
        launch(true, false, on);
        CK(cudaEventRecord(b, on));
        CK(cudaStreamWaitEvent(st, b, 0));
      });
    };
    // Every column after an untimed copy of the whole GiB; the columns' order rotates from
    // round to round, so that none always follows the same one.
    auto wall = [&](const std::function<void()>& f) {
      warm();
      const auto t0 = now();
      f();
      return us(t0, now());
    };
    int round = 0;
    struct Column {
      const char* name;
      std::function<double()> run;
      std::vector<double> t;
    };
    std::vector<Column> cols = {
        {"ce", [&] { return wall([&] { ce(); spin(); }); }, {}},
        {"+check", [&] { return wall([&] { launch(true); spin(); }); }, {}},
        // Queued first behind a wait on a host-written flag, the ids checked and packed (into
        // the pinned buffer the queued upload reads) while the GPU takes in the launch, then
        // the flag released: the launch's latency overlaps the check.
        {"gated +check", [&] {
           return wall([&] {
             ++next;
             if (cuStreamWaitValue32((CUstream)st, (CUdeviceptr)flag_dev, next,
                                     CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS) {
               fprintf(stderr, "cuStreamWaitValue32 failed\n");
               exit(1);
             }
             CK(cudaMemcpyAsync(table, pinned, blocks * 4, cudaMemcpyHostToDevice, st));
             bare<<<grid, 256, 0, st>>>(j);
             if (!check_ids(s, d, blocks, seen)) exit(1);
             for (u64 i = 0; i < blocks; ++i) {
               pinned[2 * i] = (unsigned short)s[i];
               pinned[2 * i + 1] = (unsigned short)d[i];
             }
             __atomic_store_n(flag, next, __ATOMIC_SEQ_CST);
             spin();
           });
         }, {}},
        {"+check greatest", [&] { return wall(bare_hi); }, {}},
        {"+check blocking", [&] {
           return wall([&] {
             launch(true);
             CK(cudaEventRecord(bhop, st));
             while (cudaEventQuery(bhop) == cudaErrorNotReady) {
             }
           });
         }, {}},
        {"+check, then blocking", [&] {
           return wall([&] {
             launch(true);
             CK(cudaEventRecord(done, st));
             CK(cudaEventRecord(bhop, st));
             while (cudaEventQuery(done) == cudaErrorNotReady) {
             }
           });
         }, {}},
        {"+check, sleeper", [&] {
           const double t = wall([&] {
             launch(true);
             CK(cudaEventRecord(done, st));
             CK(cudaEventRecord(bhop, st));
             {
               std::lock_guard<std::mutex> g(sleeper.m);
               ++sleeper.asked;
             }
             sleeper.cv.notify_one();
             while (cudaEventQuery(done) == cudaErrorNotReady) {
             }
           });
           std::unique_lock<std::mutex> g(sleeper.m);
           sleeper.cv.wait(g, [&] { return sleeper.slept == sleeper.asked; });
           return t;
         }, {}},
        {"held bare", [&] { warm(); return bare_held(); }, {}},
        {"held bare greatest", [&] { warm(); return bare_held(true); }, {}},
        {"held bare blocking", [&] { warm(); return bare_held(false, true); }, {}},
        {"held bare both", [&] { warm(); return bare_held(true, true); }, {}},
    };
    for (int k = 0; k < nk; ++k) {
      cols.push_back({k ? argv[k] : "kvxfer", [&, k] { return wall([&] { kvx(0, k); }); }, {}});
      cols.push_back({"  held", [&, k] { warm(); return kvx_held(0, k); }, {}});
    }
    if (nk > 1 && is_kernel(nk - 1)) {
      cols.push_back({"  last, 396 blocks", [&] { return wall([&] { kvx(4, nk - 1); }); }, {}});
      cols.push_back({"  held", [&] { warm(); return kvx_held(4, nk - 1); }, {}});
    }
    std::vector<double> tcheck, tbytes;
    std::vector<unsigned char> marks;
    for (round = 0; round < 28; ++round) {
      for (size_t i = 0; i < cols.size(); ++i) {
        Column& col = cols[(i + round) % cols.size()];
        const double t = col.run();
        if (round >= 3) col.t.push_back(t);
      }
      auto t0 = now();
      check_ids(s, d, blocks, seen);
      const double v = us(t0, now());
      t0 = now();
      if (!check_ids_bytes(s, d, blocks, marks)) exit(1);
      if (round >= 3) {
        tcheck.push_back(v);
        tbytes.push_back(us(t0, now()));
      }
    }
    const double c = med(cols[0].t);
    printf("%-8llu %6llu  check %.1f us (bytes %.1f), kvxfer's submit %.1f us\n", piece, blocks,
           med(tcheck), med(tbytes), med(tsub));
    if (!stages[0].empty()) {
      printf("         stages (us after submit's entry):");
      for (int i = 0; i < 10; ++i) printf(" [%d] %.1f", stage_ids[i], med(stages[i]));
      printf("\n");
    }
    for (const Column& col : cols)
      printf("         %-18s %7.1f us  %.3f of ce\n", col.name, med(col.t), c / med(col.t));
    for (int k = 0; k < nk; ++k) {
      kvx_layout_free(sl[k]);
      kvx_layout_free(dl[k]);
    }
  }
  CK(cudaGetLastError());
  {
    std::lock_guard<std::mutex> g(sleeper.m);
    sleeper.asked = ~0u;
  }
  sleeper.cv.notify_all();
  sleeper_thread.join();
  return 0;
}
