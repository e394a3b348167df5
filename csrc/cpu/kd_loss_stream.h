// One row's forward streaming for the dense KD loss's CPU kernels, included by kd_loss_cpu.cpp
// only (one copy per instruction-set variant, inside its namespace
// kdfast::cpu::KDFAST_CPU_VARIANT): what a call's row drivers share (`CallSetup`), the
// statistics sweep of one row in chunks, normally one sweep from memory with its exponentials
// taken from the maxima of the row's first chunk (`stream_row`; the bases), with the fallback
// to two sweeps where a row rises too far above them (`bases_fit`), and the same bases found
// again by the backward pass (`row_bases`). Contract: rowmath.h; the chunk math is
// kd_loss_chunks.h; where the sweep prefetches ahead, memory_policy.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "convert.h"
#include "kd_loss_chunks.h"
#include "kernel_common.h"
#include "memory_policy.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {
namespace {

using rowmath::Coefficients;
using rowmath::RowPartial;

// What every row driver of one call shares: the options' coefficients, the exp lanes and the
// chunk kernels chosen for them, and the call's row count (for its memory policy).
template <class C>
struct CallSetup {
  Coefficients<C> k;
  RowExps<C> exps;
  ChunkKernels<C> kernels;
  int64_t rows;
  explicit CallSetup(const KDInputs& args)
      : k(rowmath::make_coefficients<C>(args.options, args.vocab)), exps(k), kernels(pick_kernels<C>(k, exps)),
        rows(args.rows) {}
};

// The statistics of one row (moved onto the row's maxima) and the bases its exponentials were
// taken from (kept ones included); see stream_row.
template <class C>
struct StreamedRow {
  RowPartial<C> part;
  C base_s, base_t;
};

// m = max(m, x_i) over n stored logits, in the compute type: bfloat16 is widened in registers
// (a shift), with no pass through a chunk buffer; other storage types go through `buf`.
template <class In, class C>
void stored_chunk_max(const In* x, int64_t n, C* buf, C& m) {
  if constexpr (std::is_same_v<In, bf16_t> && std::is_same_v<C, float>) {
    const uint16_t* raw = reinterpret_cast<const uint16_t*>(x);
    C value = m;
#pragma omp simd reduction(max : value)
    for (int64_t i = 0; i < n; ++i) {
      const C v = bf16_to_float(raw[i]);
      value = v > value ? v : value;
    }
    m = value;
  } else {
    chunk_max(load_chunk<In, C>(x, n, buf), n, m);
  }
}

// How far (in e-folds) a one-sweep row's maxima may rise above the bases its exponentials are
// taken from: exp(30) times any vocabulary stays far inside the float range, and the one-sweep
// statistics keep the two-sweep accuracy (their rebase onto the row's maxima is exact in double).
constexpr double kBaseSpread = 30.0;

// Whether the first chunk's maxima (base_s, base_t) can be the bases of a row whose maxima are
// (max_s, max_t): finite bases no more than kBaseSpread e-folds below the maxima, counted for
// exp((x - b)/T) and, where CE needs softmax(s) at T != 1, for exp(x - b). The forward pass
// tests it as the running maxima grow; the backward pass with the saved maxima, and so makes
// the same choice.
template <class C>
bool bases_fit(const Coefficients<C>& k, C base_s, C max_s, C base_t, C max_t) {
  const double inv_t = k.inv_scaled_t_d * static_cast<double>(k.diff_scale);
  const double student_rate = k.need_student_1 ? std::max(inv_t, 1.0) : inv_t;
  const auto fits = [](C base, C max, double rate) {
    return base > kNegInf<C> && (static_cast<double>(max) - static_cast<double>(base)) * rate <= kBaseSpread;
  };
  return fits(base_s, max_s, student_rate) && (!k.need_kd || fits(base_t, max_t, inv_t));
}

// The maxima of a row's first chunk (kChunk elements, or the whole row when shorter).
template <class S, class T, class C>
void first_chunk_maxima(const Coefficients<C>& k, const S* s_row, const T* t_row, int64_t vocab, C& max_s, C& max_t) {
  alignas(64) C buf[kChunk];
  const int64_t n = std::min(kChunk, vocab);
  max_s = kNegInf<C>;
  max_t = kNegInf<C>;
  stored_chunk_max(s_row, n, buf, max_s);
  if (k.need_kd) stored_chunk_max(t_row, n, buf, max_t);
}

// The streamed statistics of one row, normally in one sweep from memory: the exponentials of
// every chunk are taken from the maxima of the row's first chunk (the bases), the running maxima
// grow alongside, and at the end the partial is moved onto the row's maxima exactly
// (rowmath::rebase_partial_exact), so that memory traffic and exponentials overlap. Where the
// bases do not fit (bases_fit: the row rises too far above its first chunk, or that chunk has no
// finite entry), the row is streamed again in two sweeps, the maxima and then every sum relative
// to them (bases = maxima). The backward pass finds the same bases (row_bases), so both passes and
// the one-pass kernel form every exponential alike and agree bit for bit.
// `kept.q` set: the sweep also keeps its exponentials there (all but JSD).
// `companion(start, n)` runs once for every chunk, right after the sweep has read it: the
// one-pass kernel writes the previous row's gradient there, so that its reads of the kept
// exponentials (from L3 for long rows) overlap this row's exponentials.
// A call with more than kPrefetchCallBytes of logits prefetches the next chunk of s and t
// while it sweeps this one (memory_policy.h).
template <class S, class T, class C, class Companion>
StreamedRow<C> stream_row(const CallSetup<C>& call, const S* s_row, const T* t_row, int64_t vocab, KeptExps<C> kept,
                          Companion&& companion) {
  const Coefficients<C>& k = call.k;
  alignas(64) C student_buf[kChunk];
  alignas(64) C teacher_buf[kChunk];
  const auto sweep = [&](const C* s, const C* t, int64_t n, RowPartial<C>& part, int64_t start, C& max_s, C& max_t) {
    if (kept.q) call.kernels.stats_keep(s, t, n, k, call.exps, part, kept.at(start), max_s, max_t);
    else call.kernels.stats(s, t, n, k, call.exps, part, kept, max_s, max_t);
  };
  int64_t companion_done = 0;
  const auto accompany = [&](int64_t start, int64_t n) {
    if (start < companion_done) return;
    companion(start, n);
    companion_done = start + n;
  };
  StreamedRow<C> row;
  first_chunk_maxima<S, T, C>(k, s_row, t_row, vocab, row.base_s, row.base_t);
  C max_s = row.base_s, max_t = row.base_t;
  bool one_sweep = bases_fit(k, row.base_s, max_s, row.base_t, max_t);
  if (one_sweep) {
    row.part = rowmath::empty_partial<C>();
    row.part.student_max = row.base_s;
    row.part.teacher_max = row.base_t;
    const bool prefetch =
        call.rows * vocab * static_cast<int64_t>(sizeof(S) + (k.need_kd ? sizeof(T) : 0)) > kPrefetchCallBytes;
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      if (prefetch) {
        prefetch_next_chunk(s_row, start, kChunk, vocab);
        if (k.need_kd) prefetch_next_chunk(t_row, start, kChunk, vocab);
      }
      const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
      const C* t = k.need_kd ? load_chunk<T, C>(t_row + start, n, teacher_buf) : nullptr;
      sweep(s, t, n, row.part, start, max_s, max_t);
      // A chunk that rises too far may have overflowed: the row is streamed again below.
      if (!bases_fit(k, row.base_s, max_s, row.base_t, max_t)) {
        one_sweep = false;
        break;
      }
      accompany(start, n);
    }
  }
  if (one_sweep) {
    rowmath::rebase_partial_exact(row.part, max_t, max_s, k, k.divergence);
    return row;
  }
  max_s = kNegInf<C>;
  max_t = kNegInf<C>;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    stored_chunk_max(s_row + start, n, student_buf, max_s);
    if (k.need_kd) stored_chunk_max(t_row + start, n, teacher_buf, max_t);
  }
  row.part = rowmath::empty_partial<C>();
  row.part.student_max = row.base_s = max_s;
  row.part.teacher_max = row.base_t = max_t;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
    const C* t = k.need_kd ? load_chunk<T, C>(t_row + start, n, teacher_buf) : nullptr;
    C chunk_max_s = kNegInf<C>, chunk_max_t = kNegInf<C>;  // the row's maxima are known: unused
    sweep(s, t, n, row.part, start, chunk_max_s, chunk_max_t);
    accompany(start, n);
  }
  return row;
}

template <class S, class T, class C>
StreamedRow<C> stream_row(const CallSetup<C>& call, const S* s_row, const T* t_row, int64_t vocab, KeptExps<C> kept) {
  return stream_row<S, T, C>(call, s_row, t_row, vocab, kept, [](int64_t, int64_t) {});
}

// The bases a row's forward pass took its exponentials from (stream_row), found again from its
// saved maxima (`st`) and its first chunk: those maxima where they fit, else the row's maxima.
template <class S, class T, class C>
void row_bases(const Coefficients<C>& k, const C* st, const S* s_row, const T* t_row, int64_t vocab, C& base_s,
               C& base_t) {
  first_chunk_maxima<S, T, C>(k, s_row, t_row, vocab, base_s, base_t);
  const C max_s = st[2], max_t = k.need_kd ? st[0] : kNegInf<C>;
  if (!bases_fit(k, base_s, max_s, base_t, max_t)) {
    base_s = max_s;
    base_t = max_t;
  }
}

}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
