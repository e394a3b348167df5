// Lanes for the CPU kernels' exp-bound row loops: one loop body, written once as a template
// over its lane type, runs on float vector lanes (`FV`) for the bulk of a row and on plain float /
// double for the tail and for float64. Provides the few operations those bodies use (load,
// store, +, -, *, fused multiply-add, max, min, zero-unless-positive, horizontal sum / max /
// min) and `ScaledExp`, exp(x / T) for x <= 0.
// FV is 8 lanes of AVX2 intrinsics where the variant has AVX2 and FMA (the avx2 and avx512
// variants), else 4 lanes of GCC / Clang vector extensions that the compiler lowers to the
// target's 128-bit vectors (SSE2 on the baseline x86-64 variant, NEON on aarch64).
//
// ScaledExp<float> contract: for x <= 0 and a finite temperature T > 0 with 1/T = inv_t,
// returns exp(x * inv_t) with relative error below 2e-7 (measured against float64), exactly 0
// where x * inv_t < -87 (and for x = -inf), NaN for NaN. 1/T is folded into the constants, so
// x * inv_t is never rounded on its own (that rounding alone costs up to 4e-6 relative at
// x/T = -87 when T is not a power of two). Two formulas, one per build, used by every lane
// type of that build (vector lanes and the scalar tail agree):
// - AVX2 ("table"): k = round(8 x / (T ln2)); r = x - k T ln2 / 8 in two parts (Cody-Waite,
//   the high part has 13 significant bits so k times it is exact for |k| < 2^11); exp(r / T)
//   by a degree-3 minimax polynomial on |r / T| <= ln2 / 16 (2.7e-8); 2^(k/8) = 2^(k >> 3)
//   times a table entry 2^((k & 7) / 8), looked up with one in-register permute. The
//   entries carry -(j << 20) so that one add of (bits of k) << 20 forms 2^(k >> 3) 2^(j/8).
//   Measured worst case 1.6e-7 for T in {0.7, 1, 2, 3, 20}.
// - portable ("poly"): the same with k = round(x / (T ln2)), no table and a degree-6 minimax
//   polynomial on |r / T| <= ln2 / 2 (2.1e-9). Measured worst case 1.2e-7.
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
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer

  float cutoff;  // -87 T: below it the result is 0
  // "table": k = round(x k_scale), steps of T ln2 / 8, exp(r/T) ~ 1 + b1 r + b2 r^2 + b3 r^3.
  float k_scale, step_hi, step_lo, b1, b2, b3;
  alignas(32) int32_t table[8];
  // "poly": k = round(x poly_k_scale), steps of T ln2, exp(r/T) ~ 1 + c[0] r + ... + c[5] r^6.
  float poly_k_scale, poly_step_hi, poly_step_lo;
  float c[6];

  explicit ScaledExp(float inv_t) {
    const double inv = static_cast<double>(inv_t);
    const double ln2 = 0.693147180559945309417;
    cutoff = static_cast<float>(-87.0 / inv);
    k_scale = static_cast<float>(8.0 / ln2 * inv);
    split_step(ln2 / 8.0 / inv, step_hi, step_lo);
    // Minimax (relative error) on |u| <= 1.02 ln2/16, constant term fixed at 1.
    b1 = static_cast<float>(1.0000000526269015 * inv);
    b2 = static_cast<float>(0.5000673953754099 * inv * inv);
    b3 = static_cast<float>(0.16664202774905942 * inv * inv * inv);
    for (int j = 0; j < 8; ++j) {
      const float entry = static_cast<float>(std::exp2(j / 8.0));
      int32_t bits;
      std::memcpy(&bits, &entry, 4);
      table[j] = bits - (j << 20);
    }
    poly_k_scale = static_cast<float>(inv / ln2);
    split_step(ln2 / inv, poly_step_hi, poly_step_lo);
    // Minimax (relative error) on |u| <= 1.01 ln2/2, constant term fixed at 1.
    const double poly[6] = {1.0000000340794126, 0.4999999385264296, 0.16666421889011615,
                            0.041668056637003965, 0.008374965167989867, 0.0013842711447067165};
    double power = 1.0;
    for (int j = 0; j < 6; ++j) {
      power *= inv;
      c[j] = static_cast<float>(poly[j] * power);
    }
  }

  float operator()(float x) const { return apply<true>(x); }

  // The build's formula (see the file comment). CUTOFF = false skips the test against
  // `cutoff`: exact only for x >= cutoff (callers check the minimum of their inputs and redo
  // the row with the test where it fails).
  template <bool CUTOFF>
  float apply(float x) const {
#if defined(KDFAST_LANES_AVX2)
    return apply_table<CUTOFF>(x);
#else
    return apply_poly<CUTOFF>(x);
#endif
  }

  template <bool CUTOFF>
  float apply_table(float x) const {
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

  template <bool CUTOFF>
  float apply_poly(float x) const {
    const float shifted = x * poly_k_scale + kMagic;
    const float n = shifted - kMagic;
    float r = x - n * poly_step_hi;
    r = r - n * poly_step_lo;
    float p = c[5];
    for (int j = 4; j >= 0; --j) p = p * r + c[j];
    p = p * r + 1.0f;
    int32_t k;
    std::memcpy(&k, &shifted, 4);
    // 2^k assembled in the exponent field: (k + 127) << 23, k read from the shifted bits.
    const int32_t bits = static_cast<int32_t>(static_cast<uint32_t>(k - 0x4B400000 + 127) << 23);
    float scale;
    std::memcpy(&scale, &bits, 4);
    const float y = p * scale;
    if constexpr (!CUTOFF) return y;
    return x < cutoff ? 0.0f : y;
  }

 private:
  // step = hi + lo with hi rounded to 13 significant bits (k hi exact for |k| < 2^11).
  static void split_step(double step, float& hi, float& lo) {
    int exponent = 0;
    std::frexp(step, &exponent);
    const double quantum = std::ldexp(1.0, exponent - 13);
    hi = static_cast<float>(std::nearbyint(step / quantum) * quantum);
    lo = static_cast<float>(step - static_cast<double>(hi));
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

// ScaledExp<float> on 8 lanes: the same formula, constants held in registers.
struct ScaledExpFV {
  __m256 k_scale, step_hi, step_lo, b1, b2, b3, cutoff, magic, one;
  __m256i table;
  explicit ScaledExpFV(const ScaledExp<float>& e)
      : k_scale(_mm256_set1_ps(e.k_scale)), step_hi(_mm256_set1_ps(e.step_hi)), step_lo(_mm256_set1_ps(e.step_lo)),
        b1(_mm256_set1_ps(e.b1)), b2(_mm256_set1_ps(e.b2)), b3(_mm256_set1_ps(e.b3)),
        cutoff(_mm256_set1_ps(e.cutoff)), magic(_mm256_set1_ps(ScaledExp<float>::kMagic)),
        one(_mm256_set1_ps(1.0f)), table(_mm256_load_si256(reinterpret_cast<const __m256i*>(e.table))) {}
  FV operator()(FV x) const { return apply<true>(x); }
  template <bool CUTOFF>
  FV apply(FV x) const {
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
inline float hsum(FV x) { return (x.v[0] + x.v[1]) + (x.v[2] + x.v[3]); }
inline float hmax(FV x) { return max_(max_(x.v[0], x.v[1]), max_(x.v[2], x.v[3])); }
inline float hmin(FV x) { return min_(min_(x.v[0], x.v[1]), min_(x.v[2], x.v[3])); }

// ScaledExp<float> on the portable lanes: its "poly" formula (no table), on whole vectors.
struct ScaledExpFV {
  FVv k_scale, step_hi, step_lo, cutoff, magic, one;
  FVv c[6];
  explicit ScaledExpFV(const ScaledExp<float>& e)
      : k_scale(Lane<FV>::splat(e.poly_k_scale).v), step_hi(Lane<FV>::splat(e.poly_step_hi).v),
        step_lo(Lane<FV>::splat(e.poly_step_lo).v), cutoff(Lane<FV>::splat(e.cutoff).v),
        magic(Lane<FV>::splat(ScaledExp<float>::kMagic).v), one(Lane<FV>::splat(1.0f).v) {
    for (int j = 0; j < 6; ++j) c[j] = Lane<FV>::splat(e.c[j]).v;
  }
  FV operator()(FV x) const { return apply<true>(x); }
  template <bool CUTOFF>
  FV apply(FV x) const {
    const FVv shifted = x.v * k_scale + magic;
    const FVv n = shifted - magic;
    FVv r = x.v - n * step_hi;
    r = r - n * step_lo;
    FVv p = c[5];
    for (int j = 4; j >= 0; --j) p = p * r + c[j];
    p = p * r + one;
    // A cast between vector types of one size keeps the bits (GCC / Clang vector semantics).
    const UVv bits = ((UVv)shifted - 0x4B400000u + 127u) << 23;  // NOLINT: the bit cast
    const FVv y = p * (FVv)bits;
    if constexpr (!CUTOFF) return {y};
    return {x.v < cutoff ? FVv{} : y};
  }
};
#endif

// ScaledExp for every lane type of compute type C: exp(x) for x of type C or FV.
template <class C>
struct ExpLanes {
  ScaledExp<C> scalar;
  std::conditional_t<std::is_same_v<C, float>, ScaledExpFV, ScaledExp<C>> vector;
  explicit ExpLanes(C inv_t) : scalar(inv_t), vector(scalar) {}
  FV operator()(FV x) const { return vector(x); }
  template <bool CUTOFF>
  FV apply(FV x) const { return vector.template apply<CUTOFF>(x); }
  C operator()(C x) const { return scalar(x); }
  template <bool CUTOFF>
  C apply(C x) const { return scalar.template apply<CUTOFF>(x); }
  // The smallest argument whose exp is exact without the cutoff test (float), -inf (double).
  C scalar_cutoff() const {
    if constexpr (std::is_same_v<C, float>) return scalar.cutoff;
    return -std::numeric_limits<C>::infinity();
  }
};

// Whether rows of compute type C first try the exp without its cutoff test (see the note
// before student_exp_row in multi_teacher_forward_kl_cpu.cpp): float on AVX2 lanes, where
// dropping the test saves two of the exp's fifteen instructions. The portable lanes always test.
template <class C>
constexpr bool kTryWithoutCutoff =
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
  FV vector_sums[K];
  FV vector_max = Lane<FV>::splat(-std::numeric_limits<float>::infinity());
  FV vector_min = Lane<FV>::splat(std::numeric_limits<float>::infinity());
  LaneSums() {
    for (int j = 0; j < K; ++j) {
      scalar_sums[j] = C(0);
      vector_sums[j] = Lane<FV>::zero();
    }
  }
  C* sums(C) { return scalar_sums; }
  C& max(C) { return scalar_max; }
  C& min(C) { return scalar_min; }
  FV* sums(FV) { return vector_sums; }
  FV& max(FV) { return vector_max; }
  FV& min(FV) { return vector_min; }
  C total(int j) const {
    if constexpr (std::is_same_v<C, float>) return hsum(vector_sums[j]) + scalar_sums[j];
    return scalar_sums[j];
  }
  C maximum() const {
    if constexpr (std::is_same_v<C, float>) return max_(hmax(vector_max), scalar_max);
    return scalar_max;
  }
  C minimum() const {
    if constexpr (std::is_same_v<C, float>) return min_(hmin(vector_min), scalar_min);
    return scalar_min;
  }
};

// Runs body(lane, i) over i in [0, n): for float in steps of kFloatLanes with lane an FV, then one
// element at a time with lane a C (the tail; every element for double). The body takes the
// lane's type (decltype) to pick its loads, accumulators and exp.
template <class C, class Body>
inline void sweep_lanes(int64_t n, Body&& body) {
  int64_t i = 0;
  if constexpr (std::is_same_v<C, float>) {
    for (; i + kFloatLanes <= n; i += kFloatLanes) body(Lane<FV>::zero(), i);
  }
  for (; i < n; ++i) body(C(0), i);
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
