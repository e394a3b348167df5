// Lanes for the CPU kernels' exp-bound row loops: one loop body, written once as a template
// over its lane type, runs on float vector lanes (`FV`) for the bulk of a row and on plain float /
// double for the tail and for float64. Provides the few operations those bodies use (load,
// store, +, -, *, fused multiply-add, max, min, zero-unless-positive or -greater, horizontal sum / max /
// min) and `ScaledExp`, exp(x / T) for x <= 0.
// FV is 8 lanes of AVX2 intrinsics where the variant has AVX2 and FMA (the avx2 and avx512
// variants), else 4 lanes of GCC / Clang vector extensions that the compiler lowers to the
// target's 128-bit vectors (SSE2 on the baseline x86-64 variant, NEON on aarch64). The avx512
// variant runs the bulk of a row on FW, 16 lanes of AVX-512 intrinsics, before one FV step.
//
// ScaledExp<float> contract: for x <= 0 and a scale 1/T = inv_t with 1e-37 <= inv_t <= 1e37
// (given in double), returns exp(x * inv_t) with relative error below 2e-7 (measured against
// float64), exactly 0 where x * inv_t < -87 (and for x = -inf), NaN for NaN. x * inv_t is never
// rounded on its own (that rounding alone costs up to 4e-6 relative at x/T = -87 when T is not a
// power of two): the range reduction works on x with steps of T ln2 / 8 (or T ln2) and leaves a
// remainder r, |r / T| <= ln2 / 16. The polynomial in u = r / T has fixed coefficients; when the
// coefficients with the powers of 1/T folded in (a polynomial in r) are normal floats
// (`foldable`, every practical temperature on the AVX2 lanes), `apply<CUTOFF, true>` uses
// those and saves the multiplication u = r * inv_t; for extreme temperatures, where they would
// overflow or underflow float, `apply<CUTOFF, false>` scales r. Both agree to within rounding.
// Three formulas, one per build, used by every lane type of that build (vector lanes and the
// scalar tail agree):
// - AVX-512 ("wide", the avx512 variant): m = k / 32 = round(32 x / (T ln2)) / 32, read from
//   x / (T ln2) + 1.5 2^18 (whose last five mantissa bits are then k mod 32); r = x - m T ln2
//   in two parts (the high part has 12 significant bits, so m times it is exact for
//   |k| < 2^12); exp(u) - 1 = q by a degree-2 minimax polynomial on |u| <= ln2 / 64 (5.3e-8);
//   t = 2^((k mod 32) / 32) from a 32-entry table (one two-source permute), then t + t q in
//   one rounding and 2^floor(m) by vscalefps, which the cutoff test masks: ten operations per
//   16 lanes, against the table formula's twelve. Measured worst case 1.65e-7 for 1/T from
//   1e-30 to 1e30. Its 8-lane and scalar forms run the same operations (the scalar one with
//   std::fma and vscalefss), so every lane width gives the same bits.
// - AVX2 ("table", the avx2 variant): k = round(8 x / (T ln2)); r = x - k T ln2 / 8 in two parts (Cody-Waite,
//   the high part has 13 significant bits so k times it is exact for |k| < 2^11); exp(u) by a
//   degree-3 minimax polynomial on |u| <= ln2 / 16 (2.7e-8); 2^(k/8) = 2^(k >> 3) times a
//   table entry 2^((k & 7) / 8), looked up with one in-register permute. The entries carry
//   -(j << 20) so that one add of (bits of k) << 20 forms 2^(k >> 3) 2^(j/8).
//   Measured worst case 1.6e-7 for 1/T from 1e-30 to 1e30.
// - portable ("poly"): the same with k = round(x / (T ln2)), no table and a degree-6 minimax
//   polynomial on |u| <= ln2 / 2 (2.1e-9). Measured worst case 1.2e-7.
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

#if defined(KDFAST_LANES_WIDE)
// 2^(j / 32), j = 0..31, each rounded once to float: the "wide" exp's table.
alignas(64) inline constexpr float kExp2Table32[32] = {
    0x1p+0f,       0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f, 0x1.2387a6p+0f,
    0x1.29e9ep+0f, 0x1.306fep+0f,  0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f, 0x1.4bfdaep+0f, 0x1.5342b6p+0f,
    0x1.5ab07ep+0f, 0x1.6247ecp+0f, 0x1.6a09e6p+0f, 0x1.71f75ep+0f, 0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f,
    0x1.93737cp+0f, 0x1.9c4918p+0f, 0x1.a5503cp+0f, 0x1.ae89fap+0f, 0x1.b7f77p+0f,  0x1.c199bep+0f, 0x1.cb720ep+0f,
    0x1.d5818ep+0f, 0x1.dfc974p+0f, 0x1.ea4afap+0f, 0x1.f50766p+0f};

// The constants of the "wide" exp (file comment) for one temperature, and its scalar form:
// exp(d / T) for -87.4 T <= d <= 43 T (|32 m| < 2^12), without any range test. ScaledExp<float>
// adds the cutoff test to it, FlooredExp a floor.
struct WideExp {
  static constexpr float kMagic = 393216.0f;  // 1.5 * 2^18: adding it rounds to a multiple of 1/32
  // Minimax (relative error) on |u| <= ln2 / 64, constant term fixed at 1.
  static constexpr double a1 = 1.0000146427641559, a2 = 0.499999980605532;
  float k_scale, step_hi, step_lo, inv_t;
  float a1_f, a2_f, fa1, fa2;  // a1, a2 as floats; folded: a1 / T, a2 / T^2
  bool foldable;               // fa1 and fa2 are normal floats with headroom

  explicit WideExp(double inv) {
    const double ln2 = 0.693147180559945309417;
    const double temperature = 1.0 / inv;
    k_scale = static_cast<float>(inv / ln2);
    // step = T ln2 = hi + lo, hi with 12 significant bits: m hi is exact for |32 m| < 2^12.
    const double step = ln2 * temperature;
    int exponent = 0;
    std::frexp(step, &exponent);
    const double quantum = std::ldexp(1.0, exponent - 12);
    step_hi = static_cast<float>(std::nearbyint(step / quantum) * quantum);
    step_lo = static_cast<float>(step - static_cast<double>(step_hi));
    inv_t = static_cast<float>(inv);
    a1_f = static_cast<float>(a1);
    a2_f = static_cast<float>(a2);
    fa1 = static_cast<float>(a1 * inv);
    fa2 = static_cast<float>(a2 * inv * inv);
    const double smallest = std::min({1.0, a1 * inv, a2 * inv * inv});
    const double largest = std::max({1.0, a1 * inv, a2 * inv * inv});
    foldable = smallest > 1e-30 && largest < 1e30;
  }

  // The same operations, in the same order and roundings, as WideExpFW::core on one lane.
  template <bool FOLD>
  float core(float d) const {
    const float shifted = std::fma(d, k_scale, kMagic);
    const float m = shifted - kMagic;
    float r = std::fma(-m, step_hi, d);
    r = std::fma(-m, step_lo, r);
    if constexpr (!FOLD) r = r * inv_t;
    const float q = std::fma(FOLD ? fa2 : a2_f, r, FOLD ? fa1 : a1_f) * r;  // exp(r / T) - 1
    int32_t k;
    std::memcpy(&k, &shifted, 4);
    const float t = kExp2Table32[k & 31];
    return _mm_cvtss_f32(_mm_scalef_ss(_mm_set_ss(std::fma(t, q, t)), _mm_set_ss(m)));  // times 2^floor(m)
  }
};
#endif

// exp(x / T) for x <= 0; see the file comment. The double version calls std::exp.
template <class C>
struct ScaledExp;

template <>
struct ScaledExp<double> {
  double inv_t;
  explicit ScaledExp(double inverse_temperature) : inv_t(inverse_temperature) {}
  double operator()(double x) const { return std::exp(x * inv_t); }
  template <bool CUTOFF, bool FOLD = false>
  double apply(double x) const { return std::exp(x * inv_t); }
};

template <>
struct ScaledExp<float> {
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer

  float cutoff;  // -87 T: below it the result is 0
  float inv_t;   // 1/T: u = r / T
  // "table": k = round(x k_scale), steps of T ln2 / 8, exp(u) ~ 1 + b1 u + b2 u^2 + b3 u^3.
  float k_scale, step_hi, step_lo;
  alignas(32) int32_t table[8];
  // "poly": k = round(x poly_k_scale), steps of T ln2, exp(u) ~ 1 + c[0] u + ... + c[5] u^6.
  float poly_k_scale, poly_step_hi, poly_step_lo;
  // Minimax (relative error) on |u| <= 1.02 ln2/16, constant term fixed at 1.
  static constexpr float b1 = 1.0000000526269015f, b2 = 0.5000673953754099f, b3 = 0.16664202774905942f;
  // Minimax (relative error) on |u| <= 1.01 ln2/2, constant term fixed at 1.
  static constexpr float c[6] = {1.0000000340794126f, 0.4999999385264296f, 0.16666421889011615f,
                                 0.041668056637003965f, 0.008374965167989867f, 0.0013842711447067165f};
  // The same polynomials in r: b_k / T^k and c[j] / T^(j+1), valid when `foldable`.
  float fb1, fb2, fb3;
  float fc[6];
  bool foldable;
#if defined(KDFAST_LANES_WIDE)
  WideExp wide;  // the AVX-512 build's formula
#endif

  explicit ScaledExp(double inv)
#if defined(KDFAST_LANES_WIDE)
      : wide(inv)
#endif
  {
    const double ln2 = 0.693147180559945309417;
    inv_t = static_cast<float>(inv);
    cutoff = static_cast<float>(-87.0 / inv);
    k_scale = static_cast<float>(8.0 / ln2 * inv);
    split_step(ln2 / 8.0 / inv, step_hi, step_lo);
    for (int j = 0; j < 8; ++j) {
      const float entry = static_cast<float>(std::exp2(j / 8.0));
      int32_t bits;
      std::memcpy(&bits, &entry, 4);
      table[j] = bits - (j << 20);
    }
    poly_k_scale = static_cast<float>(inv / ln2);
    split_step(ln2 / inv, poly_step_hi, poly_step_lo);
    // Folded coefficients, kept only where every one is a normal float with headroom.
    const double table_b[3] = {b1, b2, b3};
    double power = 1.0, smallest = 1.0, largest = 1.0;
    float* folded_b[3] = {&fb1, &fb2, &fb3};
    for (int j = 0; j < 3; ++j) {
      power *= inv;
      const double value = table_b[j] * power;
      *folded_b[j] = static_cast<float>(value);
#if defined(KDFAST_LANES_AVX2)
      smallest = std::min(smallest, value);
      largest = std::max(largest, value);
#endif
    }
    power = 1.0;
    for (int j = 0; j < 6; ++j) {
      power *= inv;
      const double value = static_cast<double>(c[j]) * power;
      fc[j] = static_cast<float>(value);
#if !defined(KDFAST_LANES_AVX2)
      smallest = std::min(smallest, value);
      largest = std::max(largest, value);
#endif
    }
#if defined(KDFAST_LANES_WIDE)
    foldable = wide.foldable;  // the coefficients the build's formula folds
#else
    foldable = smallest > 1e-30 && largest < 1e30;
#endif
  }

  float operator()(float x) const { return apply<true>(x); }

  // The build's formula (see the file comment). CUTOFF = false skips the test against
  // `cutoff`: exact only for x >= cutoff (callers check the minimum of their inputs and redo
  // the row with the test where it fails). FOLD = true: the folded coefficients (only when
  // `foldable`).
  template <bool CUTOFF, bool FOLD = false>
  float apply(float x) const {
#if defined(KDFAST_LANES_WIDE)
    const float y = wide.core<FOLD>(x);
    if constexpr (!CUTOFF) return y;
    return x < cutoff ? 0.0f : y;  // NaN: the comparison is false and y is NaN
#elif defined(KDFAST_LANES_AVX2)
    return apply_table<CUTOFF, FOLD>(x);
#else
    return apply_poly<CUTOFF, FOLD>(x);
#endif
  }

  template <bool CUTOFF, bool FOLD>
  float apply_table(float x) const {
    const float shifted = x * k_scale + kMagic;
    const float n = shifted - kMagic;
    float r = x - n * step_hi;
    r = r - n * step_lo;
    float p;
    if constexpr (FOLD) {
      p = ((fb3 * r + fb2) * r + fb1) * r + 1.0f;
    } else {
      const float u = r * inv_t;
      p = ((b3 * u + b2) * u + b1) * u + 1.0f;
    }
    int32_t k;
    std::memcpy(&k, &shifted, 4);
    const int32_t bits = table[k & 7] + static_cast<int32_t>(static_cast<uint32_t>(k) << 20);
    float scale;
    std::memcpy(&scale, &bits, 4);
    const float y = p * scale;
    if constexpr (!CUTOFF) return y;
    return x < cutoff ? 0.0f : y;  // NaN: the comparison is false and y is NaN
  }

  template <bool CUTOFF, bool FOLD>
  float apply_poly(float x) const {
    const float shifted = x * poly_k_scale + kMagic;
    const float n = shifted - kMagic;
    float r = x - n * poly_step_hi;
    r = r - n * poly_step_lo;
    const float u = FOLD ? r : r * inv_t;
    const float* coefficients = FOLD ? fc : c;
    float p = coefficients[5];
    for (int j = 4; j >= 0; --j) p = p * u + coefficients[j];
    p = p * u + 1.0f;
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

// ScaledExp<float> on 8 lanes: the same formula, constants held in registers.
struct ScaledExpFV {
  __m256 k_scale, step_hi, step_lo, inv_t, b1, b2, b3, fb1, fb2, fb3, cutoff, magic, one;
  __m256i table;
  explicit ScaledExpFV(const ScaledExp<float>& e)
      : k_scale(_mm256_set1_ps(e.k_scale)), step_hi(_mm256_set1_ps(e.step_hi)), step_lo(_mm256_set1_ps(e.step_lo)),
        inv_t(_mm256_set1_ps(e.inv_t)), b1(_mm256_set1_ps(ScaledExp<float>::b1)),
        b2(_mm256_set1_ps(ScaledExp<float>::b2)), b3(_mm256_set1_ps(ScaledExp<float>::b3)),
        fb1(_mm256_set1_ps(e.fb1)), fb2(_mm256_set1_ps(e.fb2)), fb3(_mm256_set1_ps(e.fb3)),
        cutoff(_mm256_set1_ps(e.cutoff)), magic(_mm256_set1_ps(ScaledExp<float>::kMagic)),
        one(_mm256_set1_ps(1.0f)), table(_mm256_load_si256(reinterpret_cast<const __m256i*>(e.table))) {}
  FV operator()(FV x) const { return apply<true>(x); }
  template <bool CUTOFF, bool FOLD = false>
  FV apply(FV x) const {
    const __m256 shifted = _mm256_fmadd_ps(x.v, k_scale, magic);
    const __m256 n = _mm256_sub_ps(shifted, magic);
    __m256 r = _mm256_fnmadd_ps(n, step_hi, x.v);
    r = _mm256_fnmadd_ps(n, step_lo, r);
    __m256 p;
    if constexpr (FOLD) {
      p = _mm256_fmadd_ps(fb3, r, fb2);
      p = _mm256_fmadd_ps(p, r, fb1);
      p = _mm256_fmadd_ps(p, r, one);
    } else {
      const __m256 u = _mm256_mul_ps(r, inv_t);
      p = _mm256_fmadd_ps(b3, u, b2);
      p = _mm256_fmadd_ps(p, u, b1);
      p = _mm256_fmadd_ps(p, u, one);
    }
    const __m256i k = _mm256_castps_si256(shifted);
    // permutevar8x32 reads the low 3 bits of each index: the table entry for k & 7.
    const __m256i bits = _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, k), _mm256_slli_epi32(k, 20));
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    if constexpr (!CUTOFF) return {y};
    return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, cutoff, _CMP_LT_OQ), y)};
  }
};

#if defined(KDFAST_LANES_WIDE)
// ---- 16 float lanes (the AVX-512 variant): the bulk of a row, before one FV block ----
// The same formulas on 512-bit registers. A core that executes a 512-bit operation as two
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

// The wide exp on 16 lanes: WideExp::core lane by lane (one two-source permute reads the last
// five bits of each index, k mod 32). `fold` picks the polynomial's coefficients: core<FOLD>
// must be called with FOLD == fold. MASKED: lanes outside `keep` become 0 at the last step.
struct WideExpFW {
  __m512 k_scale, step_hi, step_lo, inv_t, a1, a2, magic, table_low, table_high;
  WideExpFW(const WideExp& e, bool fold)
      : k_scale(_mm512_set1_ps(e.k_scale)), step_hi(_mm512_set1_ps(e.step_hi)), step_lo(_mm512_set1_ps(e.step_lo)),
        inv_t(_mm512_set1_ps(e.inv_t)), a1(_mm512_set1_ps(fold ? e.fa1 : e.a1_f)),
        a2(_mm512_set1_ps(fold ? e.fa2 : e.a2_f)), magic(_mm512_set1_ps(WideExp::kMagic)),
        table_low(_mm512_load_ps(kExp2Table32)), table_high(_mm512_load_ps(kExp2Table32 + 16)) {}
  template <bool FOLD, bool MASKED = false>
  __m512 core(__m512 d, __mmask16 keep = 0) const {
    const __m512 shifted = _mm512_fmadd_ps(d, k_scale, magic);
    const __m512 m = _mm512_sub_ps(shifted, magic);
    __m512 r = _mm512_fnmadd_ps(m, step_hi, d);
    r = _mm512_fnmadd_ps(m, step_lo, r);
    if constexpr (!FOLD) r = _mm512_mul_ps(r, inv_t);
    const __m512 q = _mm512_mul_ps(_mm512_fmadd_ps(a2, r, a1), r);  // exp(r / T) - 1
    const __m512 t = _mm512_permutex2var_ps(table_low, _mm512_castps_si512(shifted), table_high);
    const __m512 scaled = _mm512_fmadd_ps(t, q, t);  // t (1 + q), rounded once
    if constexpr (MASKED) return _mm512_maskz_scalef_ps(keep, scaled, m);  // times 2^floor(m)
    return _mm512_scalef_ps(scaled, m);
  }
};

// ScaledExp<float> on 16 lanes: the wide exp; the cutoff test masks its last step (lanes
// below the cutoff become 0; NaN compares unordered and is kept).
struct ScaledExpFW {
  WideExpFW e;
  __m512 cutoff;
  // fold: the FOLD that apply will be called with.
  explicit ScaledExpFW(const ScaledExp<float>& x, bool fold = false)
      : e(x.wide, fold), cutoff(_mm512_set1_ps(x.cutoff)) {}
  FW operator()(FW x) const { return apply<true>(x); }
  template <bool CUTOFF, bool FOLD = false>
  FW apply(FW x) const {
    if constexpr (!CUTOFF) return {e.template core<FOLD>(x.v)};
    return {e.template core<FOLD, true>(x.v, _mm512_cmp_ps_mask(x.v, cutoff, _CMP_NLT_UQ))};
  }
};

// ---- exp(x / T) with a floor, for long sums (the AVX-512 variant) ----
// FlooredExp: exp(max(x, floor) / T) for x <= 0, floor = -86 T (or -FLT_MAX where that is
// lower), on 16 lanes: the wide exp of max(x, floor), relative error below 2e-7 against
// float64 for x >= floor; below it the result is exp(floor / T) ~ 4.5e-38 (also for x = -inf),
// never 0 and never denormal; NaN gives NaN. Meant for sums whose callers keep them only when
// they are large (compress_topk keeps a chunk's sum of 2048 terms only when it is >= 1e-20, so
// the floor adds at most 1e-34 of it), where the floor spares the cutoff test and every
// denormal: ten operations per 16 lanes. FOLD: `foldable` (WideExp).
struct FlooredExp {
  float floor;
  WideExp wide;
  bool foldable;
  explicit FlooredExp(double inv)
      : floor(static_cast<float>(std::max(-86.0 / inv, -static_cast<double>(std::numeric_limits<float>::max())))),
        wide(inv), foldable(wide.foldable) {}
};

struct FlooredExpFW {
  __m512 floor;
  WideExpFW e;
  explicit FlooredExpFW(const FlooredExp& x) : floor(_mm512_set1_ps(x.floor)), e(x.wide, x.foldable) {}
  // FOLD must equal the FlooredExp's `foldable`.
  template <bool FOLD>
  FW apply(FW x) const {
    return {e.template core<FOLD>(_mm512_max_ps(floor, x.v))};  // in this order NaN stays NaN
  }
};
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

// ScaledExp<float> on the portable lanes: its "poly" formula (no table), on whole vectors.
struct ScaledExpFV {
  FVv k_scale, step_hi, step_lo, inv_t, cutoff, magic, one;
  FVv c[6], fc[6];
  explicit ScaledExpFV(const ScaledExp<float>& e)
      : k_scale(Lane<FV>::splat(e.poly_k_scale).v), step_hi(Lane<FV>::splat(e.poly_step_hi).v),
        step_lo(Lane<FV>::splat(e.poly_step_lo).v), inv_t(Lane<FV>::splat(e.inv_t).v),
        cutoff(Lane<FV>::splat(e.cutoff).v), magic(Lane<FV>::splat(ScaledExp<float>::kMagic).v),
        one(Lane<FV>::splat(1.0f).v) {
    for (int j = 0; j < 6; ++j) {
      c[j] = Lane<FV>::splat(ScaledExp<float>::c[j]).v;
      fc[j] = Lane<FV>::splat(e.fc[j]).v;
    }
  }
  FV operator()(FV x) const { return apply<true>(x); }
  template <bool CUTOFF, bool FOLD = false>
  FV apply(FV x) const {
    const FVv shifted = x.v * k_scale + magic;
    const FVv n = shifted - magic;
    FVv r = x.v - n * step_hi;
    r = r - n * step_lo;
    const FVv u = FOLD ? r : r * inv_t;
    const FVv* coefficients = FOLD ? fc : c;
    FVv p = coefficients[5];
    for (int j = 4; j >= 0; --j) p = p * u + coefficients[j];
    p = p * u + one;
    // A cast between vector types of one size keeps the bits (GCC / Clang vector semantics).
    const UVv bits = ((UVv)shifted - 0x4B400000u + 127u) << 23;  // NOLINT: the bit cast
    const FVv y = p * (FVv)bits;
    if constexpr (!CUTOFF) return {y};
    return {x.v < cutoff ? FVv{} : y};
  }
};
#endif

// ScaledExp for every lane type of compute type C: exp(x) for x of type C, FV (or FW). It holds
// only the scalar constants (about 130 bytes, cheap to copy: the chunk loops take a local copy
// per call so that nothing they store can alias it); the vector exps are built from them at
// each use, and the compiler hoists those broadcasts out of the loops.
template <class C>
struct ExpLanes {
  ScaledExp<C> scalar;
  explicit ExpLanes(double inv_t) : scalar(inv_t) {}
#if defined(KDFAST_LANES_WIDE)
  FW operator()(FW x) const { return ScaledExpFW(scalar)(x); }
  template <bool CUTOFF, bool FOLD = false>
  FW apply(FW x) const { return ScaledExpFW(scalar, FOLD).template apply<CUTOFF, FOLD>(x); }
#endif
#if defined(KDFAST_LANES_WIDE)
  // 8 lanes through the 16-lane exp (the upper half zero), so that they give its bits.
  FV operator()(FV x) const { return apply<true>(x); }
  template <bool CUTOFF, bool FOLD = false>
  FV apply(FV x) const {
    const FW y = ScaledExpFW(scalar, FOLD).template apply<CUTOFF, FOLD>(FW{_mm512_zextps256_ps512(x.v)});
    return {_mm512_castps512_ps256(y.v)};
  }
#else
  FV operator()(FV x) const { return ScaledExpFV(scalar)(x); }
  template <bool CUTOFF, bool FOLD = false>
  FV apply(FV x) const { return ScaledExpFV(scalar).template apply<CUTOFF, FOLD>(x); }
#endif
  C operator()(C x) const { return scalar(x); }
  template <bool CUTOFF, bool FOLD = false>
  C apply(C x) const { return scalar.template apply<CUTOFF, FOLD>(x); }
  // Whether apply<CUTOFF, true> may be used (float: the folded coefficients are normal floats).
  bool foldable() const {
    if constexpr (std::is_same_v<C, float>) return scalar.foldable;
    return false;
  }
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

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
