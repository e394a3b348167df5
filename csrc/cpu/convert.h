// Element conversions between the storage dtypes (float32, bfloat16, float16, float64) and
// the compute type, for the CPU kernels. `load_chunk` returns a pointer to n compute-type
// values (aliasing the source when no conversion is needed); `store_chunk` writes n values
// in the output dtype with round-to-nearest-even, keeping NaN and inf. Loops are written so
// the compiler vectorises them; with F16C the float16 paths use the hardware converts.
// Everything here lives in the instruction-set variant's namespace: each variant's
// translation unit gets its own copies, so the linker can never hand one variant's
// (e.g. AVX2) code to another (e.g. baseline).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kdfast/rowmath.h"

#ifndef KDFAST_CPU_VARIANT
#error "convert.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float bf16_to_float(uint16_t v) { return rowmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v) << 16)); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = static_cast<uint32_t>(rowmath::float_to_bits(f));
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const bool is_nan = (x & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? ((x >> 16) | 0x40u) : rounded);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  // Shift exponent and mantissa into float position, then rebias by 2^112 (handles subnormals).
  float magnitude = rowmath::bits_to_float(static_cast<int32_t>((h & 0x7fffu) << 13)) * 5.192296858534828e33f;
  if ((h & 0x7c00u) == 0x7c00u) {  // inf / nan
    magnitude = rowmath::bits_to_float(static_cast<int32_t>(((h & 0x3ffu) << 13) | 0x7f800000u));
  }
  return rowmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(rowmath::float_to_bits(magnitude)) | sign));
}

inline uint16_t float_to_f16(float f) {
  uint32_t x = static_cast<uint32_t>(rowmath::float_to_bits(f));
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (x < 0x38800000u) {  // below 2^-14: half subnormal (or zero); let the FPU round
    const float shifted = rowmath::bits_to_float(static_cast<int32_t>(x)) + 0.5f;
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(rowmath::float_to_bits(shifted)) - 0x3f000000u));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias exponent by -112 and round half to even
  return static_cast<uint16_t>(sign | (x >> 13));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 values of storage type S (float, bfloat16 or float16) at p as floats in one register, the
// values load_chunk gives; only the lanes of `valid` are read, the others are 0.
template <class S>
inline __m512 load_16(const S* p, __mmask16 valid = 0xffff) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(valid, p);
  } else if constexpr (std::is_same_v<S, bf16_t>) {  // zero-extend, then shift into the high half
    const __m256i raw = _mm256_maskz_loadu_epi16(valid, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    static_assert(std::is_same_v<S, f16_t>, "load_16 reads float, bfloat16 or float16");
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, p));  // exact
  }
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
// 8 values of storage type S (float, bfloat16 or float16) at p as floats, the values
// load_chunk gives.
template <class S>
inline __m256 load_8(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<S, bf16_t>) {  // zero-extend, then shift into the high half
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<S, f16_t>, "load_8 reads float, bfloat16 or float16");
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // exact
  }
}
#endif

template <class In, class C>
inline const C* load_chunk(const In* src, int64_t n, C* buf) {
  if constexpr (std::is_same_v<In, C>) {
    return src;
  } else if constexpr (std::is_same_v<In, bf16_t>) {
    const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<C, float>) {
      // Widen 16 (AVX-512) or 8 at a time: zero-extend to 32 bits and shift into the high half.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf + i, load_16(src + i));
#endif
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, load_8(src + i));
#endif
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<C>(bf16_to_float(raw[i]));
    return buf;
  } else if constexpr (std::is_same_v<In, f16_t>) {
    const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if constexpr (std::is_same_v<C, float>) {
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, load_8(src + i));
    }
#endif
    for (; i < n; ++i) buf[i] = static_cast<C>(f16_to_float(raw[i]));
    return buf;
  } else {  // float -> double or double -> float
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<C>(src[i]);
    return buf;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// float_to_bf16 on 16 lanes, the same integer steps (round half to even, NaN quietened),
// narrowed by one truncating pack.
inline __m256i bf16_16(__m512 value) {
  const __m512i x = _mm512_castps_si512(value);
  const __m512i high = _mm512_srli_epi32(x, 16);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(high, _mm512_set1_epi32(1))),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, _mm512_set1_epi32(0x40))));
}

// Whether this CPU converts to bfloat16 in hardware (AVX512_BF16: Cooper Lake, Sapphire Rapids
// and later Xeons, Zen 4 and later).
inline bool cpu_has_bf16_convert() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// store_chunk's float -> bfloat16 with the hardware conversion, 32 values at a time; returns how
// many it wrote (a multiple of 32). VCVTNE2PS2BF16 rounds half to even and quietens NaN exactly
// as float_to_bf16 does, but flushes denormal inputs to zero: a block holding a denormal
// (fpclass bit 5) is converted by the integer steps instead, so the bits never differ.
// Call it only where cpu_has_bf16_convert().
__attribute__((target("avx512bf16"))) inline int64_t store_bf16_hardware(const float* src, int64_t n,
                                                                          uint16_t* raw) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 low = _mm512_loadu_ps(src + i), high = _mm512_loadu_ps(src + i + 16);
    if (_kortestz_mask16_u8(_mm512_fpclass_ps_mask(low, 0x20), _mm512_fpclass_ps_mask(high, 0x20))) {
      _mm512_storeu_si512(raw + i, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + i), bf16_16(low));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + i + 16), bf16_16(high));
    }
  }
  return i;
}
#endif

template <class Out, class C>
inline void store_chunk(const C* src, int64_t n, Out* dst) {
  if constexpr (std::is_same_v<Out, C>) {
    if (static_cast<const void*>(src) != static_cast<const void*>(dst)) std::memcpy(dst, src, sizeof(C) * n);
  } else if constexpr (std::is_same_v<Out, bf16_t>) {
    uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    if constexpr (std::is_same_v<C, float>) {
      if (cpu_has_bf16_convert()) i = store_bf16_hardware(src, n, raw);
      for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(raw + i), bf16_16(_mm512_loadu_ps(src + i)));
      }
    }
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j) raw[j] = float_to_bf16(static_cast<float>(src[j]));
  } else if constexpr (std::is_same_v<Out, f16_t>) {
    uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<C, float>) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(raw + i), h);
      }
    }
#endif
    for (; i < n; ++i) raw[i] = float_to_f16(static_cast<float>(src[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(src[i]);
  }
}

// dst[0:n] = NaN in the output dtype (the gradient row of a row whose loss is NaN).
template <class Out>
inline void fill_nan(Out* dst, int64_t n) {
  if constexpr (std::is_same_v<Out, bf16_t> || std::is_same_v<Out, f16_t>) {
    const uint16_t bits = std::is_same_v<Out, bf16_t> ? uint16_t(0x7fc0u) : uint16_t(0x7e00u);
    uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) raw[i] = bits;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = std::numeric_limits<Out>::quiet_NaN();
  }
}

// One element converted to the compute type (the label logit).
template <class In, class C>
inline C load_one(const In* src) {
  C value;
  return *load_chunk<In, C>(src, 1, &value);
}

// Calls fn(student_tag, teacher_tag) with value-initialised tags of the storage types
// (float, bf16_t, f16_t) named by the two dtypes; float64 is handled by the callers.
template <class Fn>
auto with_float_types(DType student, DType teacher, Fn&& fn) {
  auto with_teacher = [&](auto student_tag) {
    using S = decltype(student_tag);
    switch (teacher) {
      case DType::BFloat16: return fn(S{}, bf16_t{});
      case DType::Float16: return fn(S{}, f16_t{});
      default: return fn(S{}, float{});
    }
  };
  switch (student) {
    case DType::BFloat16: return with_teacher(bf16_t{});
    case DType::Float16: return with_teacher(f16_t{});
    default: return with_teacher(float{});
  }
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
