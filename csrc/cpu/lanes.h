// Lanes for the CPU kernels' exp-bound row loops: one loop body, written once as a template
// over its lane type, runs on float vector lanes (`FV`) for the bulk of a row and on plain float /
// double for the tail and for float64. Provides the few operations those bodies use (load,
// store, +, -, *, fused multiply-add, max, min, zero-unless-positive or -greater, horizontal sum / max /
// min), per-lane running sums (`LaneSums`), the sweep that runs a body over a row
// (`sweep_lanes`) and whole-row sums added by blocks (`RowSums`). The exp(x / T) of these lanes is exp_scalar.h (the formulas, one element) and
// exp_lanes.h (the same on every lane type).
// FV is 8 lanes of AVX2 intrinsics where the variant has AVX2 and FMA (the avx2 and avx512
// variants), else 4 lanes of GCC / Clang vector extensions that the compiler lowers to the
// target's 128-bit vectors (SSE2 on the baseline x86-64 variant, NEON on aarch64). The avx512
// variant runs the bulk of a row on FW, 16 lanes of AVX-512 intrinsics, before one FV step.
// KDFAST_LANES_AVX2 and KDFAST_LANES_WIDE, defined here, say which of these lanes the variant has.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KDFAST_LANES_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define KDFAST_LANES_WIDE 1  // 16 float lanes, FW, and the "wide" exp
#endif
#endif

#ifndef KDFAST_CPU_VARIANT
#error "lanes.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

// ---- scalar lanes (float, double) ----

template <class V>
struct Lane {  // V = float or double: one element
  using Scalar = V;
  static V load(const V* p) { return *p; }
  static V splat(V v) { return v; }
  static V zero() { return V(0); }
};

template <class C>
inline void store(C* p, C v) { *p = v; }
inline float fma_(float a, float b, float c) { return a * b + c; }
inline double fma_(double a, double b, double c) { return a * b + c; }
inline float max_(float a, float b) { return a > b ? a : b; }
inline double max_(double a, double b) { return a > b ? a : b; }
inline float min_(float a, float b) { return a < b ? a : b; }
inline double min_(double a, double b) { return a < b ? a : b; }
// value where condition > 0, else 0 (so 0 * inf or 0 * -inf never reaches a sum).
inline float where_positive(float condition, float value) { return condition > 0.0f ? value : 0.0f; }
inline double where_positive(double condition, double value) { return condition > 0.0 ? value : 0.0; }
// value where a > b, else 0: a comparison of the two values themselves, so that a sign taken of
// two products never depends on whether the compiler fused one of them into a subtraction.
inline float where_greater(float a, float b, float value) { return a > b ? value : 0.0f; }
inline double where_greater(double a, double b, double value) { return a > b ? value : 0.0; }
inline float hsum(float v) { return v; }
inline double hsum(double v) { return v; }
inline float hmax(float v) { return v; }
inline double hmax(double v) { return v; }

#if defined(KDFAST_LANES_AVX2)
// ---- 8 float lanes ----
constexpr int kFloatLanes = 8;
struct FV {
  __m256 v;
};

template <>
struct Lane<FV> {
  using Scalar = float;
  static FV load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static FV splat(float v) { return {_mm256_set1_ps(v)}; }
  static FV zero() { return {_mm256_setzero_ps()}; }
};

inline void store(float* p, FV x) { _mm256_storeu_ps(p, x.v); }
inline FV operator+(FV a, FV b) { return {_mm256_add_ps(a.v, b.v)}; }
inline FV operator-(FV a, FV b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline FV operator*(FV a, FV b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline FV fma_(FV a, FV b, FV c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline FV max_(FV a, FV b) { return {_mm256_max_ps(a.v, b.v)}; }
inline FV min_(FV a, FV b) { return {_mm256_min_ps(a.v, b.v)}; }
inline FV where_greater(FV a, FV b, FV value) { return {_mm256_and_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ), value.v)}; }
inline FV where_positive(FV condition, FV value) {
  return {_mm256_and_ps(_mm256_cmp_ps(condition.v, _mm256_setzero_ps(), _CMP_GT_OQ), value.v)};
}
inline float hsum(FV x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmin(FV x) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(FV x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#if defined(KDFAST_LANES_WIDE)
// ---- 16 float lanes (the AVX-512 variant): the bulk of a row, before one FV block ----
// The same operations on 512-bit registers. A core that executes a 512-bit operation as two
// 256-bit halves (Zen 4) still issues it as one instruction, so twice the elements fit in the
// out-of-order window of the exp-bound loops, whose long dependency chains (~35 cycles per
// exp) otherwise keep the multiply-add pipes idle; cores with 512-bit units do twice the work
// per instruction.
constexpr int kWideLanes = 16;
struct FW {
  __m512 v;
};

template <>
struct Lane<FW> {
  using Scalar = float;
  static FW load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static FW splat(float v) { return {_mm512_set1_ps(v)}; }
  static FW zero() { return {_mm512_setzero_ps()}; }
};

inline void store(float* p, FW x) { _mm512_storeu_ps(p, x.v); }
inline FW operator+(FW a, FW b) { return {_mm512_add_ps(a.v, b.v)}; }
inline FW operator-(FW a, FW b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline FW operator*(FW a, FW b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline FW fma_(FW a, FW b, FW c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline FW max_(FW a, FW b) { return {_mm512_max_ps(a.v, b.v)}; }
inline FW min_(FW a, FW b) { return {_mm512_min_ps(a.v, b.v)}; }
inline FW where_greater(FW a, FW b, FW value) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ), value.v)};
}
inline FW where_positive(FW condition, FW value) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(condition.v, _mm512_setzero_ps(), _CMP_GT_OQ), value.v)};
}
inline __m256 high_half(FW x) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1)); }
inline float hsum(FW x) { return hsum(FV{_mm256_add_ps(_mm512_castps512_ps256(x.v), high_half(x))}); }
inline float hmax(FW x) { return hmax(FV{_mm256_max_ps(_mm512_castps512_ps256(x.v), high_half(x))}); }
inline float hmin(FW x) { return hmin(FV{_mm256_min_ps(_mm512_castps512_ps256(x.v), high_half(x))}); }
#endif
#endif

#if !defined(KDFAST_LANES_AVX2)
// ---- 4 float lanes, portable: GCC / Clang vector extensions, which the compiler lowers to
// the target's 128-bit vectors (SSE2 on baseline x86-64, NEON on aarch64) ----
constexpr int kFloatLanes = 4;
typedef float FVv __attribute__((vector_size(16)));
typedef uint32_t UVv __attribute__((vector_size(16)));

struct FV {
  FVv v;
};

template <>
struct Lane<FV> {
  using Scalar = float;
  static FV load(const float* p) {
    FV r;
    std::memcpy(&r.v, p, sizeof(FVv));
    return r;
  }
  static FV splat(float x) { return {FVv{x, x, x, x}}; }
  static FV zero() { return {FVv{}}; }
};

inline void store(float* p, FV x) { std::memcpy(p, &x.v, sizeof(FVv)); }
inline FV operator+(FV a, FV b) { return {a.v + b.v}; }
inline FV operator-(FV a, FV b) { return {a.v - b.v}; }
inline FV operator*(FV a, FV b) { return {a.v * b.v}; }
inline FV fma_(FV a, FV b, FV c) { return {a.v * b.v + c.v}; }
inline FV max_(FV a, FV b) { return {a.v > b.v ? a.v : b.v}; }  // b where unordered, as max_(float)
inline FV min_(FV a, FV b) { return {a.v < b.v ? a.v : b.v}; }
inline FV where_positive(FV condition, FV value) { return {condition.v > FVv{} ? value.v : FVv{}}; }
inline FV where_greater(FV a, FV b, FV value) { return {a.v > b.v ? value.v : FVv{}}; }
inline float hsum(FV x) { return (x.v[0] + x.v[1]) + (x.v[2] + x.v[3]); }
inline float hmax(FV x) { return max_(max_(x.v[0], x.v[1]), max_(x.v[2], x.v[3])); }
inline float hmin(FV x) { return min_(min_(x.v[0], x.v[1]), min_(x.v[2], x.v[3])); }
#endif

// K running sums, one running maximum and one running minimum for each lane type;
// total(j), maximum() and minimum() fold the lanes (vector lanes first, then the scalar tail).
template <class C, int K>
struct LaneSums {
  static constexpr C kInf = std::numeric_limits<C>::infinity();
  C scalar_sums[K];
  C scalar_max = -kInf, scalar_min = kInf;
  FV vector_sums[K];
  FV vector_max = Lane<FV>::splat(-std::numeric_limits<float>::infinity());
  FV vector_min = Lane<FV>::splat(std::numeric_limits<float>::infinity());
  LaneSums() {
    for (int j = 0; j < K; ++j) {
      scalar_sums[j] = C(0);
      vector_sums[j] = Lane<FV>::zero();
#if defined(KDFAST_LANES_WIDE)
      wide_sums[j] = Lane<FW>::zero();
#endif
    }
  }
  C* sums(C) { return scalar_sums; }
  C& max(C) { return scalar_max; }
  C& min(C) { return scalar_min; }
  FV* sums(FV) { return vector_sums; }
  FV& max(FV) { return vector_max; }
  FV& min(FV) { return vector_min; }
#if defined(KDFAST_LANES_WIDE)
  FW wide_sums[K];
  FW wide_max = Lane<FW>::splat(-std::numeric_limits<float>::infinity());
  FW wide_min = Lane<FW>::splat(std::numeric_limits<float>::infinity());
  FW* sums(FW) { return wide_sums; }
  FW& max(FW) { return wide_max; }
  FW& min(FW) { return wide_min; }
#endif
  // The wide lanes first (AVX-512 variant), then the 8-lane step, then the scalar tail.
  C total(int j) const {
    if constexpr (std::is_same_v<C, float>) {
      float vectors = hsum(vector_sums[j]);
#if defined(KDFAST_LANES_WIDE)
      vectors = hsum(wide_sums[j]) + vectors;
#endif
      return vectors + scalar_sums[j];
    }
    return scalar_sums[j];
  }
  C maximum() const {
    if constexpr (std::is_same_v<C, float>) {
      float vectors = hmax(vector_max);
#if defined(KDFAST_LANES_WIDE)
      vectors = max_(hmax(wide_max), vectors);
#endif
      return max_(vectors, scalar_max);
    }
    return scalar_max;
  }
  C minimum() const {
    if constexpr (std::is_same_v<C, float>) {
      float vectors = hmin(vector_min);
#if defined(KDFAST_LANES_WIDE)
      vectors = min_(hmin(wide_min), vectors);
#endif
      return min_(vectors, scalar_min);
    }
    return scalar_min;
  }
};

// Runs body(lane, i) over i in [0, n): for float in steps of kWideLanes with lane an FW (the
// AVX-512 variant), then in steps of kFloatLanes with lane an FV (at most one step after FW
// lanes), then one element at a time with lane a C (the tail; every element for double). So the
// vector lanes cover the first n - n % kFloatLanes elements in every variant. The body takes
// the lane's type (decltype) to pick its loads, accumulators and exp.
template <class C, class Body>
inline void sweep_lanes(int64_t n, Body&& body) {
  int64_t i = 0;
  if constexpr (std::is_same_v<C, float>) {
#if defined(KDFAST_LANES_WIDE)
    for (; i + kWideLanes <= n; i += kWideLanes) body(Lane<FW>::zero(), i);
#endif
    for (; i + kFloatLanes <= n; i += kFloatLanes) body(Lane<FV>::zero(), i);
  }
  for (; i < n; ++i) body(C(0), i);
}


// The length of a block of a long sum (RowSums): a float lane that holds a large term rounds
// away the small ones added to it, so a sum over a whole row loses accuracy as the row grows
// (the multi-teacher forward_kl loss at V = 128256, T = 0.7: 3e-6 relative on 16 lanes, 1.1e-5
// on the 4-lane baseline variant); summed by blocks of this many elements, it does not.
constexpr int64_t kSumBlock = 2048;

// K sums, a maximum and a minimum over a whole row on the lanes: sweep(n, body) runs
// body(acc, lane, i) over i in [0, n) by sweep_lanes, one block of kSumBlock elements at a time,
// with acc the block's LaneSums<C, K>; each block's totals are added in double and its
// maximum and minimum folded in (NaN skipped, as max_ and min_ do).
template <class C, int K>
struct RowSums {
  double totals[K] = {};
  C maximum = -std::numeric_limits<C>::infinity();
  C minimum = std::numeric_limits<C>::infinity();
  template <class Body>
  void sweep(int64_t n, Body&& body) {
    for (int64_t start = 0; start < n; start += kSumBlock) {
      LaneSums<C, K> acc;
      sweep_lanes<C>(std::min(kSumBlock, n - start), [&](auto lane, int64_t j) { body(acc, lane, start + j); });
      for (int j = 0; j < K; ++j) totals[j] += static_cast<double>(acc.total(j));
      maximum = max_(acc.maximum(), maximum);
      minimum = min_(acc.minimum(), minimum);
    }
  }
  C total(int j) const { return static_cast<C>(totals[j]); }
};
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast