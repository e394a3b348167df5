// The candidate selection of compress_topk's CPU kernel, included by topk_cpu.cpp only (one copy
// per instruction-set variant, inside its namespace kdfast::cpu::KDFAST_CPU_VARIANT): one row's
// candidate buffer (`Selection`), its cut back to the best k (`cut_to_k`, with the k-th value
// from a compress-partitioned quickselect, `kth_largest`; evicted entries join the tail sum),
// the first threshold from interleaved group maxima (`smallest_group_maximum`), and the two ways
// hits enter the buffer: a scan above the threshold (`extract_above`) and a vector split's staged
// hits (`append_staged`). Ties: the lower index first. Contract: types.h (TopKCompressArgs),
// sparse_rowmath.h; the split of a chunk is topk_split.h, the row driver topk_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel_common.h"
#include "topk_split.h"
#include "kdfast/sparse_rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using sparse::TailSum;
using sparse::TopKCandidate;

namespace {


// Per-thread working memory of the selection.
template <class C>
struct Selection {
  explicit Selection(double inv_t) : split_exp(inv_t) {}
  SplitExp split_exp;
  std::vector<TopKCandidate<C>> candidates;
  std::vector<C> evicted;  // values of the entries a cut removes
  std::vector<float> values, values_scratch;  // the candidates' values, for the cut's selection
  std::vector<C> masked;   // a chunk with its hits masked to -inf (rare slow path)
  std::vector<C> group_max;
  std::vector<float> stage_values;     // a float split's hits (Staging)
  std::vector<int32_t> stage_offsets;
  int64_t count = 0;
  int64_t k = 0;
};

// Adds sum_i exp((x_i - reference)/T) over x[0, n) to the tail, with `reference` the maximum
// of the x_i (NaN propagates into the sum).
template <class C>
void add_to_tail(const C* x, int64_t n, C reference, C inv_t, TailSum& tail, double inv_t_double) {
  if (reference == kNegInf<C>) return;
  C sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += rowmath::exp_c((x[i] - reference) * inv_t);
  tail.add(static_cast<double>(reference), static_cast<double>(sum), inv_t_double);
}

#if defined(KDFAST_LANES_AVX2)
// The rank-th largest (0-based) of n floats (no NaN) in `a`, by quickselect whose three-way
// partitions run on 8 lanes with in-register compresses: no branch per element, where
// std::nth_element mispredicts about every other comparison. `a`, `s1` and `s2` hold n + 8
// floats each; all three are clobbered.
float kth_largest(float* a, float* s1, float* s2, int64_t n, int64_t rank) {
  while (n > 16) {
    const float x = a[0], y = a[n / 2], z = a[n - 1];
    const float pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of three
    const __m256 p = _mm256_set1_ps(pivot);
    float* greater = s1;
    float* lesser = s2;
    int64_t n_greater = 0, n_lesser = 0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(a + i);
      const unsigned gt = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, p, _CMP_GT_OQ)));
      const unsigned lt = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, p, _CMP_LT_OQ)));
      _mm256_storeu_ps(greater + n_greater, compress_ps(gt, v));
      _mm256_storeu_ps(lesser + n_lesser, compress_ps(lt, v));
      n_greater += __builtin_popcount(gt);
      n_lesser += __builtin_popcount(lt);
    }
    for (; i < n; ++i) {
      if (a[i] > pivot) greater[n_greater++] = a[i];
      else if (a[i] < pivot) lesser[n_lesser++] = a[i];
    }
    if (rank < n_greater) {
      s1 = a;  // the old input becomes scratch
      a = greater;
      n = n_greater;
    } else if (rank < n - n_lesser) {
      return pivot;
    } else {
      rank -= n - n_lesser;
      s2 = a;
      a = lesser;
      n = n_lesser;
    }
  }
  std::nth_element(a, a + rank, a + n, [](float u, float v) { return u > v; });
  return a[rank];
}
#endif

// The selection order (sparse::candidate_before) as a function object, which std::sort and
// std::nth_element inline.
struct CandidateBefore {
  template <class C>
  bool operator()(const TopKCandidate<C>& a, const TopKCandidate<C>& b) const {
    return sparse::candidate_before(a, b);
  }
};

#if defined(KDFAST_LANES_WIDE)
static_assert(sizeof(TopKCandidate<float>) == 8 && offsetof(TopKCandidate<float>, value) == 0,
              "a float candidate is one 64-bit word with its value in the low half");
// The values of the 8 candidates at c: the low 32 bits of each 64-bit candidate.
inline __m256 candidate_values(const TopKCandidate<float>* c) {
  return _mm256_castsi256_ps(_mm512_cvtepi64_epi32(_mm512_loadu_si512(c)));
}
#endif

// Cuts the candidates back to the best k, adds the evicted ones to the tail and returns the
// new threshold (the smallest kept value). AVX2 / AVX-512 (float): the k-th largest value comes
// from kth_largest on the values alone, then one branch-free pass keeps every candidate above
// it and, of those equal to it, the first ones in the buffer up to k in all. The buffer holds
// its candidates in index order (they are appended in row order and this pass keeps their
// order), so those are the lower indices, as the (value, index) order wants. The other
// variants and float64 cut by std::nth_element on the pairs.
template <class C>
C cut_to_k(Selection<C>& sel, TailSum& tail, double inv_t) {
  TopKCandidate<C>* c = sel.candidates.data();
  const int64_t k = sel.k;
  if (sel.count > k) {
    const int64_t count = sel.count;
    C* evicted = sel.evicted.data();
    int64_t n = -1;
#if defined(KDFAST_LANES_AVX2)
    if constexpr (std::is_same_v<C, float>) {
      float* values = sel.values.data();
      int64_t i = 0;
#if defined(KDFAST_LANES_WIDE)
      for (; i + 8 <= count; i += 8) _mm256_storeu_ps(values + i, candidate_values(c + i));
#endif
      for (; i < count; ++i) values[i] = c[i].value;
      const float kth = kth_largest(values, sel.values_scratch.data(), sel.values_scratch.data() + count + 8, count, k - 1);
      int64_t above = 0, at_least = 0;
      i = 0;
#if defined(KDFAST_LANES_WIDE)
      const __m256 bar = _mm256_set1_ps(kth);
      for (; i + 8 <= count; i += 8) {
        const __m256 v = candidate_values(c + i);
        above += __builtin_popcount(static_cast<unsigned>(_mm256_cmp_ps_mask(v, bar, _CMP_GT_OQ)));
        at_least += __builtin_popcount(static_cast<unsigned>(_mm256_cmp_ps_mask(v, bar, _CMP_GE_OQ)));
      }
#endif
      for (; i < count; ++i) {
        above += c[i].value > kth ? 1 : 0;
        at_least += c[i].value >= kth ? 1 : 0;
      }
      int64_t kept = 0;
      n = 0;
      if (at_least == k) {  // no tie across the cut
        i = 0;
#if defined(KDFAST_LANES_WIDE)
        // 8 candidates per step, moved by in-register compresses. Each full store ends at or
        // before the last candidate this step read (kept <= i, n <= i), so none is lost.
        for (; i + 8 <= count; i += 8) {
          const __m512i pairs = _mm512_loadu_si512(c + i);
          const __m256 v = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(pairs));
          const __mmask8 keep = _mm256_cmp_ps_mask(v, bar, _CMP_GE_OQ);
          _mm512_storeu_si512(c + kept, _mm512_maskz_compress_epi64(keep, pairs));
          _mm256_storeu_ps(evicted + n, _mm256_maskz_compress_ps(static_cast<__mmask8>(~keep), v));
          const int64_t kept_here = __builtin_popcount(static_cast<unsigned>(keep));
          kept += kept_here;
          n += 8 - kept_here;
        }
#endif
        for (; i < count; ++i) {
          const TopKCandidate<C> entry = c[i];
          const bool keep = entry.value >= kth;
          c[kept] = entry;
          evicted[n] = entry.value;
          kept += keep ? 1 : 0;
          n += keep ? 0 : 1;
        }
      } else {
        const int64_t ties_kept = k - above;  // >= 1: kth is one of the values
        int64_t ties = 0;
        for (int64_t i = 0; i < count; ++i) {
          const TopKCandidate<C> entry = c[i];
          const int64_t tie = entry.value == kth ? 1 : 0;  // integer masks: no branch per entry
          const int64_t keep = (entry.value > kth ? 1 : 0) | (tie & (ties < ties_kept ? 1 : 0));
          ties += tie;
          c[kept] = entry;
          evicted[n] = entry.value;
          kept += keep;
          n += 1 - keep;
        }
      }
    }
#endif
    if (n < 0) {
      std::nth_element(c, c + k, c + count, CandidateBefore{});
      n = count - k;
      for (int64_t i = 0; i < n; ++i) evicted[i] = c[k + i].value;
    }
    C evicted_max = kNegInf<C>;  // (candidates are never NaN: simd reductions are exact here)
#pragma omp simd reduction(max : evicted_max)
    for (int64_t i = 0; i < n; ++i) evicted_max = evicted[i] > evicted_max ? evicted[i] : evicted_max;
    add_to_tail(evicted, n, evicted_max, static_cast<C>(inv_t), tail, inv_t);
    sel.count = k;
  }
  C smallest = c[0].value;
#pragma omp simd reduction(min : smallest)
  for (int64_t i = 1; i < k; ++i) smallest = c[i].value < smallest ? c[i].value : smallest;
  return smallest;
}

// Number of interleaved groups smallest_group_maximum uses for a given k: at least k, a
// multiple of the vector width, so that the group maxima update as whole vectors.
int64_t group_count(int64_t k) { return std::max<int64_t>(16, (k + 7) / 8 * 8); }

// The smallest of the maxima of k >= 1 interleaved groups of x[0, n) (n >= k; group g holds
// the elements i with i mod k == g; NaN is skipped). Every group holds an element at least
// this large, so at least k elements are; for ascending data it is the k-th largest.
template <class C>
C smallest_group_maximum(const C* x, int64_t n, int64_t k, C* group_max) {
  for (int64_t g = 0; g < k; ++g) group_max[g] = kNegInf<C>;
  int64_t row = 0;
  for (; row + k <= n; row += k) {
    const C* values = x + row;
#pragma omp simd
    for (int64_t g = 0; g < k; ++g) group_max[g] = values[g] > group_max[g] ? values[g] : group_max[g];
  }
  for (int64_t g = 0; row + g < n; ++g) group_max[g] = x[row + g] > group_max[g] ? x[row + g] : group_max[g];
  C smallest = std::numeric_limits<C>::infinity();
  for (int64_t g = 0; g < k; ++g) smallest = group_max[g] < smallest ? group_max[g] : smallest;
  return smallest;
}

// Appends the `hits` elements of x[0, n) greater than theta (as candidates for indices
// base + i), cutting back to k whenever the buffer is full; stops after the last hit.
// Returns the threshold for later chunks.
template <class C>
C extract_above(const C* x, int64_t n, int64_t base, C theta, int64_t hits, Selection<C>& sel, TailSum& tail,
                double inv_t, C next_theta) {
  TopKCandidate<C>* c = sel.candidates.data();
  const int64_t capacity = static_cast<int64_t>(sel.candidates.size());
  int64_t found = 0;
  auto push = [&](int64_t i) {
    c[sel.count++] = TopKCandidate<C>{x[i], static_cast<int32_t>(base + i)};
    ++found;
    if (sel.count == capacity) next_theta = std::max(next_theta, cut_to_k(sel, tail, inv_t));
  };
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<C, float>) {
    // 32 elements per test: four compares OR-ed into one mask, opened only when non-zero.
    const __m256 threshold = _mm256_set1_ps(theta);
    for (; i + 32 <= n && found < hits; i += 32) {
      const __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(x + i), threshold, _CMP_GT_OQ);
      const __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), threshold, _CMP_GT_OQ);
      const __m256 c2 = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), threshold, _CMP_GT_OQ);
      const __m256 d = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), threshold, _CMP_GT_OQ);
      if (_mm256_movemask_ps(_mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c2, d))) == 0) continue;
      const __m256 parts[4] = {a, b, c2, d};
      for (int part = 0; part < 4; ++part) {
        unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(parts[part]));
        while (mask) {
          push(i + part * 8 + __builtin_ctz(mask));
          mask &= mask - 1;
        }
      }
    }
  }
#endif
  for (; i < n && found < hits; ++i)
    if (x[i] > theta) push(i);
  return next_theta;
}

// Appends a split's staged hits (values and offsets from `base`) to the candidates, cutting
// back to k whenever the buffer is full, exactly as extract_above would push them. Returns the
// threshold for later chunks.
template <class C>
C append_staged(const Staging& staging, int64_t hits, int64_t base, Selection<C>& sel, TailSum& tail, double inv_t,
                C next_theta) {
  TopKCandidate<C>* c = sel.candidates.data();
  const int64_t capacity = static_cast<int64_t>(sel.candidates.size());
  for (int64_t h = 0; h < hits; ++h) {
    c[sel.count++] = TopKCandidate<C>{static_cast<C>(staging.values[h]), static_cast<int32_t>(base + staging.offsets[h])};
    if (sel.count == capacity) next_theta = std::max(next_theta, cut_to_k(sel, tail, inv_t));
  }
  return next_theta;
}

}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
