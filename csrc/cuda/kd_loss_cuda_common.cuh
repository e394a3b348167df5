// Building blocks shared by the CUDA kernels of the dense KD loss (kd_loss_forward.cu,
// kd_loss_backward.cu; the sparse and top-k kernels use some): host-side launch helpers (error
// checks, device guard) and device-side helpers (storage-dtype traits that load, convert and
// store groups of elements, the batch streaming loop, team-wide reductions, the exponential of
// the hot loops). How a row is cut into groups, batches and threads, and the host's alignment
// test, are in kd_loss_cuda_layout.cuh. Contract with the kernels: with kVectorized a group
// wholly inside the row is loaded and stored with 16-byte accesses, the head and tail groups
// element by element; elements outside the row read as -inf and are never written. A "team"
// is a power-of-two number (>= 32) of consecutive threads of one block that handles one row
// (or one chunk of a row); every thread of the block must call the team reductions (they may
// synchronise the block).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kd_loss_cuda_layout.cuh"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

namespace kdfast {
namespace cuda {

// ------------------------------------------------------------------ host-side helpers

// Throws std::runtime_error naming `what` when `status` is an error.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("kdfast CUDA: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

// Reports a failed kernel launch (bad configuration, missing kernel image) without
// synchronising: cudaGetLastError only reads the launch status.
inline void check_launch(const char* kernel_name) { check_cuda(cudaGetLastError(), kernel_name); }

// Makes `device_index` the calling thread's current device for the lifetime of the guard.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device_index) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_index) check_cuda(cudaSetDevice(device_index), "cudaSetDevice");
    changed_ = previous_ != device_index;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// Number of multiprocessors of the current device (queried once per device).
int multiprocessor_count();

// Throws std::invalid_argument unless 0 <= vocab <= 2^30 (in-row indices are 32-bit).
void check_vocab_fits(int64_t vocab, const char* function);

// ------------------------------------------------------------------ compute-type constants

// row_stats layout (types.h): the six rowmath::RowStats values, then the row loss, then zeros.
constexpr int kRowLossColumn = 6;
static_assert(kRowStats >= kRowLossColumn + 1, "row_stats must hold the RowStats values and the row loss");

template <class C>
__device__ __forceinline__ C negative_infinity() {
  return rowmath::neg_inf<C>();
}

template <class C>
__device__ __forceinline__ C quiet_nan() {
  return std::numeric_limits<C>::quiet_NaN();
}

// exp(d * scale) for the streamed sums and the gradients, where d <= 0 is a logit minus its
// row maximum (or a log-probability) and scale > 0. float: one multiply and the hardware
// exp2 unit (ex2.approx.ftz: relative error about 2^-22, exactly 0 for -inf and below
// 2^-126, NaN propagates), as cheap as the streaming needs; double: the accurate exp.
// The per-row math of rowmath.h (rebasing, log-sums, divergence terms and gradients) keeps
// rowmath's own exp/log.
template <class C>
struct ScaledExp;

template <>
struct ScaledExp<float> {
  float scale_log2;  // scale * log2(e)
  __device__ __forceinline__ explicit ScaledExp(float scale) : scale_log2(scale * 1.44269504088896341f) {}
  __device__ __forceinline__ float operator()(float d) const {
#if defined(__CUDA_ARCH__)
    float result;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(d * scale_log2));
    return result;
#else  // host compilation of this header
    return exp2f(d * scale_log2);
#endif
  }
};

template <>
struct ScaledExp<double> {
  double scale;
  __device__ __forceinline__ explicit ScaledExp(double scale_value) : scale(scale_value) {}
  __device__ __forceinline__ double operator()(double d) const { return ::exp(d * scale); }
};

// ------------------------------------------------------------------ storage dtypes

// Each storage type: Raw (the element as stored), kPerVector (elements per 16 bytes),
// to_compute / from_compute (one element; from_compute rounds to nearest even), unpack (one
// 16-byte vector into kPerVector compute values) and pack (the reverse, rounding likewise).
struct Float32Storage {
  using Raw = float;
  static constexpr int kPerVector = 4;
  __device__ static __forceinline__ float to_compute(Raw x) { return x; }
  __device__ static __forceinline__ Raw from_compute(float x) { return x; }
  __device__ static __forceinline__ void unpack(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
  __device__ static __forceinline__ uint4 pack(const float* in) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  }
};

struct BFloat16Storage {
  using Raw = uint16_t;  // the bits of a bfloat16
  static constexpr int kPerVector = 8;
  __device__ static __forceinline__ float to_compute(Raw x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
  __device__ static __forceinline__ Raw from_compute(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  __device__ static __forceinline__ void unpack_word(uint32_t word, float* out) {
    out[0] = __uint_as_float(word << 16);
    out[1] = __uint_as_float(word & 0xffff0000u);
  }
  __device__ static __forceinline__ uint32_t pack_word(float low, float high) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16);
  }
  __device__ static __forceinline__ void unpack(const uint4& v, float* out) {
    unpack_word(v.x, out);
    unpack_word(v.y, out + 2);
    unpack_word(v.z, out + 4);
    unpack_word(v.w, out + 6);
  }
  __device__ static __forceinline__ uint4 pack(const float* in) {
    return make_uint4(pack_word(in[0], in[1]), pack_word(in[2], in[3]), pack_word(in[4], in[5]), pack_word(in[6], in[7]));
  }
};

struct Float16Storage {
  using Raw = uint16_t;  // the bits of an IEEE half
  static constexpr int kPerVector = 8;
  __device__ static __forceinline__ float to_compute(Raw x) { return __half2float(__ushort_as_half(x)); }
  __device__ static __forceinline__ Raw from_compute(float x) { return __half_as_ushort(__float2half_rn(x)); }
  __device__ static __forceinline__ void unpack_word(uint32_t word, float* out) {
    const __half2 pair = __halves2half2(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)),
                                        __ushort_as_half(static_cast<unsigned short>(word >> 16)));
    const float2 values = __half22float2(pair);
    out[0] = values.x;
    out[1] = values.y;
  }
  __device__ static __forceinline__ uint32_t pack_word(float low, float high) {
    const __half2 pair = __floats2half2_rn(low, high);
    return static_cast<uint32_t>(__half_as_ushort(__low2half(pair))) |
           (static_cast<uint32_t>(__half_as_ushort(__high2half(pair))) << 16);
  }
  __device__ static __forceinline__ void unpack(const uint4& v, float* out) {
    unpack_word(v.x, out);
    unpack_word(v.y, out + 2);
    unpack_word(v.z, out + 4);
    unpack_word(v.w, out + 6);
  }
  __device__ static __forceinline__ uint4 pack(const float* in) {
    return make_uint4(pack_word(in[0], in[1]), pack_word(in[2], in[3]), pack_word(in[4], in[5]), pack_word(in[6], in[7]));
  }
};

struct Float64Storage {
  using Raw = double;
  static constexpr int kPerVector = 2;
  __device__ static __forceinline__ double to_compute(Raw x) { return x; }
  __device__ static __forceinline__ Raw from_compute(double x) { return x; }
  __device__ static __forceinline__ void unpack(const uint4& v, double* out) {
    out[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
    out[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
  }
  __device__ static __forceinline__ uint4 pack(const double* in) {
    return make_uint4(static_cast<uint32_t>(__double2loint(in[0])), static_cast<uint32_t>(__double2hiint(in[0])),
                      static_cast<uint32_t>(__double2loint(in[1])), static_cast<uint32_t>(__double2hiint(in[1])));
  }
};

// Load of one stored element: through the read-only (non-coherent) cache path when
// kReadOnlyCache, a plain load otherwise (required when the kernel writes the same memory,
// as the in-place backward does).
template <class X, bool kReadOnlyCache = true>
__device__ __forceinline__ typename X::Raw load_element(const typename X::Raw* address) {
  if constexpr (kReadOnlyCache) {
    return __ldg(address);
  } else {
    return *address;
  }
}

template <bool kReadOnlyCache>
__device__ __forceinline__ uint4 load_vector(const uint4* address) {
  if constexpr (kReadOnlyCache) {
    return __ldg(address);
  } else {
    return *address;
  }
}

// Elements from the previous 16-byte boundary to the start of `row` (see the file comment).
template <class X>
__device__ __forceinline__ int row_pad(const typename X::Raw* row) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16) / static_cast<int>(sizeof(typename X::Raw));
}

// ------------------------------------------------------------------ batches of groups

// The elements one thread handles in one batch: kGroupsPerBatch groups of kGroupWidth
// consecutive elements each; group u starts at element first[u] of the row.
template <class C>
struct BatchLayout {
  static constexpr int kGroups = kGroupsPerBatch<C>;
  static constexpr int kWidth = kGroupWidth<C>;
  static constexpr int kElements = kGroups * kWidth;
};

// Raw contents of one batch of tensor X, loaded with every load issued before any value is
// used. Only for full batches (every group wholly inside the row; with kVectorized every group
// start is 16-byte aligned).
template <class X, class C, bool kVectorized, bool kReadOnlyCache>
struct FullBatch;

template <class X, class C, bool kReadOnlyCache>
struct FullBatch<X, C, true, kReadOnlyCache> {
  static constexpr int kVectorsPerGroup = kGroupWidth<C> / X::kPerVector;
  static constexpr int kRegisters = kGroupsPerBatch<C> * kVectorsPerGroup * 4;  // 32-bit registers held
  uint4 vectors[kGroupsPerBatch<C> * kVectorsPerGroup];
  __device__ __forceinline__ void load(const typename X::Raw* row, const int* first) {
#pragma unroll
    for (int u = 0; u < kGroupsPerBatch<C>; ++u) {
      const uint4* source = reinterpret_cast<const uint4*>(row + first[u]);
#pragma unroll
      for (int v = 0; v < kVectorsPerGroup; ++v) vectors[u * kVectorsPerGroup + v] = load_vector<kReadOnlyCache>(source + v);
    }
  }
  __device__ __forceinline__ void to_compute(C* out) const {
#pragma unroll
    for (int i = 0; i < kGroupsPerBatch<C> * kVectorsPerGroup; ++i) X::unpack(vectors[i], out + i * X::kPerVector);
  }
};

template <class X, class C, bool kReadOnlyCache>
struct FullBatch<X, C, false, kReadOnlyCache> {
  // 32-bit registers held: one per 16- or 32-bit element, two per 64-bit one.
  static constexpr int kRegisters = BatchLayout<C>::kElements * ((sizeof(typename X::Raw) + 3) / 4);
  typename X::Raw values[BatchLayout<C>::kElements];
  __device__ __forceinline__ void load(const typename X::Raw* row, const int* first) {
#pragma unroll
    for (int u = 0; u < kGroupsPerBatch<C>; ++u) {
#pragma unroll
      for (int e = 0; e < kGroupWidth<C>; ++e) {
        values[u * kGroupWidth<C> + e] = load_element<X, kReadOnlyCache>(row + first[u] + e);
      }
    }
  }
  __device__ __forceinline__ void to_compute(C* out) const {
#pragma unroll
    for (int i = 0; i < BatchLayout<C>::kElements; ++i) out[i] = X::to_compute(values[i]);
  }
};

// A batch that reaches outside the row: element by element, -inf outside [0, vocab).
template <class X, class C, bool kReadOnlyCache>
__device__ __forceinline__ void load_partial_batch(const typename X::Raw* row, const int* first, int vocab, C* out) {
#pragma unroll
  for (int u = 0; u < kGroupsPerBatch<C>; ++u) {
#pragma unroll
    for (int e = 0; e < kGroupWidth<C>; ++e) {
      const int index = first[u] + e;
      out[u * kGroupWidth<C> + e] =
          in_row(index, vocab) ? X::to_compute(load_element<X, kReadOnlyCache>(row + index)) : negative_infinity<C>();
    }
  }
}

// How many 32-bit registers a kernel lets stream_batches hold for the next batch's loads while
// it computes the current one. kPrefetchAnyBatch: every batch (kernels with up to 128
// registers per thread). kPrefetchNarrowBatches: only batches whose two raw halves take at
// most 8 registers (16-byte loads of 16-bit dtypes); the forward kernels with 64 registers per
// thread use it, since a float32 or element-by-element batch in flight held 16 more registers
// through the computation and spilled inside the element loop (benches/cuda_resources.py
// --sass). There the 1024 resident threads per multiprocessor hide the load latency instead.
constexpr int kPrefetchAnyBatch = 16;
constexpr int kPrefetchNarrowBatches = 8;

template <class SBatch, class TBatch, int kPrefetchRegisters>
constexpr bool kPrefetchBatches = SBatch::kRegisters + TBatch::kRegisters <= kPrefetchRegisters;

// Streams a thread's batches of the student row (and of the teacher row when `need_teacher`),
// calling visit(s, t, first, partial) with the batch in compute precision (-inf outside the
// row; t is unset without the teacher), the first element index of each group, and
// std::true_type / std::false_type for batches that do / do not reach outside the row. Order:
// the head batch, the full batches, the tail (ThreadBatches). Where kPrefetchRegisters allows
// (kPrefetchBatches) the loads of the next full batch are issued before the current one is
// visited, so that each thread keeps one batch of loads in flight while it computes; otherwise
// each full batch is loaded, then visited. kReadOnlyCache: see load_element.
template <class SX, class TX, class C, bool kVectorized, bool kReadOnlyCache,
          int kPrefetchRegisters = kPrefetchAnyBatch, class Visit>
__device__ __forceinline__ void stream_batches(const typename SX::Raw* s_row, const typename TX::Raw* t_row,
                                               int vocab, const ThreadBatches<C>& batches, bool need_teacher,
                                               Visit&& visit) {
  constexpr int kGroups = kGroupsPerBatch<C>;
  constexpr int kElements = BatchLayout<C>::kElements;
  if (batches.head) {
    C s[kElements], t[kElements];
    int first[kGroups];
    batches.first_elements(0, first);
    load_partial_batch<SX, C, kReadOnlyCache>(s_row, first, vocab, s);
    if (need_teacher) load_partial_batch<TX, C, kReadOnlyCache>(t_row, first, vocab, t);
    visit(static_cast<const C*>(s), static_cast<const C*>(t), static_cast<const int*>(first), std::true_type{});
  }
  FullBatch<SX, C, kVectorized, kReadOnlyCache> s_raw;
  FullBatch<TX, C, kVectorized, kReadOnlyCache> t_raw;
  if constexpr (kPrefetchBatches<decltype(s_raw), decltype(t_raw), kPrefetchRegisters>) {
    int next_first[kGroups];
    if (batches.begin < batches.full) {
      batches.first_elements(batches.begin, next_first);
      s_raw.load(s_row, next_first);
      if (need_teacher) t_raw.load(t_row, next_first);
    }
    for (int b = batches.begin; b < batches.full; ++b) {
      C s[kElements], t[kElements];
      int first[kGroups];
#pragma unroll
      for (int u = 0; u < kGroups; ++u) first[u] = next_first[u];
      s_raw.to_compute(s);
      if (need_teacher) t_raw.to_compute(t);
      if (b + 1 < batches.full) {
        batches.first_elements(b + 1, next_first);
        s_raw.load(s_row, next_first);
        if (need_teacher) t_raw.load(t_row, next_first);
      }
      visit(static_cast<const C*>(s), static_cast<const C*>(t), static_cast<const int*>(first), std::false_type{});
    }
  } else {
    for (int b = batches.begin; b < batches.full; ++b) {
      C s[kElements], t[kElements];
      int first[kGroups];
      batches.first_elements(b, first);
      s_raw.load(s_row, first);
      if (need_teacher) t_raw.load(t_row, first);
      s_raw.to_compute(s);
      if (need_teacher) t_raw.to_compute(t);
      visit(static_cast<const C*>(s), static_cast<const C*>(t), static_cast<const int*>(first), std::false_type{});
    }
  }
  for (int b = batches.full; b < batches.total; ++b) {
    C s[kElements], t[kElements];
    int first[kGroups];
    batches.first_elements(b, first);
    load_partial_batch<SX, C, kReadOnlyCache>(s_row, first, vocab, s);
    if (need_teacher) load_partial_batch<TX, C, kReadOnlyCache>(t_row, first, vocab, t);
    visit(static_cast<const C*>(s), static_cast<const C*>(t), static_cast<const int*>(first), std::true_type{});
  }
}

// Stores one group of compute values as dtype X: 16-byte stores when the group lies wholly
// inside the row and kVectorized (then `first` is 16-byte aligned), else element by element;
// only row elements [0, vocab) are written.
template <class X, class C, bool kVectorized>
__device__ __forceinline__ void store_group(typename X::Raw* row, int first, int vocab, const C* values) {
  constexpr int kWidth = kGroupWidth<C>;
  if (first >= 0 && first + kWidth <= vocab) {
    if constexpr (kVectorized) {
      uint4* destination = reinterpret_cast<uint4*>(row + first);
#pragma unroll
      for (int v = 0; v < kWidth / X::kPerVector; ++v) destination[v] = X::pack(values + v * X::kPerVector);
    } else {
#pragma unroll
      for (int e = 0; e < kWidth; ++e) row[first + e] = X::from_compute(values[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      if (in_row(first + e, vocab)) row[first + e] = X::from_compute(values[e]);
    }
  }
}

// ------------------------------------------------------------------ reductions

// The reduction's scale of a row's gradient: 1 / valid rows (mean; 0 when none is valid),
// 1 / rows (batchmean) or 1; `valid_rows` (C: the dtype the forward pass wrote it in)
// is read on the device, so no host synchronisation is needed.
template <class C>
__device__ __forceinline__ double reduction_scale(Reduction reduction, const void* valid_rows, int64_t rows) {
  if (reduction == Reduction::Mean) {
    const double valid = static_cast<double>(*static_cast<const C*>(valid_rows));
    return valid > 0.0 ? 1.0 / valid : 0.0;
  }
  if (reduction == Reduction::BatchMean) return rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  return 1.0;
}

// ------------------------------------------------------------------ team reductions

// Maximum that ignores NaN (IEEE maxNum, one instruction), like the CPU's running maximum.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

struct SumOp {
  template <class C>
  __device__ __forceinline__ C operator()(C a, C b) const {
    return a + b;
  }
};

// Combines N values over the team of `team_size` threads (a power of two, 32 <= team_size <=
// block size) so that every thread of the team ends with the same result: a butterfly over the
// warp, then, for teams of several warps, the warps' results combined in warp order through
// `scratch` (kMaxWarps x N values of shared memory). The order is fixed, so results are
// deterministic and identical in every thread. Every thread of the block must call it with
// the same team_size (it synchronises the block when team_size > 32).
template <int N, int kMaxWarps, class C, class Op>
__device__ __forceinline__ void team_all_reduce(C (&values)[N], C (&scratch)[kMaxWarps][N], int team_size, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) values[i] = op(values[i], __shfl_xor_sync(0xffffffffu, values[i], offset));
  }
  if (team_size > 32) {
    const int warp = threadIdx.x >> 5;
    const int warps_per_team = team_size >> 5;
    const int first_warp = (warp / warps_per_team) * warps_per_team;
    __syncthreads();  // earlier readers of scratch are done
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch[warp][i] = values[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      C total = scratch[first_warp][i];
      for (int w = 1; w < warps_per_team; ++w) total = op(total, scratch[first_warp + w][i]);
      values[i] = total;
    }
  }
}

}  // namespace cuda
}  // namespace kdfast
