// The threshold split of one chunk of a teacher row, for compress_topk (topk_cpu.cpp): how
// many of its logits lie above a threshold theta (the hits, staged with their chunk offsets
// by the vector splits) and the sum of exp((x - theta)/T) over the rest, the tail's share.
// One split per build, chosen by split_chunk: the AVX-512 variant's on 16-float lanes with
// FlooredExp, reading float, bfloat16 and float16 rows itself; the AVX2 variant's on 8-float
// lanes with the table exp, reading the same rows; the portable scalar split (also float64,
// and theta = -inf on every variant). In a large call the vector splits, which read the row
// themselves, prefetch as they go: the thread's next row, or one chunk ahead in theirs (Ahead).
// Like the other CPU kernel headers, this lives in the instruction-set variant's namespace.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "exp_lanes.h"
#include "kernel_common.h"
#include "memory_policy.h"
#include "kdfast/rowmath.h"

#ifndef KDFAST_CPU_VARIANT
#error "topk_split.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {
namespace {

constexpr int64_t kChunk = 2048;  // elements per chunk of a row

// The exp(x/T) of the float split (exp_lanes.h): FlooredExp on the AVX-512 variant's 16 lanes, the
// table exp on the AVX2 variant's 8; the portable variant's split is scalar (rowmath::exp_c).
#if defined(KDFAST_LANES_WIDE)
using SplitExp = FlooredExp;
#elif defined(KDFAST_LANES_AVX2)
using SplitExp = ExpLanes<float>;
#else
struct SplitExp {
  explicit SplitExp(double) {}
};
#endif

#if defined(KDFAST_LANES_AVX2)
// Compress of 8 lanes: the lanes whose mask bit is set, moved to the front in order (the rest
// unspecified). AVX-512: vcompress; AVX2: a permutation from a 256-entry table.
#if !(defined(__AVX512F__) && defined(__AVX512VL__))
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
};
constexpr CompressTable make_compress_table() {
  CompressTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    int count = 0;
    for (int bit = 0; bit < 8; ++bit)
      if ((mask >> bit) & 1) table.lanes[mask][count++] = bit;
    while (count < 8) table.lanes[mask][count++] = 0;
  }
  return table;
}
constexpr CompressTable kCompressTable = make_compress_table();
#endif

inline __m256i compress_epi32(unsigned mask, __m256i v) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  return _mm256_maskz_compress_epi32(static_cast<__mmask8>(mask), v);
#else
  return _mm256_permutevar8x32_epi32(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompressTable.lanes[mask])));
#endif
}

// The same lane moves on floats (their bits are moved, never converted).
inline __m256 compress_ps(unsigned mask, __m256 v) {
  return _mm256_castsi256_ps(compress_epi32(mask, _mm256_castps_si256(v)));
}

#endif

// One chunk split by a threshold: how many elements are above it (hits), and over the rest
// sum_i exp((x_i - theta)/T) (each term <= 1; NaN propagates) and, from the scalar split, their
// maximum. With theta = -inf only the hits and the NaN count are computed.
template <class C>
struct ChunkSplit {
  int64_t hits = 0;
  int64_t nans = 0;
  C tail_max = kNegInf<C>;
  C sum = 0;
  // The lanes' split: its hits' values and chunk offsets are in the Staging buffers, in order,
  // and it leaves the tail maximum out (see tail_settled).
  bool from_lanes = false;
};

// Where the split of a float chunk leaves its hits (AVX2 and AVX-512 variants): values and
// offsets in the chunk, in ascending offset order, each buffer with room for a chunk plus one
// vector.
struct Staging {
  float* values = nullptr;
  int32_t* offsets = nullptr;
};

// How a large call's vector split asks for lines ahead of itself as it goes (memory_policy.h).
// kInRow: the lines one chunk ahead in its own row. kNextRow: the row its thread compresses
// next, in kAheadStreams concurrent streams (prefetch_next_row). kBoth: both, for a thread's
// first row, which no earlier row fetched. The streams keep more misses in flight than one
// chunk ahead: on a 2-core Xeon (4 KiB pages, 1024 x 128256, alternating builds) fp32 went from
// 10.1-10.7 to 11.0 GB/s with 1 thread and from 9.3-9.5 to 10.8 GB/s per core with 2; bfloat16
// from 5.8 to 6.8-6.9 GB/s (4 streams: 10.5 fp32; 16: 10.5).
enum class Ahead { kNone, kInRow, kNextRow, kBoth };

// The asks of one split step that reads STEP elements of type S at x + i (x: the split's
// start in the row; plan: AHEAD's next row). Hints only: no value changes.
template <Ahead AHEAD, int64_t STEP, class S>
inline void ask_ahead(const S* x, int64_t i, const AheadPlan& plan) {
  if constexpr (AHEAD == Ahead::kInRow || AHEAD == Ahead::kBoth) prefetch_lines(x + i + kChunk, STEP * sizeof(S));
  if constexpr (AHEAD == Ahead::kNextRow || AHEAD == Ahead::kBoth)
    prefetch_next_row<STEP * sizeof(S)>(plan, i * static_cast<int64_t>(sizeof(S)));
}

// Storage types the vector splits (AVX-512 and AVX2) read straight from the row, widening in
// registers (all of them but float64).
template <class S>
constexpr bool kSplitReadsStorage = std::is_same_v<S, float> || std::is_same_v<S, bf16_t> || std::is_same_v<S, f16_t>;

#if defined(KDFAST_LANES_WIDE)

// The AVX-512 variant's split of a chunk of float, bfloat16 or float16 logits, 64 elements per step on
// 16-float lanes over four independent accumulators, then 16 at a time with masked loads: per
// element one compare, one subtraction, FlooredExp (exp_lanes.h) and one masked add. A hit's lane
// is left out of the sum by the add's mask (not set to -inf), so the exp needs no cutoff test.
// The hits of a step that has any are stored in order to the staging buffers by vcompress
// (one branch per such step, no second scan of the chunk). FOLD: FlooredExp::foldable.
// AHEAD (x is a large call's row): each step also asks for lines ahead (Ahead, with `plan`),
// which keeps the memory busy while the step computes (one chunk ahead at once before the
// split measured 8.1 against 10.7 GB/s for kInRow on a 2-core Xeon, fp32).
template <bool FOLD, Ahead AHEAD, class S>
ChunkSplit<float> split_chunk_wide(const S* x, int64_t n, float theta, const FlooredExp& exps, Staging staging,
                                   AheadPlan plan) {
  const FlooredExpFW e(exps);  // a local copy: its constants stay in registers
  const __m512i lane_offsets = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 threshold = _mm512_set1_ps(theta);
  __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t hits = 0, i = 0;
  // Appends the lanes `above` of the 16 values v (chunk offsets at, at + 1, ...) to the staging
  // buffers, in order.
  auto stage = [&](__mmask16 above, __m512 v, int64_t at) {
    const __m512i offsets = _mm512_add_epi32(lane_offsets, _mm512_set1_epi32(static_cast<int32_t>(at)));
    _mm512_mask_compressstoreu_ps(staging.values + hits, above, v);
    _mm512_mask_compressstoreu_epi32(staging.offsets + hits, above, offsets);
    hits += __builtin_popcount(static_cast<unsigned>(above));
  };
  for (; i + 64 <= n; i += 64) {
    ask_ahead<AHEAD, 64>(x, i, plan);
    __m512 v[4];
    __mmask16 tail[4];  // lanes <= theta, or NaN: the tail's share
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      v[j] = load_16(x + i + 16 * j);
      tail[j] = _mm512_cmp_ps_mask(v[j], threshold, _CMP_NGT_UQ);
      sum[j] = _mm512_mask_add_ps(sum[j], tail[j], sum[j], e.template apply<FOLD>(FW{_mm512_sub_ps(v[j], threshold)}).v);
    }
    if ((tail[0] & tail[1] & tail[2] & tail[3]) != 0xffffu) {  // rare once the threshold has settled
      for (int j = 0; j < 4; ++j) stage(static_cast<__mmask16>(~tail[j]), v[j], i + 16 * j);
    }
  }
  for (; i < n; i += 16) {
    const __mmask16 valid = static_cast<__mmask16>(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1u);
    const __m512 v = load_16(x + i, valid);
    const __mmask16 tail = _mm512_mask_cmp_ps_mask(valid, v, threshold, _CMP_NGT_UQ);
    sum[0] = _mm512_mask_add_ps(sum[0], tail, sum[0], e.template apply<FOLD>(FW{_mm512_sub_ps(v, threshold)}).v);
    const __mmask16 above = static_cast<__mmask16>(valid & ~tail);
    if (above != 0) stage(above, v, i);
  }
  ChunkSplit<float> split;
  split.hits = hits;
  split.sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3])));
  split.from_lanes = true;
  return split;
}
#elif defined(KDFAST_LANES_AVX2)
// The AVX2 variant's split of a chunk of float, bfloat16 or float16 logits (read from the row,
// widened in registers) on 8-float lanes with the lanes' table exp(x/T) of
// (masked - theta) <= 0: one compare, one blend, one max, a population count and one exp per
// element, 32 elements per step over four independent accumulators. FOLD: the exp's folded
// coefficients (ExpLanes::foldable), one multiplication less per element.
// The hits of a 32-element step that has any are also compressed in registers and
// stored at the end of the staging buffers (one branch per such step, no branch per hit, no
// second scan of the chunk). AHEAD (x is a large call's row): each step asks for lines ahead,
// as the AVX-512 split does (kInRow on a Xeon core: 6.1 -> 8.5 GB/s against the prefetch
// before the chunk; kNextRow measured the same there: this split is bound by its exp).
template <bool FOLD, Ahead AHEAD, class S>
ChunkSplit<float> split_chunk_lanes(const S* x, int64_t n, float theta, const ExpLanes<float>& exps,
                                    Staging staging, AheadPlan plan) {
  ChunkSplit<float> split;
  const __m256i lane_offsets = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t staged = 0;
  const __m256 threshold = _mm256_set1_ps(theta);
  const __m256 minus_inf = _mm256_set1_ps(kNegInf<float>);
  const ExpLanes<float> e = exps;  // a local copy: its constants stay in registers
  __m256 sum[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t vector_hits = 0, i = 0;
  for (; i + 32 <= n; i += 32) {
    ask_ahead<AHEAD, 32>(x, i, plan);
    unsigned hit_bits = 0;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 v = load_8(x + i + 8 * j);
      const __m256 above = _mm256_cmp_ps(v, threshold, _CMP_GT_OQ);
      const __m256 masked = _mm256_blendv_ps(v, minus_inf, above);
      hit_bits |= static_cast<unsigned>(_mm256_movemask_ps(above)) << (8 * j);
      sum[j] = _mm256_add_ps(sum[j], e.template apply<true, FOLD>(FV{_mm256_sub_ps(masked, threshold)}).v);
    }
    vector_hits += __builtin_popcount(hit_bits);
    if (hit_bits != 0) {  // rare once the threshold has settled
      for (int j = 0; j < 4; ++j) {
        const unsigned hit_mask = (hit_bits >> (8 * j)) & 0xffu;
        const __m256i offsets = _mm256_add_epi32(lane_offsets, _mm256_set1_epi32(static_cast<int32_t>(i + 8 * j)));
        _mm256_storeu_ps(staging.values + staged, compress_ps(hit_mask, load_8(x + i + 8 * j)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(staging.offsets + staged), compress_epi32(hit_mask, offsets));
        staged += __builtin_popcount(hit_mask);
      }
    }
  }
  float total = hsum(FV{_mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3]))});
  for (; i < n; ++i) {
    const float v = load_one<S, float>(x + i);
    const bool above = v > theta;
    const float masked = above ? kNegInf<float> : v;
    vector_hits += above ? 1 : 0;
    if (above) {
      staging.values[staged] = v;
      staging.offsets[staged] = static_cast<int32_t>(i);
      ++staged;
    }
    total += e(masked - theta);
  }
  split.hits = vector_hits;
  split.sum = total;
  split.from_lanes = true;
  return split;
}
#endif

// The split of the n logits at `raw` (in the row, storage type S); values() returns them in
// the compute type (widened into the chunk buffer on first use). AHEAD and plan: how a large
// call's split asks for lines ahead as it goes (the vector splits, which read the row
// themselves, do; the scalar split ignores them).
template <Ahead AHEAD, class S, class C, class Values>
ChunkSplit<C> split_chunk(const S* raw, Values&& values, int64_t n, C theta, C inv_t, const SplitExp& exps,
                          Staging staging, AheadPlan plan) {
  ChunkSplit<C> split;
  int32_t hits = 0;
#if defined(KDFAST_LANES_WIDE)
  if constexpr (std::is_same_v<C, float> && kSplitReadsStorage<S>) {
    if (theta != kNegInf<C>) {
      return exps.foldable ? split_chunk_wide<true, AHEAD>(raw, n, theta, exps, staging, plan)
                           : split_chunk_wide<false, AHEAD>(raw, n, theta, exps, staging, plan);
    }
  }
#elif defined(KDFAST_LANES_AVX2)
  if constexpr (std::is_same_v<C, float> && kSplitReadsStorage<S>) {
    if (theta != kNegInf<C>) {
      return exps.foldable() ? split_chunk_lanes<true, AHEAD>(raw, n, theta, exps, staging, plan)
                             : split_chunk_lanes<false, AHEAD>(raw, n, theta, exps, staging, plan);
    }
  }
#else
  (void)raw;
#endif
  const C* x = values();
  (void)exps;
  (void)staging;
  (void)plan;
  if (theta == kNegInf<C>) {
    int32_t nans = 0;
#pragma omp simd reduction(+ : hits, nans)
    for (int64_t i = 0; i < n; ++i) {
      hits += x[i] > theta ? 1 : 0;
      nans += x[i] != x[i] ? 1 : 0;
    }
    split.hits = hits;
    split.nans = nans;
    return split;
  }
  C tail_max = kNegInf<C>, sum = 0;
#pragma omp simd reduction(max : tail_max) reduction(+ : hits, sum)
  for (int64_t i = 0; i < n; ++i) {
    const C v = x[i];
    const bool above = v > theta;
    const C masked = above ? kNegInf<C> : v;
    tail_max = masked > tail_max ? masked : tail_max;
    hits += above ? 1 : 0;
    sum += rowmath::exp_c((masked - theta) * inv_t);
  }
  split.hits = hits;
  split.tail_max = tail_max;
  split.sum = sum;
  return split;
}

// Whether a split's tail sum, relative to theta, keeps full precision: its largest term is at
// least exp(-60) (from the maximum where the split has it); from the sum alone, a sum of at
// least 1e-20 over at most kChunk terms has a term of at least exp(-53.7). Terms that underflow
// (exp below -87) then lie 27 or more e-folds below the largest and do not matter.
template <class C>
bool tail_settled(const ChunkSplit<C>& split, C theta, C inv_t) {
  if (!split.from_lanes) return (split.tail_max - theta) * inv_t > C(-60);
  return split.sum >= C(1e-20);
}

}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
