// exp(x / T) on the vector lanes of lanes.h: the formulas of exp_scalar.h with their constants
// held in registers (`ScaledExpFV` on 8 AVX2 lanes or 4 portable ones; `WideExpFW`, `ScaledExpFW`
// and `FlooredExpFW` on the avx512 variant's 16), and `ExpLanes`, one exp for every lane type of
// a compute type, which the row loops call. Every lane width gives the bits of the scalar form.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "exp_scalar.h"
#include "lanes.h"

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

#if defined(KDFAST_LANES_AVX2)
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

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
