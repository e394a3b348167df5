// Lanes for the CPU kernels' exp-bound row loops: one loop body, written once as a template
// over its lane type, runs on 8 float lanes (AVX2: `F8`) for the bulk of a row and on plain
// float / double for the tail, the baseline variant and float64. Provides the few operations
// those bodies use (load, store, +, -, *, fused multiply-add, max, zero-unless-positive,
// horizontal sum / max) and `ScaledExp`, exp(x / T) for x <= 0.
//
// ScaledExp<float> contract: for x <= 0 and a finite temperature T > 0 with 1/T = inv_t,
// returns exp(x * inv_t) with relative error below 2e-7 (measured against float64: 1.6e-7
// for T in {0.7, 1, 2, 3, 20}), exactly 0 where x * inv_t < -87 (and for x = -inf), NaN for
// NaN. 1/T is folded into the constants, so x * inv_t is never rounded on its own (that
// rounding alone costs up to 4e-6 relative at x/T = -87 when T is not a power of two).
// Method: k = round(8 x / (T ln2)); r = x - k T ln2 / 8 in two parts (Cody-Waite, the high
// part has 13 significant bits so k times it is exact for |k| < 2^11); exp(r / T) by a
// degree-3 minimax polynomial on |r / T| <= ln2 / 16 (2.7e-8); 2^(k/8) = 2^(k >> 3) times a
// table entry 2^((k & 7) / 8), looked up with one in-register permute on AVX2. The table's
// entries carry -(j << 20) so that one add of (bits of k) << 20 forms 2^(k >> 3) 2^(j/8).
// Every lane type computes the same formula, so the vector and scalar paths agree to the
// rounding of fused vs separate multiply-adds.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KDFAST_LANES_AVX2 1
#endif

#ifndef KDFAST_CPU_VARIANT
#error "lanes.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

// exp(x / T) for x <= 0; see the file comment. The double version calls std::exp.
template <class C>
struct ScaledExp;

template <>
struct ScaledExp<double> {
  double inv_t;
  explicit ScaledExp(double inverse_temperature) : inv_t(inverse_temperature) {}
  double operator()(double x) const { return std::exp(x * inv_t); }
  template <bool CUTOFF>
  double apply(double x) const { return std::exp(x * inv_t); }
};

template <>
struct ScaledExp<float> {
  float k_scale;      // 8 / (T ln2)
  float step_hi;      // T ln2 / 8, high part (13 significant bits)
  float step_lo;      // T ln2 / 8 - step_hi
  float b1, b2, b3;   // polynomial a_j / T^j: exp(r/T) ~ 1 + b1 r + b2 r^2 + b3 r^3
  float cutoff;       // -87 T: below it the result is 0
  alignas(32) int32_t table[8];

  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer

  explicit ScaledExp(float inv_t) {
    const double inv = static_cast<double>(inv_t);
    const double ln2 = 0.693147180559945309417;
    k_scale = static_cast<float>(8.0 / ln2 * inv);
    const double step = ln2 / 8.0 / inv;
    int exponent = 0;
    std::frexp(step, &exponent);
    const double quantum = std::ldexp(1.0, exponent - 13);
    step_hi = static_cast<float>(std::nearbyint(step / quantum) * quantum);
    step_lo = static_cast<float>(step - static_cast<double>(step_hi));
    // Minimax (relative error) on |u| <= 1.02 ln2/16 with the constant term fixed at 1.
    b1 = static_cast<float>(1.0000000526269015 * inv);
    b2 = static_cast<float>(0.5000673953754099 * inv * inv);
    b3 = static_cast<float>(0.16664202774905942 * inv * inv * inv);
    cutoff = static_cast<float>(-87.0 / inv);
    for (int j = 0; j < 8; ++j) {
      const float entry = static_cast<float>(std::exp2(j / 8.0));
      int32_t bits;
      std::memcpy(&bits, &entry, 4);
      table[j] = bits - (j << 20);
    }
  }

  float operator()(float x) const { return apply<true>(x); }

  // CUTOFF = false skips the test against `cutoff`: exact only for x >= cutoff (callers
  // check the minimum of their inputs and redo the row with the test where it fails).
  template <bool CUTOFF>
  float apply(float x) const {
    const float shifted = x * k_scale + kMagic;
    const float n = shifted - kMagic;
    float r = x - n * step_hi;
    r = r - n * step_lo;
    const float p = ((b3 * r + b2) * r + b1) * r + 1.0f;
    int32_t k;
    std::memcpy(&k, &shifted, 4);
    const int32_t bits = table[k & 7] + static_cast<int32_t>(static_cast<uint32_t>(k) << 20);
    float scale;
    std::memcpy(&scale, &bits, 4);
    const float y = p * scale;
    if constexpr (!CUTOFF) return y;
    return x < cutoff ? 0.0f : y;  // NaN: the comparison is false and y is NaN
  }
};

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
inline float hsum(float v) { return v; }
inline double hsum(double v) { return v; }
inline float hmax(float v) { return v; }
inline double hmax(double v) { return v; }

#if defined(KDFAST_LANES_AVX2)
// ---- 8 float lanes ----
struct F8 {
  __m256 v;
};

template <>
struct Lane<F8> {
  using Scalar = float;
  static F8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static F8 splat(float v) { return {_mm256_set1_ps(v)}; }
  static F8 zero() { return {_mm256_setzero_ps()}; }
};

inline void store(float* p, F8 x) { _mm256_storeu_ps(p, x.v); }
inline F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 fma_(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F8 max_(F8 a, F8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline F8 min_(F8 a, F8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline F8 where_positive(F8 condition, F8 value) {
  return {_mm256_and_ps(_mm256_cmp_ps(condition.v, _mm256_setzero_ps(), _CMP_GT_OQ), value.v)};
}
inline float hsum(F8 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmin(F8 x) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(F8 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ScaledExp<float> on 8 lanes: the same formula, constants held in registers.
struct ScaledExpF8 {
  __m256 k_scale, step_hi, step_lo, b1, b2, b3, cutoff, magic, one;
  __m256i table;
  explicit ScaledExpF8(const ScaledExp<float>& e)
      : k_scale(_mm256_set1_ps(e.k_scale)), step_hi(_mm256_set1_ps(e.step_hi)), step_lo(_mm256_set1_ps(e.step_lo)),
        b1(_mm256_set1_ps(e.b1)), b2(_mm256_set1_ps(e.b2)), b3(_mm256_set1_ps(e.b3)),
        cutoff(_mm256_set1_ps(e.cutoff)), magic(_mm256_set1_ps(ScaledExp<float>::kMagic)),
        one(_mm256_set1_ps(1.0f)), table(_mm256_load_si256(reinterpret_cast<const __m256i*>(e.table))) {}
  F8 operator()(F8 x) const { return apply<true>(x); }
  template <bool CUTOFF>
  F8 apply(F8 x) const {
    const __m256 shifted = _mm256_fmadd_ps(x.v, k_scale, magic);
    const __m256 n = _mm256_sub_ps(shifted, magic);
    __m256 r = _mm256_fnmadd_ps(n, step_hi, x.v);
    r = _mm256_fnmadd_ps(n, step_lo, r);
    __m256 p = _mm256_fmadd_ps(b3, r, b2);
    p = _mm256_fmadd_ps(p, r, b1);
    p = _mm256_fmadd_ps(p, r, one);
    const __m256i k = _mm256_castps_si256(shifted);
    // permutevar8x32 reads the low 3 bits of each index: the table entry for k & 7.
    const __m256i bits = _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, k), _mm256_slli_epi32(k, 20));
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    if constexpr (!CUTOFF) return {y};
    return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, cutoff, _CMP_LT_OQ), y)};
  }
};
#endif

// ScaledExp for every lane type of compute type C: exp(x) for x of type C or F8.
template <class C>
struct ExpLanes {
  ScaledExp<C> scalar;
#if defined(KDFAST_LANES_AVX2)
  std::conditional_t<std::is_same_v<C, float>, ScaledExpF8, ScaledExp<C>> vector;
  explicit ExpLanes(C inv_t) : scalar(inv_t), vector(scalar) {}
  F8 operator()(F8 x) const { return vector(x); }
  template <bool CUTOFF>
  F8 apply(F8 x) const { return vector.template apply<CUTOFF>(x); }
#else
  explicit ExpLanes(C inv_t) : scalar(inv_t) {}
#endif
  C operator()(C x) const { return scalar(x); }
  template <bool CUTOFF>
  C apply(C x) const { return scalar.template apply<CUTOFF>(x); }
  // The smallest argument whose exp is exact without the cutoff test (float), -inf (double).
  C scalar_cutoff() const {
    if constexpr (std::is_same_v<C, float>) return scalar.cutoff;
    return -std::numeric_limits<C>::infinity();
  }
};

// Whether float rows of this variant run on vector lanes (and try the exp without its
// cutoff test first, see ScaledExp::apply).
template <class C>
constexpr bool kVectorLanes =
#if defined(KDFAST_LANES_AVX2)
    std::is_same_v<C, float>;
#else
    false;
#endif

// K running sums, one running maximum and one running minimum for each lane type;
// total(j), maximum() and minimum() fold the lanes (vector lanes first, then the scalar tail).
template <class C, int K>
struct LaneSums {
  static constexpr C kInf = std::numeric_limits<C>::infinity();
  C scalar_sums[K];
  C scalar_max = -kInf, scalar_min = kInf;
#if defined(KDFAST_LANES_AVX2)
  F8 vector_sums[K];
  F8 vector_max = Lane<F8>::splat(-std::numeric_limits<float>::infinity());
  F8 vector_min = Lane<F8>::splat(std::numeric_limits<float>::infinity());
#endif
  LaneSums() {
    for (int j = 0; j < K; ++j) scalar_sums[j] = C(0);
#if defined(KDFAST_LANES_AVX2)
    for (int j = 0; j < K; ++j) vector_sums[j] = Lane<F8>::zero();
#endif
  }
  C* sums(C) { return scalar_sums; }
  C& max(C) { return scalar_max; }
  C& min(C) { return scalar_min; }
#if defined(KDFAST_LANES_AVX2)
  F8* sums(F8) { return vector_sums; }
  F8& max(F8) { return vector_max; }
  F8& min(F8) { return vector_min; }
#endif
#if defined(KDFAST_LANES_AVX2)
  C total(int j) const {
    if constexpr (kVectorLanes<C>) return hsum(vector_sums[j]) + scalar_sums[j];
    return scalar_sums[j];
  }
  C maximum() const {
    if constexpr (kVectorLanes<C>) return max_(hmax(vector_max), scalar_max);
    return scalar_max;
  }
  C minimum() const {
    if constexpr (kVectorLanes<C>) return min_(hmin(vector_min), scalar_min);
    return scalar_min;
  }
#else
  C total(int j) const { return scalar_sums[j]; }
  C maximum() const { return scalar_max; }
  C minimum() const { return scalar_min; }
#endif
};

// Runs body(lane, i) over i in [0, n): in steps of 8 with lane an F8 where the variant has
// them and C is float, then one element at a time with lane a C. The body takes the lane's
// type (decltype) to pick its loads, accumulators and exp.
template <class C, class Body>
inline void sweep_lanes(int64_t n, Body&& body) {
  int64_t i = 0;
#if defined(KDFAST_LANES_AVX2)
  if constexpr (std::is_same_v<C, float>) {
    for (; i + 8 <= n; i += 8) body(Lane<F8>::zero(), i);
  }
#endif
  for (; i < n; ++i) body(C(0), i);
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
