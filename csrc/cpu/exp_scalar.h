// exp(x / T) of the CPU kernels' lanes, one element at a time: the formulas and their constants,
// built once per call from 1/T (`ScaledExp`; on the avx512 variant also `WideExp` and `FlooredExp`).
// exp_lanes.h runs the same operations on the vector lanes of lanes.h, so that every lane width
// gives the same bits; the scalar forms here serve the rows' tails and float64.
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

#include "lanes.h"

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

#if defined(KDFAST_LANES_WIDE)
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
#endif

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
