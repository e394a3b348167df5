// CPU kernel of compress_topk: per teacher row, the k largest logits (ties: lower index
// first), their log softmax(t/T) over the full row, and the log of the mass outside them.
// Compiled once per instruction-set variant into kdfast::cpu::KDFAST_CPU_VARIANT, like
// kd_loss_cpu.cpp; contract in types.h (TopKCompressArgs), shared math in sparse_rowmath.h.
//
// One read of the row, in chunks of kChunk elements. The first k elements seed a candidate
// buffer; from then on a threshold theta (the smallest value among k candidates that precede
// the current position) splits each chunk: elements > theta are appended to the buffer,
// elements <= theta can no longer be in the top k (k earlier candidates are at least as large,
// and earlier wins ties) and are summed straight into the tail, exp((t - tail_max)/T) relative
// to the tail's own running maximum. When the buffer fills it is cut back to its best k
// (cut_to_k); the evicted entries join the tail sum and theta rises. The tail is therefore a
// sum over exactly the non-kept entries, never a difference, and it keeps full relative
// precision however small it is. The split of a chunk is topk_split.h's: on vector lanes, one
// exp per logit, its hits staged with in-register compresses (no second scan of the chunk). A
// call larger than kPrefetchCallBytes prefetches ahead (memory_policy.h): a vector split that
// reads the row itself as it goes (the thread's next row, in several streams; rows over 1 MiB
// their own next chunk), the others each next chunk before they split this one. A cut selects the
// k-th value by a compress-partitioned quickselect (kth_largest); the selection is topk_select.h.
// Rows run in parallel over OpenMP threads.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "convert.h"
#include "kernel_common.h"
#include "lanes.h"
#include "memory_policy.h"
#include "topk_select.h"
#include "topk_split.h"
#include "kdfast/rowmath.h"
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

// next_row: the row this thread compresses next (null for none); warm: this row was fetched
// ahead while the thread compressed the previous one. Returns whether its splits asked for
// next_row (a hint: a row whose splits all ran scalar asked for nothing, which costs only time).
template <class S, class C>
bool compress_row(const S* row, const S* next_row, bool warm, const TopKCompressArgs& args, double inv_t,
                  Selection<C>& sel, int64_t row_index) {
  const int64_t vocab = args.vocab, k = args.k;
  const C inv_t_c = static_cast<C>(inv_t);
  sel.count = 0;
  TailSum tail;
  C theta = kNegInf<C>;
  bool seeded = false;
  int64_t nan_count = 0;
  alignas(64) C buffer[kChunk];
  TopKCandidate<C>* c = sel.candidates.data();

  // A call that streams its rows from memory asks for lines ahead of the split
  // (memory_policy.h). The scalar splits ask for the next chunk before they split this one (on
  // a 2-core Xeon, 1024 x 128256 fp32: 3.9 -> 6.0 GB/s). A vector split that reads the row
  // itself (AVX-512 and AVX2: every storage type but float64) asks as it goes: for the row
  // its thread compresses next, in kAheadStreams streams, where there is one and the row is
  // at most kNextRowBytes (and one chunk ahead in this row too where no earlier row fetched
  // it); else one chunk ahead in this row (on AVX-512 that measured 10.7 GB/s against 8.1 for
  // the prefetch before the chunk).
  const bool prefetch = args.rows * vocab * static_cast<int64_t>(sizeof(S)) > kPrefetchCallBytes;
#if defined(KDFAST_LANES_AVX2)
  constexpr bool kSplitReadsRow = std::is_same_v<C, float> && kSplitReadsStorage<S>;
#else
  constexpr bool kSplitReadsRow = false;
#endif
  AheadPlan plan = kSplitReadsRow && prefetch ? next_row_plan(next_row, vocab * static_cast<int64_t>(sizeof(S)))
                                              : AheadPlan{};
  const bool ahead_next_row = plan.next_row != nullptr;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t len = std::min(kChunk, vocab - start);
    if (prefetch && !kSplitReadsRow) prefetch_next_chunk(row, start, kChunk, vocab);
    // The chunk in the compute type, converted on first use: the vector splits read the row
    // themselves, so a settled chunk of 16-bit logits is never widened into the buffer.
    const C* x = nullptr;
    auto values = [&]() {
      if (x == nullptr) x = load_chunk<S, C>(row + start, len, buffer);
      return x;
    };
    int64_t first = 0;
    if (!seeded && start == 0 && len >= group_count(k)) {
      // Seed theta from the first chunk: split it into G >= k groups; every group's maximum
      // is at least the smallest group maximum m, so k elements are >= m and anything below
      // m is out. theta just below m makes the chunk's elements >= m its hits.
      const C smallest_group_max = smallest_group_maximum(values(), len, group_count(k), sel.group_max.data());
      if (smallest_group_max != kNegInf<C>) {
        theta = std::nextafter(smallest_group_max, kNegInf<C>);
        seeded = true;
      }
    }
    if (!seeded) {  // the first k elements are candidates unconditionally
      first = std::min(len, k - sel.count);
      for (int64_t i = 0; i < first; ++i) {
        C value = values()[i];
        if (value != value) {  // NaN: ranked as -inf for the selection, the row's output is NaN
          ++nan_count;
          value = kNegInf<C>;
        }
        c[sel.count++] = TopKCandidate<C>{value, static_cast<int32_t>(start + i)};
      }
      if (sel.count < k) continue;
      seeded = true;
      theta = cut_to_k(sel, tail, inv_t);
    }
    const int64_t n = len - first;
    if (n == 0) continue;
    auto rest = [&]() { return values() + first; };  // the chunk's elements after `first`
    // The tail's share of the chunk is every element <= theta; the rest are hits.
    C chunk_theta = theta;
    const Staging staging{sel.stage_values.data(), sel.stage_offsets.data()};
    plan.offset_bytes = (start + first) * static_cast<int64_t>(sizeof(S));
    auto split_at = [&](C bar) {
      const S* x = row + start + first;
      if constexpr (kSplitReadsRow) {
        if (ahead_next_row && warm)
          return split_chunk<Ahead::kNextRow>(x, rest, n, bar, inv_t_c, sel.split_exp, staging, plan);
        if (ahead_next_row) return split_chunk<Ahead::kBoth>(x, rest, n, bar, inv_t_c, sel.split_exp, staging, plan);
        if (prefetch) return split_chunk<Ahead::kInRow>(x, rest, n, bar, inv_t_c, sel.split_exp, staging, plan);
      }
      return split_chunk<Ahead::kNone>(x, rest, n, bar, inv_t_c, sel.split_exp, staging, plan);
    };
    ChunkSplit<C> split = split_at(chunk_theta);
    if (split.hits > std::max<int64_t>(2 * k, 256) && n >= group_count(k) && chunk_theta != kNegInf<C>) {
      // Many hits (e.g. ascending logits): the chunk's own k group maxima give a higher bar.
      const C local = std::nextafter(smallest_group_maximum(rest(), n, group_count(k), sel.group_max.data()), kNegInf<C>);
      if (local > chunk_theta) {
        chunk_theta = local;
        split = split_at(chunk_theta);
      }
    }
    if (chunk_theta == kNegInf<C>) {
      nan_count += split.nans;  // -inf tail entries add nothing; NaN must still poison the row
    } else if (tail_settled(split, chunk_theta, inv_t_c) || split.sum != split.sum) {
      tail.add(static_cast<double>(chunk_theta), static_cast<double>(split.sum), inv_t);
    } else {
      // The tail's share lies so far below theta that its terms may have underflowed: sum
      // it again relative to its own maximum, so a tiny tail keeps its precision.
      C* masked = sel.masked.data();
      const C* xs = rest();
      C masked_max = kNegInf<C>;
      for (int64_t i = 0; i < n; ++i) {
        masked[i] = xs[i] > chunk_theta ? kNegInf<C> : xs[i];
        masked_max = masked[i] > masked_max ? masked[i] : masked_max;
      }
      add_to_tail(masked, n, masked_max, inv_t_c, tail, inv_t);
    }
    const int64_t hits = split.hits;
    // Append the hits (the chunk is cache-resident) to the candidates.
    if (hits > 0) {
      theta = split.from_lanes
                  ? append_staged(staging, hits, start + first, sel, tail, inv_t, std::max(theta, chunk_theta))
                  : extract_above(rest(), n, start + first, chunk_theta, hits, sel, tail, inv_t, std::max(theta, chunk_theta));
    }
    if (start == 0 && sel.count > k) theta = cut_to_k(sel, tail, inv_t);
  }
  cut_to_k(sel, tail, inv_t);
  std::sort(c, c + k, CandidateBefore{});

  // Normalise over the full row: log Z = M/T + log(sum_kept exp((t - M)/T) + tail).
  const double top = static_cast<double>(c[0].value);
  const double reference = std::max(top, tail.max_value);
  double kept_sum = 0.0;
  for (int64_t i = 0; i < k; ++i) kept_sum += std::exp((static_cast<double>(c[i].value) - reference) * inv_t);
  const double tail_scaled =
      tail.sum > 0.0 || tail.sum != tail.sum ? tail.sum * std::exp((tail.max_value - reference) * inv_t) : 0.0;
  const double log_total = std::log(kept_sum + tail_scaled);
  // NaN, +inf or only -inf logits: every output of the row is NaN (the tail too).
  const bool poisoned = nan_count > 0 || tail.sum != tail.sum ||
                        reference == -std::numeric_limits<double>::infinity() ||
                        reference == std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();

  C* logprobs = static_cast<C*>(args.logprobs) + row_index * k;
  for (int64_t i = 0; i < k; ++i) {
    const double value = (static_cast<double>(c[i].value) - reference) * inv_t - log_total;
    logprobs[i] = static_cast<C>(poisoned ? nan : value);
  }
  double tail_logprob = -std::numeric_limits<double>::infinity();
  if (tail.sum > 0.0) tail_logprob = (tail.max_value - reference) * inv_t + std::log(tail.sum) - log_total;
  static_cast<C*>(args.tail_logprob)[row_index] = static_cast<C>(poisoned ? nan : tail_logprob);
  if (args.indices_int64) {
    int64_t* out = static_cast<int64_t*>(args.indices) + row_index * k;
    for (int64_t i = 0; i < k; ++i) out[i] = c[i].index;
  } else {
    int32_t* out = static_cast<int32_t*>(args.indices) + row_index * k;
    for (int64_t i = 0; i < k; ++i) out[i] = c[i].index;
  }
  return ahead_next_row;
}

template <class S, class C>
void compress_impl(const TopKCompressArgs& args) {
  const int64_t rows = args.rows, vocab = args.vocab, k = args.k;
  const double inv_t = 1.0 / args.temperature;
  const S* teacher = static_cast<const S*>(args.teacher);
  const int threads = threads_for(args.num_threads, rows, vocab);
  // Room for k kept entries plus the newcomers between two cuts. Cutting after about k
  // newcomers keeps theta close to the true k-th value (few hits) at O(1) amortised cost.
  const int64_t capacity = k + std::max<int64_t>(k, 64);
#pragma omp parallel num_threads(threads)
  {
    Selection<C> sel(inv_t);
    sel.candidates.resize(static_cast<size_t>(capacity));
    sel.evicted.resize(static_cast<size_t>(capacity));
    sel.values.resize(static_cast<size_t>(capacity + 8));
    sel.values_scratch.resize(static_cast<size_t>(2 * (capacity + 8)));
    sel.masked.resize(static_cast<size_t>(kChunk));
    sel.group_max.resize(static_cast<size_t>(group_count(k)));
    sel.stage_values.resize(static_cast<size_t>(kChunk + 8));
    sel.stage_offsets.resize(static_cast<size_t>(kChunk + 8));
    sel.k = k;
    int64_t fetched = -1;  // the row this thread fetched ahead
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      // The next row is usually this thread's next (contiguous blocks of rows per thread).
      const S* next = row + 1 < rows ? teacher + (row + 1) * args.teacher_row_stride : nullptr;
      const bool fetching = compress_row<S, C>(teacher + row * args.teacher_row_stride, next, row == fetched, args,
                                               inv_t, sel, row);
      fetched = fetching ? row + 1 : -1;
    }
  }
}

}  // namespace

void topk_compress(const TopKCompressArgs& args) {
  switch (args.teacher_dtype) {
    case DType::Float32: return compress_impl<float, float>(args);
    case DType::BFloat16: return compress_impl<bf16_t, float>(args);
    case DType::Float16: return compress_impl<f16_t, float>(args);
    case DType::Float64: return compress_impl<double, double>(args);
  }
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
