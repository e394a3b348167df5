// CPU kernels of the dense KD loss (forward statistics + loss, backward gradient, and the
// one-pass training kernel that writes the gradient in the forward pass).
// This file is compiled once per instruction-set variant (baseline x86-64, AVX2+FMA+F16C,
// AVX-512) into the namespace kdfast::cpu::KDFAST_CPU_VARIANT; dispatch.cpp picks one at run
// time. Contract: see types.h (KDForwardArgs / KDBackwardArgs) and rowmath.h (the math); the
// chunk math is kd_loss_chunks.h, one row's statistics streaming kd_loss_stream.h.
// Rows are split over OpenMP threads (args.num_threads, no more); each row is streamed in
// chunks of kChunk elements: converted to the compute type into a stack buffer (or used in
// place for float32 / float64), then swept with vectorised loops; the exp-bound sweeps (the
// forward statistics, the gradients) run on the lanes of lanes.h with the exp(x/T) of exp_lanes.h.
// The forward pass reads the row from memory once, in one statistics sweep whose exponentials
// are taken from the maxima of the row's first chunk (stream_row: the bases; a row that rises too
// far above them is streamed again from its maxima; JSD/TVD: one more sweep over the cached
// row); the backward pass finds the same bases, reads the row once more and writes the gradient
// once, multiplied by grad_output, or NaN for a row whose loss is NaN (NaN in, NaN out:
// rowmath::row_sums_defined).
// With args.grad_student set, the forward pass is forward_grad_impl: each row's gradient is
// written right after its statistics, from the cache-resident row and the exponentials the
// statistics sweep kept (JSD: and the log m its second sweep kept), so training reads the
// logits from memory once.
// Logits enter as scaled differences h x - h max (rowmath::difference_scale) and the per-row
// finishing (loss, gradient factors) runs in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "kd_loss_chunks.h"
#include "kd_loss_stream.h"
#include "kernel_common.h"
#include "lanes.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using rowmath::Coefficients;
using rowmath::GradRow;
using rowmath::RowPartial;
using rowmath::RowStats;

namespace {

// ---- row drivers: storage dtypes S (student), T (teacher), compute type C ----

// The whole float vectors of an n-element chunk at `start` (all n for double): the part a kept
// sweep reads from the kept exponentials; the scalar tail after it is computed from the logits.
template <class C>
int64_t kept_bulk(int64_t n) {
  return std::is_same_v<C, float> ? n - n % kFloatLanes : n;
}

// The chunk of a row at `start` as a compute-type pointer that is valid from element `from` on
// (the elements before it are neither converted nor read): the scalar tail of a kept sweep.
template <class In, class C>
const C* load_chunk_from(const In* row, int64_t start, int64_t n, int64_t from, C* buf) {
  return load_chunk<In, C>(row + start + from, n - from, buf + from) - from;
}

// A row's normalising factors on its bases, in double: 1/Z times exp(-(max - base)/T) for q and
// p, exp(-(max - base)) for softmax(s) (RowFrame rounds them once).
struct FrameFactors {
  double inv_zq, inv_zp, inv_z1;
};

template <class C>
FrameFactors frame_factors(const Coefficients<C>& k, const RowStats<C>& st, C base_s, C base_t) {
  const double inv_t = k.inv_scaled_t_d * static_cast<double>(k.diff_scale);
  const auto rise = [](C base, C max) {
    return base == max ? 0.0 : static_cast<double>(max) - static_cast<double>(base);
  };
  const double rise_s = rise(base_s, st.student_max), rise_t = rise(base_t, st.teacher_max);
  return FrameFactors{std::exp(-rise_s * inv_t - static_cast<double>(st.student_log_sum_T)),
                      std::exp(-rise_t * inv_t - static_cast<double>(st.teacher_log_sum)),
                      std::exp(-rise_s - static_cast<double>(st.student_log_sum_1))};
}

template <class C>
RowFrame<C> row_frame(const FrameFactors& z, C base_s, C base_t) {
  return RowFrame<C>{base_s, base_t, static_cast<C>(z.inv_zq), static_cast<C>(z.inv_zp), static_cast<C>(z.inv_z1)};
}

// The statistics (RowStats, then the row loss, then 0) of one valid row with a label in range
// (or none), from its streamed partial: the second sweep of JSD / TVD over the row, the
// cross-entropy, and NaN where a sum the loss reads is undefined (NaN in, NaN out).
template <class S, class T, class C>
void finish_row(const CallSetup<C>& call, const StreamedRow<C>& row, const S* s_row, const T* t_row, int64_t label,
                int64_t vocab, KeptExps<C> kept, C* stats_out) {
  const RowPartial<C>& part = row.part;
  const Coefficients<C>& k = call.k;
  alignas(64) C student_buf[kChunk];
  alignas(64) C teacher_buf[kChunk];
  double divergence = 0.0;
  RowStats<C> st = rowmath::finish_stats(part, k, &divergence);
  if (call.kernels.sweep_kept) {  // JSD / TVD: every caller keeps their exponentials (thread_kept)
    C acc0 = 0, acc1 = 0;
    const RowFrame<C> frame = row_frame(frame_factors(k, st, row.base_s, row.base_t), row.base_s, row.base_t);
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const int64_t from = call.kernels.kept_sweep_reads_logits ? 0 : kept_bulk<C>(n);
      const C* s = load_chunk_from<S, C>(s_row, start, n, from, student_buf);
      const C* t = load_chunk_from<T, C>(t_row, start, n, from, teacher_buf);
      call.kernels.sweep_kept(s, t, kept.at(start), n, k, call.exps, st, frame, acc0, acc1);
    }
    divergence = static_cast<double>(k.divergence == Divergence::JSD ? rowmath::finish_jsd(acc0, acc1, k, st)
                                                                      : rowmath::finish_tvd(acc0, acc1, st));
  }
  double ce = 0.0;
  if (k.need_ce) {
    const double label_logit = static_cast<double>(load_one<S, C>(s_row + label)) - static_cast<double>(st.student_max);
    const double centered = static_cast<double>(part.student_centered_total) / static_cast<double>(k.diff_scale);
    ce = rowmath::cross_entropy(label_logit, static_cast<double>(st.student_log_sum_1), centered, vocab,
                                k.label_smoothing_d);
  }
  // A sum the loss needs that is NaN (NaN or +inf logits) or zero (only -inf logits) makes
  // the row NaN; its gradient row is then NaN too.
  const double row_loss = rowmath::row_sums_defined(part, k) ? rowmath::combine_loss(ce, divergence, k) : kNaN<double>;
  stats_out[0] = st.teacher_max;
  stats_out[1] = st.teacher_log_sum;
  stats_out[2] = st.student_max;
  stats_out[3] = st.student_log_sum_T;
  stats_out[4] = st.student_log_sum_1;
  stats_out[5] = st.aux;
  stats_out[6] = static_cast<C>(row_loss);
  stats_out[7] = C(0);
}

// Writes the statistics of a row that adds nothing (ignored: zeros) or is NaN (a bad label).
template <class C>
void fill_stats(C* stats_out, C value) {
  for (int j = 0; j < kRowStats; ++j) stats_out[j] = value;
}

// A valid row's gradient factors for g = grad_output times the reduction's scale, on the bases
// its exponentials are taken from (reverse_kl's bracket (ds - dt) + c moved onto them).
template <class C>
ChunkGradRow<C> chunk_grad_row(double g, const Coefficients<C>& k, const C* st, int64_t vocab, C base_s, C base_t) {
  ChunkGradRow<C> row_grad;
  row_grad.row = rowmath::make_grad_row(g, k, RowStats<C>{st[0], st[1], st[2], st[3], st[4], st[5]}, vocab);
  GradRow<C>& gr = row_grad.row;
  gr.r_scale = k.student_1_mode == 2 || k.student_1_mode == 4
                   ? static_cast<C>(std::exp(static_cast<double>(k.student_1_mode) * static_cast<double>(st[3]) -
                                             static_cast<double>(st[4])))
                   : C(0);
  if ((base_s != gr.stats.student_max || base_t != gr.stats.teacher_max) && k.divergence == Divergence::ReverseKL) {
    const double h = static_cast<double>(k.diff_scale);
    const double lift = (static_cast<double>(base_s) - static_cast<double>(gr.stats.student_max)) * h -
                        (static_cast<double>(base_t) - static_cast<double>(gr.stats.teacher_max)) * h;
    gr.rkl_c = static_cast<C>(static_cast<double>(gr.rkl_c) + lift);
  }
  const FrameFactors z = frame_factors(k, gr.stats, base_s, base_t);
  row_grad.frame = row_frame(z, base_s, base_t);
  // PolyGrad's factors, each one product in double rounded once.
  const double kd = k.need_kd ? static_cast<double>(gr.kd_factor) : 0.0;
  const double ce = k.need_ce ? static_cast<double>(gr.ce_factor) : 0.0;
  const bool r_is_q = k.student_1_mode == rowmath::kStudent1None;  // CE at T = 1
  row_grad.poly.a = static_cast<C>((kd + (r_is_q ? ce : 0.0)) * z.inv_zq);
  row_grad.poly.b = static_cast<C>(r_is_q ? 0.0 : ce * z.inv_z1);
  row_grad.poly.neg_c = static_cast<C>(-kd * z.inv_zp);
  row_grad.poly.d = static_cast<C>(ce * static_cast<double>(gr.smooth));
  return row_grad;
}

// The factor the reduction applies to every row's loss (mean: 1 / valid rows, 0 when none).
inline double reduction_scale(Reduction reduction, double valid, int64_t rows) {
  if (reduction == Reduction::Mean) return valid > 0 ? 1.0 / valid : 0.0;
  if (reduction == Reduction::BatchMean) return rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  return 1.0;
}

// The gradient row of a valid row whose statistics `st` are known, for g (see chunk_grad_row),
// chunk by chunk: from the kept exponentials (`kept.q` set: all but JSD in the one-pass kernel)
// or by the chunk gradient over the logits. `g_row` may alias `s_row` (each chunk is read before
// it is written). A row whose loss is NaN (NaN input, or a bad label) gets a NaN gradient row.
// `streaming`: the chunks go to g_row with streaming stores (memory_policy.h; the caller
// fences).
template <class S, class T, class C>
struct GradientRow {
  const CallSetup<C>* call;
  const S* s_row;
  const T* t_row;
  int64_t label;
  KeptExps<C> kept;
  S* g_row;
  bool nan_row;
  bool streaming;
  ChunkGradRow<C> row_grad;

  GradientRow(const CallSetup<C>& setup, const C* st, double g, const S* s, const T* t, int64_t row_label,
              int64_t vocab, KeptExps<C> kept_exps, C base_s, C base_t, S* out, bool streaming_stores = false)
      : call(&setup), s_row(s), t_row(t), label(row_label), kept(kept_exps), g_row(out), nan_row(st[6] != st[6]),
        streaming(streaming_stores) {
    if (!nan_row) row_grad = chunk_grad_row(g, setup.k, st, vocab, base_s, base_t);
  }

  // Writes the gradient of the n elements at `start`.
  void chunk(int64_t start, int64_t n) const {
    if (nan_row) {
      fill_nan(g_row + start, n);
      return;
    }
    const Coefficients<C>& k = call->k;
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    alignas(64) C grad_buf[kChunk];
    C* out = grad_buf;
    if constexpr (std::is_same_v<S, C>) {
      if (!streaming) out = g_row + start;
    }
    if (kept.q) {
      // The whole vectors from the kept exponentials; the scalar tail of a float row (fewer than
      // kFloatLanes elements) by the chunk gradient itself, whose scalar loop is the very code
      // the backward pass runs there, so that both give the same bits wherever the compiler
      // contracts a multiply and an add in scalar code.
      const int64_t bulk = kept_bulk<C>(n);
      const C* s_bulk = nullptr;
      const C* t_bulk = nullptr;
      if (call->kernels.kept_grad_reads_logits) {
        s_bulk = load_chunk<S, C>(s_row + start, n, student_buf);
        t_bulk = load_chunk<T, C>(t_row + start, n, teacher_buf);
      }
      call->kernels.grad_kept(s_bulk, t_bulk, kept.at(start), bulk, k, row_grad, out);
      if (bulk < n) {
        const C* s = load_chunk_from<S, C>(s_row, start, n, bulk, student_buf);
        const C* t = k.need_kd ? load_chunk_from<T, C>(t_row, start, n, bulk, teacher_buf) : nullptr;
        call->kernels.grad(s + bulk, t ? t + bulk : nullptr, n - bulk, k, call->exps, row_grad, out + bulk);
      }
    } else {
      const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
      const C* t = k.need_kd ? load_chunk<T, C>(t_row + start, n, teacher_buf) : nullptr;
      call->kernels.grad(s, t, n, k, call->exps, row_grad, out);
    }
    if (k.need_ce && label >= start && label < start + n) out[label - start] -= row_grad.row.label_step;
    if (!streaming) {
      store_chunk<S, C>(out, n, g_row + start);
    } else if constexpr (std::is_same_v<S, C>) {
      copy_streaming(g_row + start, out, n);
    } else {
      alignas(64) S staged[kChunk];
      store_chunk<S, C>(out, n, staged);
      copy_streaming(g_row + start, staged, n);
    }
  }

  // Writes the chunks from `from` to the end of the row.
  void rest(int64_t from, int64_t vocab) const {
    for (int64_t start = from; start < vocab; start += kChunk) chunk(start, std::min(kChunk, vocab - start));
  }
};

// Per-thread row buffers of the kept exponentials, kept between calls (the OpenMP threads
// persist), so that a call does not fault in fresh pages.
template <class C>
C* kept_buffer(int64_t size) {
  thread_local std::vector<C> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

// The calling thread's kept-exponential slices for one row (KeptExps), set `which` of `sets` (the
// interleaving one-pass kernel keeps one row's while it streams the next: two sets of 3 V, or
// 4 V with JSD's log m), or none when `keep` is false.
template <class C>
KeptExps<C> thread_kept(const CallSetup<C>& call, int64_t vocab, bool keep, int which = 0, int sets = 1) {
  if (!keep) return KeptExps<C>{nullptr, nullptr, nullptr};
  const Coefficients<C>& k = call.k;
  const int64_t slices = call.kernels.keeps_log_m ? 4 : 3;
  C* base = kept_buffer<C>(slices * sets * vocab) + which * slices * vocab;
  return KeptExps<C>{base, k.need_kd ? base + vocab : nullptr,
                     k.student_1_mode == rowmath::kStudent1Exp ? base + 2 * vocab : nullptr,
                     call.kernels.keeps_log_m ? base + 3 * vocab : nullptr};
}

template <class S, class T, class C>
int64_t forward_impl(const KDForwardArgs& args) {
  const CallSetup<C> call(args);
  const int64_t rows = args.rows, vocab = args.vocab;
  const S* student = static_cast<const S*>(args.student);
  const T* teacher = static_cast<const T*>(args.teacher);
  C* row_stats = static_cast<C*>(args.row_stats);
  // JSD's and TVD's second sweeps read the exponentials their statistics sweep kept.
  const bool keep = call.kernels.sweep_kept != nullptr;
  int64_t bad_labels = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab)) reduction(+ : bad_labels)
  {
    const KeptExps<C> kept = thread_kept(call, vocab, keep);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      C* stats_out = row_stats + row * kRowStats;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        fill_stats(stats_out, C(0));
        continue;
      }
      const int64_t label = args.labels ? args.labels[row] : -1;
      if (args.labels && (label < 0 || label >= vocab)) {
        ++bad_labels;
        fill_stats(stats_out, kNaN<C>);
        continue;
      }
      const S* s_row = student + row * args.student_row_stride;
      const T* t_row = teacher + row * args.teacher_row_stride;
      const StreamedRow<C> streamed = stream_row<S, T, C>(call, s_row, t_row, vocab, kept);
      finish_row<S, T, C>(call, streamed, s_row, t_row, label, vocab, kept, stats_out);
    }
  }

  reduce_row_losses(row_stats, kRowStats, 6, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
}

// The one-pass training kernel: the forward pass of forward_impl and, for each row right after
// its statistics, its gradient for grad_output = 1 times the reduction's scale (args.grad_student),
// so that the row is read from memory once. Per row: stream_row (keeping its exponentials in
// per-thread row buffers, except float64 reverse_kl), JSD / TVD's second sweep from them (JSD
// also keeps log m), then the gradient sweep from the kept values, with no exp or log. Both
// paths stream the statistics the same way and form every exponential from the same bases, so
// they give the same statistics and, for grad_output = 1, the same gradient.
template <class S, class T, class C>
int64_t forward_grad_impl(const KDForwardArgs& args) {
  const CallSetup<C> call(args);
  const int64_t rows = args.rows, vocab = args.vocab;
  const S* student = static_cast<const S*>(args.student);
  const T* teacher = static_cast<const T*>(args.teacher);
  C* row_stats = static_cast<C*>(args.row_stats);
  S* grad_student = static_cast<S*>(args.grad_student);
  int64_t valid = 0;
  for (int64_t row = 0; row < rows; ++row) valid += label_valid(args.labels, row, args.options.ignore_index) ? 1 : 0;
  const double g = reduction_scale(args.options.reduction, static_cast<double>(valid), rows);
  const bool keep = call.kernels.stats_keep != nullptr;
  // Rows whose logits and kept exponentials outgrow a core's L2 write their gradient while the
  // next row streams in; a shorter row's gradient follows its statistics while the row is still
  // in L2. A large gradient of its own storage (not inplace_backward) is written with streaming
  // stores, so that its lines are not read for ownership first (memory_policy.h).
  const int64_t row_bytes =
      vocab * static_cast<int64_t>(sizeof(S) + sizeof(T) + (call.kernels.keeps_log_m ? 3 : 2) * sizeof(C));
  const bool in_place = static_cast<const void*>(grad_student) == static_cast<const void*>(student);
  const bool interleave = keep && row_bytes > l2_cache_bytes();
  const bool streaming = !in_place && rows * vocab * static_cast<int64_t>(sizeof(S)) > kStreamingStoreBytes;
  int64_t bad_labels = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab)) reduction(+ : bad_labels)
  {
    // With interleave, a row's gradient is written while the thread streams its next row
    // (stream_row's companion), from the other of two kept sets; the last row's after the loop.
    int which = 0;
    std::optional<GradientRow<S, T, C>> pending;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      C* stats_out = row_stats + row * kRowStats;
      S* g_row = grad_student + row * vocab;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        fill_stats(stats_out, C(0));
        std::memset(static_cast<void*>(g_row), 0, sizeof(S) * vocab);
        continue;
      }
      const int64_t label = args.labels ? args.labels[row] : -1;
      if (args.labels && (label < 0 || label >= vocab)) {
        ++bad_labels;
        fill_stats(stats_out, kNaN<C>);
        fill_nan(g_row, vocab);
        continue;
      }
      const S* s_row = student + row * args.student_row_stride;
      const T* t_row = teacher + row * args.teacher_row_stride;
      const KeptExps<C> kept = thread_kept(call, vocab, keep, interleave ? which : 0, interleave ? 2 : 1);
      const StreamedRow<C> streamed =
          pending ? stream_row<S, T, C>(call, s_row, t_row, vocab, kept,
                                        [&](int64_t start, int64_t n) { pending->chunk(start, n); })
                  : stream_row<S, T, C>(call, s_row, t_row, vocab, kept);
      finish_row<S, T, C>(call, streamed, s_row, t_row, label, vocab, kept, stats_out);
      pending.emplace(call, stats_out, g, s_row, t_row, label, vocab, kept, streamed.base_s, streamed.base_t, g_row,
                      streaming);
      which ^= 1;
      if (!interleave) {
        pending->rest(0, vocab);
        pending.reset();
      }
    }
    if (pending) pending->rest(0, vocab);
    if (streaming) streaming_fence();
  }

  reduce_row_losses(row_stats, kRowStats, 6, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
}

template <class S, class T, class C>
void backward_impl(const KDBackwardArgs& args) {
  const CallSetup<C> call(args);
  const int64_t rows = args.rows, vocab = args.vocab;
  const S* student = static_cast<const S*>(args.student);
  const T* teacher = static_cast<const T*>(args.teacher);
  const C* row_stats = static_cast<const C*>(args.row_stats);
  const C* grad_output = static_cast<const C*>(args.grad_output);
  S* grad_student = static_cast<S*>(args.grad_student);
  const double scale = reduction_scale(args.options.reduction,
                                       static_cast<double>(*static_cast<const C*>(args.valid_rows)), rows);
  const KeptExps<C> none{nullptr, nullptr, nullptr};

#pragma omp parallel for num_threads(threads_for(args.num_threads, rows, vocab)) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    S* g_row = grad_student + row * vocab;
    if (!label_valid(args.labels, row, args.options.ignore_index)) {
      std::memset(static_cast<void*>(g_row), 0, sizeof(S) * vocab);
      continue;
    }
    const double g = static_cast<double>(grad_output[row * args.grad_output_stride]) * scale;
    const C* st = row_stats + row * kRowStats;
    const S* s_row = student + row * args.student_row_stride;
    const T* t_row = teacher + row * args.teacher_row_stride;
    C base_s = st[2], base_t = st[0];
    if (st[6] == st[6]) row_bases<S, T, C>(call.k, st, s_row, t_row, vocab, base_s, base_t);
    GradientRow<S, T, C>(call, st, g, s_row, t_row, args.labels ? args.labels[row] : -1, vocab, none, base_s, base_t,
                         g_row)
        .rest(0, vocab);
  }
}

template <class S, class T>
int64_t forward_for(const KDForwardArgs& args) {
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  return args.grad_student ? forward_grad_impl<S, T, C>(args) : forward_impl<S, T, C>(args);
}

template <class S, class T>
void backward_for(const KDBackwardArgs& args) {
  if constexpr (std::is_same_v<S, double>) backward_impl<S, T, double>(args);
  else backward_impl<S, T, float>(args);
}

}  // namespace

int64_t kd_forward(const KDForwardArgs& args) {
  if (args.student_dtype == DType::Float64) return forward_for<double, double>(args);
  return with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    return forward_for<decltype(s), decltype(t)>(args);
  });
}

void kd_backward(const KDBackwardArgs& args) {
  if (args.student_dtype == DType::Float64) return backward_for<double, double>(args);
  with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    backward_for<decltype(s), decltype(t)>(args);
  });
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
