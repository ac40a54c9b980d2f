// What a kernel's parameter size costs a submit (issue: busy engine, point 5; session 19).
// kvxfer's copy kernel takes its table (layout bases, block-id pairs) in a __grid_constant__
// parameter up to 4 KB, else uploads it (cuMemcpyHtoDAsync from pinned memory) before a launch
// with a small parameter. Its trace on an H200 machine (session 19, device run 6) put the
// launch at 5-8 us with the 4 KB parameter and 9-15 us for upload + launch, where a bare
// kernel's launch is ~3 us. This times, per way of passing W table words:
//   call     the host calls (upload and launch), median us
//   start    from the first call until the kernel's first block ran (its globaltimer against
//            the host clock's, via one calibration at the start), median us: NOT usable as it
//            is: in session 19's run 7 it grew through the run, past `seen` (the two clocks
//            drift apart; it needs a calibration per variant)
//   seen     from the first call until an event after the kernel was seen done, spinning
// each hot (back to back) and cold (16 MiB of host memory written between launches, as a
// scheduling loop's other work evicts the driver's state from the caches).
// Build: nvcc -O3 -arch=sm_90 -o /tmp/launchparam scripts/experiments/launchparam.cu
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

typedef unsigned long long u64;

template <int W>
struct Param {
  u64 out;  // device address: the first block's start time and a checksum
  u64 table[W];
};

__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

template <int W>
__global__ void __launch_bounds__(256) inline_table(const __grid_constant__ Param<W> p) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    u64* o = (u64*)p.out;
    o[0] = now_ns();
    o[1] = p.table[W - 1];
  }
}

__global__ void __launch_bounds__(256) table_in_memory(u64 out, const u64* table, int w) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    u64* o = (u64*)out;
    o[0] = now_ns();
    o[1] = table[w - 1];
  }
}

#define CK(x)                                                              \
  do {                                                                     \
    cudaError_t e_ = (x);                                                  \
    if (e_ != cudaSuccess) {                                               \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));    \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

static double host_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main() {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t ev;
  CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  u64* out;  // pinned and mapped: the host reads the kernel's start time
  CK(cudaHostAlloc((void**)&out, 64, cudaHostAllocMapped));
  u64* out_dev;
  CK(cudaHostGetDevicePointer((void**)&out_dev, out, 0));
  u64* table_host;
  CK(cudaHostAlloc((void**)&table_host, 4096 * 8, cudaHostAllocDefault));
  u64* table_dev;
  CK(cudaMalloc((void**)&table_dev, 4096 * 8));
  for (int i = 0; i < 4096; ++i) table_host[i] = i;
  std::vector<char> junk(16 << 20);
  // The device's globaltimer against the host clock: a kernel's stamp seen soon after.
  double offset = 1e30;
  for (int i = 0; i < 200; ++i) {
    out[0] = 0;
    const double t0 = host_us();
    table_in_memory<<<1, 32, 0, s>>>((u64)out_dev, table_dev, 1);
    while (((volatile u64*)out)[0] == 0) {
    }
    const double t1 = host_us();
    // The stamp lies between t0 and t1: take the offset that puts it closest to t1.
    offset = std::min(offset, t1 - ((volatile u64*)out)[0] / 1e3);
  }
  CK(cudaStreamSynchronize(s));
  const int rounds = 400;
  auto measure = [&](const char* name, int words, auto&& submit) {
    for (int cold = 0; cold < 2; ++cold) {
      std::vector<double> call, start, seen;
      for (int i = 0; i < rounds; ++i) {
        if (cold) memset(junk.data(), i, junk.size());
        out[0] = 0;
        const double t0 = host_us();
        submit();
        const double t1 = host_us();
        CK(cudaEventRecord(ev, s));
        while (cudaEventQuery(ev) == cudaErrorNotReady) {
        }
        const double t2 = host_us();
        call.push_back(t1 - t0);
        seen.push_back(t2 - t0);
        start.push_back(((volatile u64*)out)[0] / 1e3 + offset - t0);
      }
      printf("%-28s %5d words %-4s call %6.2f  start %6.2f  seen %6.2f us\n", name, words,
             cold ? "cold" : "hot", median(call), median(start), median(seen));
    }
  };
#define INLINE(W)                                                                  \
  {                                                                                \
    static Param<W> p;                                                             \
    p.out = (u64)out_dev;                                                          \
    for (int i = 0; i < W; ++i) p.table[i] = i;                                    \
    measure("parameter", W, [&] { inline_table<W><<<132, 256, 0, s>>>(p); });      \
  }
  INLINE(15)
  INLINE(127)
  INLINE(255)
  INLINE(511)
  INLINE(1023)
  INLINE(2047)
  INLINE(4094)
  for (int w : {192, 576, 1024, 2112, 4096}) {
    measure("upload + small parameter", w, [&] {
      CK(cudaMemcpyAsync(table_dev, table_host, w * 8, cudaMemcpyHostToDevice, s));
      table_in_memory<<<132, 256, 0, s>>>((u64)out_dev, table_dev, w);
    });
  }
  measure("small parameter alone", 0, [&] {
    table_in_memory<<<132, 256, 0, s>>>((u64)out_dev, table_dev, 1);
  });
  CK(cudaStreamSynchronize(s));
  printf("# checksum %llu\n", out[1]);
  return 0;
}
