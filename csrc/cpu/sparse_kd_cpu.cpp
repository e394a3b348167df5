// CPU kernels of the sparse KD loss against top-k soft labels (forward statistics + loss,
// backward gradient). Compiled once per instruction-set variant into
// kdfast::cpu::KDFAST_CPU_VARIANT like kd_loss_cpu.cpp; contract in types.h
// (SparseKDForwardArgs / SparseKDBackwardArgs), per-bucket math in sparse_rowmath.h, the
// chunk sweeps and row helpers in sparse_kd_chunks.h.
//
// Per row the k kept indices are sorted (and checked: in range, no repeats), then the student
// row is streamed once in chunks of kChunk elements. Each chunk is copied into a stack buffer
// (converted to float for 16-bit students), the kept logits are read out of it and replaced by
// -inf, and vectorised loops fold what is left, exactly the non-kept entries, into the tail's
// log-sum-exp (at T for the tail bucket, at 1 for the cross-entropy), each relative to the
// tail's own maximum (with T = 2 or 4 and both sums, exp(x) as exp(x/T)^T); in large calls
// that sweep prefetches as it goes (memory_policy.h): the forward without grad the thread's next
// row, in streams, the one-pass kernel the row's next chunk. The k+1 bucket
// terms are then computed in double, with log-normalisers relative to the largest logit each
// covers (sparse::reference_logit). In "renormalize" mode
// without cross-entropy the row is not streamed at all: only the k kept logits are read. A NaN
// (or +inf) logit or soft label the row reads, or a distribution of only -inf, makes the row's
// loss NaN (sparse::row_defined), and the backward pass writes a NaN gradient row for it.
// The backward pass streams the row once more and writes the gradient once: a vectorised
// formula for tail entries (one exp each at T = 1), then the kept entries of the chunk are
// overwritten with their own gradient before the chunk is stored. With args.grad_student set,
// the forward pass runs forward_grad_impl instead: each row's gradient (grad_output = 1, the
// reduction's scale folded in) right after its statistics, while the row is cache-resident.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "exp_lanes.h"
#include "kernel_common.h"
#include "memory_policy.h"
#include "sparse_kd_chunks.h"
#include "kdfast/rowmath.h"
#include "kdfast/sparse_rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using sparse::SparseCoefficients;
using sparse::TailSum;

namespace {

// ---- forward ----

// `next_row`: the thread's next row, asked for by the tail sums (memory_policy.h; none by
// default); `warm`: this row was asked for that way, so it does not ask for its own next chunks.
template <class S, class C>
int forward_row(const SparseKDForwardArgs& args, const SparseCoefficients<double>& k, const StreamPlan& plan,
                const TailExps<C>& exps, int64_t row, RowScratch& scratch, double* stats, AheadPlan next_row = {},
                bool warm = false) {
  const int64_t vocab = args.vocab, kk = args.soft_labels.k;
  const double inv_t = 1.0 / args.options.temperature;
  const S* s_row = static_cast<const S*>(args.student) + row * args.student_row_stride;
  if (!load_kept(args.soft_labels, row, vocab, scratch.kept)) return 2;
  const std::vector<KeptEntry>& kept = scratch.kept;
  double* kept_logits = scratch.kept_logits.data();

  TailSum tail_t, tail_1;
  double total = 0.0;
  int64_t nan_count = 0;
  if (plan.any()) {
    alignas(64) C buffer[kChunk];
    size_t next = 0;
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      copy_chunk<S, C>(s_row + start, n, buffer);
      if (plan.smoothing) {
        double chunk_total = 0.0;
#pragma omp simd reduction(+ : chunk_total)
        for (int64_t i = 0; i < n; ++i) chunk_total += static_cast<double>(buffer[i]);
        total += chunk_total;
      }
      for (; next < kept.size() && kept[next].index < start + n; ++next) {
        C& value = buffer[kept[next].index - start];
        kept_logits[kept[next].slot] = static_cast<double>(value);
        value = kNegInf<C>;
      }
      C chunk_max = kNegInf<C>;
      int32_t nans = 0;
#pragma omp simd reduction(max : chunk_max) reduction(+ : nans)
      for (int64_t i = 0; i < n; ++i) {
        chunk_max = buffer[i] > chunk_max ? buffer[i] : chunk_max;
        nans += buffer[i] != buffer[i] ? 1 : 0;
      }
      nan_count += nans;
      if (chunk_max == kNegInf<C>) continue;
      C sum_t = 0, sum_1 = 0;
      const uintptr_t ahead =
          plan.prefetch && !warm ? reinterpret_cast<uintptr_t>(s_row + start) + kChunk * sizeof(S) : 0;
      next_row.offset_bytes = start * static_cast<int64_t>(sizeof(S));
      if (plan.tail_at_t && plan.tail_at_1) {
        if (plan.power_1 == 2) {
          tail_chunk_sums<C, true, true, 2, S>(buffer, n, chunk_max, exps, ahead, next_row, sum_t, sum_1);
        } else if (plan.power_1 == 4) {
          tail_chunk_sums<C, true, true, 4, S>(buffer, n, chunk_max, exps, ahead, next_row, sum_t, sum_1);
        } else {
          tail_chunk_sums<C, true, true, 0, S>(buffer, n, chunk_max, exps, ahead, next_row, sum_t, sum_1);
        }
      } else if (plan.tail_at_t) {
        tail_chunk_sums<C, true, false, 0, S>(buffer, n, chunk_max, exps, ahead, next_row, sum_t, sum_1);
      } else if (plan.tail_at_1) {
        tail_chunk_sums<C, false, true, 0, S>(buffer, n, chunk_max, exps, ahead, next_row, sum_t, sum_1);
      }
      if (plan.tail_at_t) tail_t.add(static_cast<double>(chunk_max), static_cast<double>(sum_t), inv_t);
      if (plan.tail_at_1) tail_1.add(static_cast<double>(chunk_max), static_cast<double>(sum_1), 1.0);
    }
  } else {
    for (const KeptEntry& entry : kept) kept_logits[entry.slot] = static_cast<double>(load_one<S, C>(s_row + entry.index));
  }

  // Row-level math in double over the k kept tokens (+ the tail bucket).
  // Row-level math in double, relative to the reference logits (sparse::reference_logit): the
  // largest logit each log-normaliser covers (the kept tokens, and the tail in "bucket" mode, for
  // the buckets; the whole row for the cross-entropy).
  double* values = scratch.bucket_values.data();
  double* scaled_kept = scratch.scaled_kept.data();
  double kept_max = -kInf;
  for (int64_t j = 0; j < kk; ++j) kept_max = std::max(kept_max, kept_logits[j]);
  const double tail_max = plan.tail_at_t || plan.tail_at_1 ? std::max(tail_t.max_value, tail_1.max_value) : -kInf;
  const double kd_reference = sparse::reference_logit(kept_max, k.bucket ? tail_max : -kInf);
  const double reference = sparse::reference_logit(kept_max, tail_max);
  const double lse_kept_t = shifted_log_sum_exp(kept_logits, kk, kd_reference, inv_t, scaled_kept);
  const double tail_lse_t = plan.tail_at_t ? tail_t.relative_log_sum_exp(kd_reference, inv_t) : -kInf;
  const double student_norm = k.bucket ? sparse::log_add_exp(lse_kept_t, tail_lse_t) : lse_kept_t;
  double lse_1 = student_norm;  // T == 1 in bucket mode: the full row's log-sum-exp at T
  if (plan.tail_at_1) {
    lse_1 = sparse::log_add_exp(shifted_log_sum_exp(kept_logits, kk, reference, 1.0, values),
                                tail_1.relative_log_sum_exp(reference, 1.0));
  }

  double divergence = 0.0, g_bar = 0.0, tail_coeff = 0.0, teacher_norm = 0.0;
  if (k.need_kd) {
    const SoftLabelView& labels = args.soft_labels;
    for (int64_t j = 0; j < kk; ++j) values[j] = sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j);
    const double teacher_tail = k.bucket ? sparse::load_value<double>(labels.tail_logprob, labels.tail_dtype, row) : -kInf;
    teacher_norm = sparse::log_add_exp(log_sum_exp(values, kk), teacher_tail);
    const double beta = static_cast<double>(k.beta);
    for (int64_t j = 0; j < kk; ++j) {
      const auto term = sparse::bucket_term<double>(values[j] - teacher_norm, scaled_kept[j] - student_norm,
                                                     k.divergence, beta);
      divergence += term.divergence;
      g_bar += term.weight;
    }
    if (k.bucket) {
      const double log_q_tail = tail_lse_t - student_norm;
      const auto term = sparse::bucket_term<double>(teacher_tail - teacher_norm, log_q_tail, k.divergence, beta);
      divergence += term.divergence;
      g_bar += term.weight;
      const double q_tail = log_q_tail == -kInf ? 0.0 : std::exp(log_q_tail);
      tail_coeff = term.weight - g_bar * q_tail;
    }
  }
  double ce = 0.0;
  if (k.need_ce) {
    const double label_logit = static_cast<double>(load_one<S, C>(s_row + args.labels[row])) - reference;
    const double eps = k.label_smoothing;
    ce = -(1.0 - eps) * (label_logit - lse_1);
    if (eps > 0.0) ce -= eps * ((total / static_cast<double>(vocab) - reference) - lse_1);
  }
  double loss = 0.0;
  if (k.need_ce) loss += k.alpha * ce;
  if (k.need_kd) loss += (1.0 - k.alpha) * k.divergence_scale * divergence;
  if (!sparse::row_defined(k, nan_count, student_norm, teacher_norm, lse_1)) loss = kNaN;

  stats[0] = tail_max;
  stats[1] = plan.tail_at_t && tail_t.sum > 0.0 ? std::log(tail_t.sum) : (tail_t.sum != tail_t.sum ? kNaN : -kInf);
  stats[2] = student_norm;
  stats[3] = lse_1;
  stats[4] = teacher_norm;
  stats[5] = g_bar;
  stats[6] = tail_coeff;
  stats[7] = loss;
  return 0;
}

template <class S, class C>
SparseKDForwardResult forward_impl(const SparseKDForwardArgs& args) {
  const SparseCoefficients<double> k = sparse::make_sparse_coefficients<double>(args.options, args.tail);
  const int64_t rows = args.rows, vocab = args.vocab, kk = args.soft_labels.k;
  const StreamPlan plan = plan_for(k, args.options.temperature, rows * vocab * static_cast<int64_t>(sizeof(S)));
  double* row_stats = args.row_stats;
  int64_t bad_labels = 0, bad_index_rows = 0;
  const int threads = threads_for(args.num_threads, rows, plan.any() ? vocab : kk * 8);
  const TailExps<C> exps(1.0 / args.options.temperature);
  const S* student = static_cast<const S*>(args.student);
  const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(S));

#pragma omp parallel num_threads(threads) reduction(+ : bad_labels, bad_index_rows)
  {
    RowScratch scratch(kk);
    int64_t fetched = -1;  // the row this thread asked for ahead
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      double* stats = row_stats + row * kSparseRowStats;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        for (int j = 0; j < kSparseRowStats; ++j) stats[j] = 0.0;
        continue;
      }
      if (args.labels && (args.labels[row] < 0 || args.labels[row] >= vocab)) {
        ++bad_labels;
        for (int j = 0; j < kSparseRowStats; ++j) stats[j] = kNaN;
        continue;
      }
      // Forward only: the thread's next row streams in while this one's tail sums run. (The
      // one-pass kernel does not: there the next row evicts this one before its gradient.)
      const AheadPlan next = plan.prefetch && (plan.tail_at_t || plan.tail_at_1) && row + 1 < rows
                                 ? next_row_plan(student + (row + 1) * args.student_row_stride, row_bytes)
                                 : AheadPlan{};
      if (forward_row<S, C>(args, k, plan, exps, row, scratch, stats, next, row == fetched) != 0) {
        ++bad_index_rows;
        for (int j = 0; j < kSparseRowStats; ++j) stats[j] = kNaN;
      }
      fetched = next.next_row ? row + 1 : -1;
    }
  }

  reduce_row_losses(row_stats, kSparseRowStats, 7, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    args.valid_rows);
  return SparseKDForwardResult{bad_labels, bad_index_rows};
}


// ---- backward ----

// What the gradient of every row of one call shares.
template <class C>
struct GradientSetup {
  SparseCoefficients<double> k;
  StreamPlan plan;
  bool kd_tail;
  TailGradFn<C> tail_grad;
  double inv_t, alpha, eps, beta;
  TailExps<C> exps;
  explicit GradientSetup(const SparseKDInputs& args)
      : k(sparse::make_sparse_coefficients<double>(args.options, args.tail)),
        plan(plan_for(k, args.options.temperature, args.rows * args.vocab * dtype_size(args.student_dtype))),
        kd_tail(k.need_kd && k.bucket),
        tail_grad(pick_tail_grad<C>(kd_tail, k.need_ce, k.need_ce && kd_tail && !plan.tail_at_1, plan.power_1)),
        inv_t(1.0 / args.options.temperature),
        alpha(static_cast<double>(k.alpha)),
        eps(static_cast<double>(k.label_smoothing)),
        beta(static_cast<double>(k.beta)),
        exps(1.0 / args.options.temperature) {}
};

// The factor the reduction applies to every row's loss (mean: 1 / valid rows, 0 when none).
inline double reduction_scale(Reduction reduction, double valid, int64_t rows) {
  if (reduction == Reduction::Mean) return valid > 0 ? 1.0 / valid : 0.0;
  if (reduction == Reduction::BatchMean) return rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  return 1.0;
}

// The gradient row of one valid row with statistics `st`, for g = grad_output times the
// reduction's scale: zeros for an ignored row and NaN for a NaN row are the callers'. Streams
// the row once and writes the gradient once; `g_row` may alias the student row (each chunk is
// read before it is written).
template <class S, class C>
void gradient_row(const SparseKDInputs& args, const GradientSetup<C>& setup, const double* st, double g, int64_t row,
                  RowScratch& scratch, S* g_row) {
  const SparseCoefficients<double>& k = setup.k;
  const int64_t vocab = args.vocab, kk = args.soft_labels.k;
  const double inv_t = setup.inv_t, alpha = setup.alpha, eps = setup.eps, beta = setup.beta;
  const bool kd_tail = setup.kd_tail;
  const TailGradFn<C> tail_grad = setup.tail_grad;
  const S* student = static_cast<const S*>(args.student);
  const double kd_factor = k.need_kd ? g * (1.0 - alpha) * static_cast<double>(k.divergence_scale) * inv_t : 0.0;
  const double ce_factor = k.need_ce ? g * alpha : 0.0;
  const double smooth = eps / static_cast<double>(vocab);
  const double tail_max = st[0], tail_log_sum_t = st[1], student_norm = st[2], lse_1 = st[3];
  const double teacher_norm = st[4], g_bar = st[5], tail_coeff = st[6];
  // Tail-formula scalars (a row without tail entries has tail_max = -inf: use 0 instead).
  const bool has_tail = tail_max != -kInf;
  const double tail_ref = has_tail ? tail_max : 0.0;
  const double log_sum_t = has_tail && kd_tail ? tail_log_sum_t : 0.0;
  load_kept(args.soft_labels, row, vocab, scratch.kept);  // validated by the forward pass
  const std::vector<KeptEntry>& kept = scratch.kept;
  const S* s_row = student + row * args.student_row_stride;
  // The forward pass's reference logits (its log-normalisers are relative to them).
  double kept_max = -kInf;
  for (const KeptEntry& entry : kept)
    kept_max = std::max(kept_max, static_cast<double>(load_one<S, C>(s_row + entry.index)));
  const double kd_reference = sparse::reference_logit(kept_max, k.bucket ? tail_max : -kInf);
  const double reference = sparse::reference_logit(kept_max, tail_max);
  const double q_tail =
      has_tail && kd_tail ? std::exp((tail_max - kd_reference) * inv_t + tail_log_sum_t - student_norm) : 0.0;
  const int64_t label = args.labels ? args.labels[row] : -1;
  const double label_step = ce_factor * (1.0 - eps);
  // The tail formula's per-row factors: 1/Z_tail = exp(-log_sum_t) and
  // exp(-(reference - tail_ref + lse_1)), so that each entry takes one exp of (s - tail_max).
  const C inv_z_tail = static_cast<C>(std::exp(-log_sum_t));
  const C r_factor = static_cast<C>(std::exp(-(reference - tail_ref + lse_1)));

  alignas(64) C student_buf[kChunk];
  alignas(64) C grad_buf[kChunk];
  alignas(64) C kept_buf[kChunk];
  size_t next = 0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    C* out;
    if constexpr (std::is_same_v<S, C>) out = g_row + start;
    else out = grad_buf;
    const bool has_kept = next < kept.size() && kept[next].index < start + n;
    const bool touches_label = label >= start && label < start + n;
    const C* s = nullptr;
    if (tail_grad) {
      s = load_chunk<S, C>(s_row + start, n, student_buf);
      if (has_kept && static_cast<const void*>(s) == static_cast<const void*>(out)) {
        // In place: the kept logits of this chunk are read after the tail formula wrote `out`.
        std::memcpy(kept_buf, s, sizeof(C) * static_cast<size_t>(n));
        s = kept_buf;
      }
      tail_grad(s, n, out, static_cast<C>(tail_ref), setup.exps, inv_z_tail, static_cast<C>(kd_factor * tail_coeff),
                static_cast<C>(q_tail), static_cast<C>(ce_factor), static_cast<C>(smooth), r_factor);
    } else {
      if (has_kept && static_cast<const void*>(s_row + start) == static_cast<const void*>(out)) {
        copy_chunk<S, C>(s_row + start, n, kept_buf);
        s = kept_buf;
      }
      std::memset(static_cast<void*>(out), 0, sizeof(C) * static_cast<size_t>(n));
      if (!has_kept && !touches_label) {
        if constexpr (!std::is_same_v<S, C>) store_chunk<S, C>(out, n, g_row + start);
        continue;
      }
    }
    for (; next < kept.size() && kept[next].index < start + n; ++next) {
      const int64_t offset = kept[next].index - start;
      const double logit =
          s ? static_cast<double>(s[offset]) : static_cast<double>(load_one<S, C>(s_row + kept[next].index));
      double value = 0.0;
      if (k.need_kd) {
        const double log_p = sparse::load_value<double>(args.soft_labels.logprobs, args.soft_labels.logprob_dtype,
                                                        row * kk + kept[next].slot) - teacher_norm;
        const double log_q = (logit - kd_reference) * inv_t - student_norm;
        const auto term = sparse::bucket_term<double>(log_p, log_q, k.divergence, beta);
        const double q = log_q == -kInf ? 0.0 : std::exp(log_q);
        value += kd_factor * (term.weight - g_bar * q);
      }
      if (k.need_ce) value += ce_factor * (std::exp((logit - reference) - lse_1) - smooth);
      out[offset] = static_cast<C>(value);
    }
    if (touches_label) out[label - start] -= static_cast<C>(label_step);
    store_chunk<S, C>(out, n, g_row + start);
  }
}

template <class S, class C>
void backward_impl(const SparseKDBackwardArgs& args) {
  const GradientSetup<C> setup(args);
  const int64_t rows = args.rows, vocab = args.vocab;
  const C* grad_output = static_cast<const C*>(args.grad_output);
  S* grad_student = static_cast<S*>(args.grad_student);
  const double scale = reduction_scale(args.options.reduction, *args.valid_rows, rows);

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab))
  {
    RowScratch scratch;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      S* g_row = grad_student + row * vocab;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        std::memset(static_cast<void*>(g_row), 0, sizeof(S) * static_cast<size_t>(vocab));
        continue;
      }
      const double* st = args.row_stats + row * kSparseRowStats;
      if (st[7] != st[7]) {  // a NaN row loss (NaN input, or a bad label or index): a NaN gradient row
        fill_nan(g_row, vocab);
        continue;
      }
      const double g = static_cast<double>(grad_output[row * args.grad_output_stride]) * scale;
      gradient_row<S, C>(args, setup, st, g, row, scratch, g_row);
    }
  }
}

// ---- one-pass training ----

// forward_impl's statistics and loss and, for each row right after them (the row is then
// cache-resident), its gradient for grad_output = 1 times the reduction's scale into
// args.grad_student: the row is read from memory once for both.
template <class S, class C>
SparseKDForwardResult forward_grad_impl(const SparseKDForwardArgs& args) {
  const GradientSetup<C> setup(args);
  const int64_t rows = args.rows, vocab = args.vocab, kk = args.soft_labels.k;
  double* row_stats = args.row_stats;
  S* grad_student = static_cast<S*>(args.grad_student);
  int64_t valid = 0;
  for (int64_t row = 0; row < rows; ++row) valid += label_valid(args.labels, row, args.options.ignore_index) ? 1 : 0;
  const double g = reduction_scale(args.options.reduction, static_cast<double>(valid), rows);
  int64_t bad_labels = 0, bad_index_rows = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab)) reduction(+ : bad_labels, bad_index_rows)
  {
    RowScratch scratch(kk);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      double* stats = row_stats + row * kSparseRowStats;
      S* g_row = grad_student + row * vocab;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        for (int j = 0; j < kSparseRowStats; ++j) stats[j] = 0.0;
        std::memset(static_cast<void*>(g_row), 0, sizeof(S) * static_cast<size_t>(vocab));
        continue;
      }
      bool bad = false;
      if (args.labels && (args.labels[row] < 0 || args.labels[row] >= vocab)) {
        ++bad_labels;
        bad = true;
      } else if (forward_row<S, C>(args, setup.k, setup.plan, setup.exps, row, scratch, stats) != 0) {
        ++bad_index_rows;
        bad = true;
      }
      if (bad) {
        for (int j = 0; j < kSparseRowStats; ++j) stats[j] = kNaN;
      }
      if (stats[7] != stats[7]) {  // a NaN row loss: a NaN gradient row
        fill_nan(g_row, vocab);
        continue;
      }
      gradient_row<S, C>(args, setup, stats, g, row, scratch, g_row);
    }
  }

  reduce_row_losses(row_stats, kSparseRowStats, 7, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    args.valid_rows);
  return SparseKDForwardResult{bad_labels, bad_index_rows};
}

// ---- dtype dispatch ----

template <class Fn>
auto with_student_type(DType student, Fn&& fn) {
  switch (student) {
    case DType::BFloat16: return fn(bf16_t{}, float{});
    case DType::Float16: return fn(f16_t{}, float{});
    case DType::Float64: return fn(double{}, double{});
    case DType::Float32: break;
  }
  return fn(float{}, float{});
}

}  // namespace

SparseKDForwardResult sparse_kd_forward(const SparseKDForwardArgs& args) {
  return with_student_type(args.student_dtype, [&](auto s, auto c) {
    return args.grad_student ? forward_grad_impl<decltype(s), decltype(c)>(args)
                             : forward_impl<decltype(s), decltype(c)>(args);
  });
}

void sparse_kd_backward(const SparseKDBackwardArgs& args) {
  with_student_type(args.student_dtype, [&](auto s, auto c) { backward_impl<decltype(s), decltype(c)>(args); });
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
