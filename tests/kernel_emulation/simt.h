// Lane-lockstep emulation of the CUDA features src/exec/cuda/copy_blocks.cu uses, so that its
// kernels run on the CPU (tests/kernel_emulation.rs): a warp is 32 host threads, and every
// warp-synchronous intrinsic is a barrier at which the lanes exchange their values. Exact for
// code whose warp-synchronous calls every lane makes in the same order, as the kernel's do.
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(x)
#define __grid_constant__
struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct WarpSync {
  std::barrier<> bar{32};
  unsigned long long slot[32];
};
inline WarpSync* g_warp;
inline unsigned lane_id() { return threadIdx.x & 31u; }
template <class T> T __shfl_sync(unsigned, T v, int k) {
  unsigned long long x = 0;
  std::memcpy(&x, &v, sizeof(T));
  g_warp->slot[lane_id()] = x;
  g_warp->bar.arrive_and_wait();
  unsigned long long r = g_warp->slot[k];
  g_warp->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  g_warp->slot[lane_id()] = pred ? 1 : 0;
  g_warp->bar.arrive_and_wait();
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= (g_warp->slot[i] ? 1u : 0u) << i;
  g_warp->bar.arrive_and_wait();
  return m;
}
inline bool __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __syncwarp() { g_warp->bar.arrive_and_wait(); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> T min(T a, T b) { return a < b ? a : b; }
