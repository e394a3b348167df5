// Device helpers shared by the CUDA kernels of top-k soft labels (topk_compress.cu,
// sparse_kd_loss.cu): order-preserving integer keys of float/double logits (a larger logit has
// a larger key; -0.0 and +0.0 share one key and NaN maps to the key of -inf, the ranks the CPU
// kernel gives them), a block-wide
// exclusive scan that gives every thread a deterministic output position (compaction in index
// order, no atomics), and a per-thread tail log-sum-exp kept relative to its own running
// maximum (sparse::TailSum's rule, so a tiny tail keeps its relative precision). Every thread
// of the block must call the block-wide helpers (they synchronise the block).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "kd_loss_cuda_common.cuh"

namespace kdfast {
namespace cuda {

// ------------------------------------------------------------------ host: dynamic shared memory

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. The
// opt-in is needed whenever the block's static plus dynamic shared memory exceeds 48 KiB, so
// dynamic sizes just under 48 KiB need it too; it is asked for every nonzero size (harmless
// below the limit). The attribute is set once per kernel, device and size, so that calls
// during CUDA-graph capture (after a warm-up call) make no runtime call at all.
inline void allow_dynamic_shared_memory(const void* kernel, size_t bytes) {
  if (bytes == 0) return;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> granted;
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = granted[{device, kernel}];
  if (current >= bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "cudaFuncSetAttribute");
  current = bytes;
}

// ------------------------------------------------------------------ order-preserving keys

template <class C>
struct OrderedKey;

template <>
struct OrderedKey<float> {
  using Key = uint32_t;
  __device__ static __forceinline__ Key from_value(float v) {
    if (v != v) v = negative_infinity<float>();
    v = v == 0.0f ? 0.0f : v;  // -0.0 and +0.0 tie (lower index first), as on the CPU
    const uint32_t bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  __device__ static __forceinline__ float to_value(Key key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
  }
  static constexpr int kBits = 32;
};

template <>
struct OrderedKey<double> {
  using Key = unsigned long long;
  __device__ static __forceinline__ Key from_value(double v) {
    if (v != v) v = negative_infinity<double>();
    v = v == 0.0 ? 0.0 : v;  // -0.0 and +0.0 tie
    const Key bits = static_cast<Key>(__double_as_longlong(v));
    return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
  }
  __device__ static __forceinline__ double to_value(Key key) {
    return __longlong_as_double(static_cast<long long>((key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key));
  }
  static constexpr int kBits = 64;
};

// ------------------------------------------------------------------ block-wide scan

// Exclusive prefix sum of `value` over the block in thread order; `total` gets the block's sum.
// `warp_totals` holds 32 ints of shared memory. Two barriers; every thread must call it.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_totals, int& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < warps; ++w) {
    const int t = warp_totals[w];
    before += w < warp ? t : 0;
    sum += t;
  }
  __syncthreads();  // warp_totals may be reused right after
  total = sum;
  return before + inclusive - value;
}

// ------------------------------------------------------------------ streamed tail sums

// log Σ exp(x_i / T) over the values one thread streams, kept as (max, Σ exp((x_i − max)/T)).
template <class C>
struct ThreadTail {
  C max_value;
  C sum;

  __device__ __forceinline__ ThreadTail() : max_value(negative_infinity<C>()), sum(C(0)) {}

  // Adds n values (-inf entries add nothing; NaN must be counted by the caller).
  template <int N>
  __device__ __forceinline__ void add(const C (&x)[N], const ScaledExp<C>& exp_over_t) {
    C batch_max = negative_infinity<C>();
#pragma unroll
    for (int e = 0; e < N; ++e) batch_max = MaxOp{}(batch_max, x[e]);
    if (batch_max == negative_infinity<C>()) return;
    if (batch_max > max_value) {
      sum = max_value == negative_infinity<C>() ? C(0) : sum * exp_over_t(max_value - batch_max);
      max_value = batch_max;
    }
#pragma unroll
    for (int e = 0; e < N; ++e) sum += exp_over_t(x[e] - max_value);
  }

  __device__ __forceinline__ void add_one(C x, const ScaledExp<C>& exp_over_t) {
    const C one[1] = {x};
    add(one, exp_over_t);
  }
};

// Combines the threads' tails into the block's (in every thread): the maximum, then
// Σ exp((x − max)/T) in double, summed in a fixed order (deterministic). Returns the sum;
// `block_max` gets the maximum (−inf and sum 0 for an empty tail).
template <int kMaxWarps, class C>
__device__ __forceinline__ double block_tail_sum(const ThreadTail<C>& tail, double inv_temperature, C& block_max,
                                                 C (&max_scratch)[kMaxWarps][1],
                                                 double (&sum_scratch)[kMaxWarps][1]) {
  C maxima[1] = {tail.max_value};
  team_all_reduce(maxima, max_scratch, static_cast<int>(blockDim.x), MaxOp{});
  block_max = maxima[0];
  double sums[1] = {0.0};
  if (tail.max_value != negative_infinity<C>() || tail.sum != tail.sum) {
    sums[0] = static_cast<double>(tail.sum) *
              ::exp((static_cast<double>(tail.max_value) - static_cast<double>(block_max)) * inv_temperature);
  }
  team_all_reduce(sums, sum_scratch, static_cast<int>(blockDim.x), SumOp{});
  return sums[0];
}

}  // namespace cuda
}  // namespace kdfast
