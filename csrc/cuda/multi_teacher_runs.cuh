// The per-thread running statistics of the multi-teacher forward kernel (multi_teacher.cu) and
// the per-row numbers the kernels finish from them; host-callable, so that
// tests/functional/cuda_multi_sparse_replay.cu ("math") runs the kernels' own arithmetic on the
// CPU against a float64 computation. Contract (rowmath.h's units: logits enter as scaled
// differences d = h x - h max, κ = 1/(hT)):
//   StudentRun: the running maximum of s, Σ exp(ds κ), Σ exp(ds / h), Σ ds (label smoothing)
//     and the element count, relative to that maximum;
//   TeacherRun: the running maximum of t, Σ exp(dt κ) and a weighted sum over
//     u_i = h s_i - h t_i: forward_kl Σ exp(dt κ) (-u), reverse_kl Σ exp(ds κ) u. No maximum
//     shifts u, so moving a run onto a larger maximum only multiplies its sums by the
//     exponentials' factor (the student's for reverse_kl); logits spread over ±1e4 lose
//     nothing there.
// Batches of kE values are added with add_student_batch, then add_teacher_batch per teacher
// (with the student batch's values and factor); runs are moved onto the row's maxima with
// rebase_student / move_teacher_run before they are added. one_pass_divergence gives D(p, q)
// or D(q, p) of combine Sum from the row's sums, in double, and the aux value the backward pass
// reads (D / κ); reverse_kl_mean_u rebuilds from it the mean of u under q, which the backward
// pass uses as u_i - mean_u.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "kd_loss_cuda_layout.cuh"
#include "kdfast/rowmath.h"

namespace kdfast {
namespace cuda {

template <class C>
struct StudentRun {
  C max, sum_t, sum_1, centered, count;
};

template <class C>
struct TeacherRun {
  C max, sum, weighted;
};

// Which weighted sum a teacher run keeps (combine Sum with forward_kl / reverse_kl; else none).
enum class RunWeight : int { None = 0, Forward = 1, Reverse = 2 };

template <class C>
KDFAST_HD StudentRun<C> empty_student_run() {
  return StudentRun<C>{rowmath::neg_inf<C>(), C(0), C(0), C(0), C(0)};
}

template <class C>
KDFAST_HD TeacherRun<C> empty_teacher_run() {
  return TeacherRun<C>{rowmath::neg_inf<C>(), C(0), C(0)};
}

// The larger of two values, ignoring NaN (IEEE maxNum, as the kernels' MaxOp).
KDFAST_HD float run_max(float a, float b) { return fmaxf(a, b); }
KDFAST_HD double run_max(double a, double b) { return fmax(a, b); }

// exp(-(new_max - old_max) h scale): the factor moving sums kept relative to old_max onto
// new_max >= old_max (0 while old_max is -inf: the sums are then 0 or NaN and stay so).
template <class C>
KDFAST_HD C run_factor(C old_max, C new_max, C h, C scale) {
  return old_max != rowmath::neg_inf<C>() ? rowmath::exp_c(-(new_max * h - old_max * h) * scale) : C(0);
}

// Moves a student run onto new_max (>= its maximum); returns the factor at T (1 if unchanged).
template <class C>
KDFAST_HD C rebase_student(StudentRun<C>& run, C new_max, const rowmath::Coefficients<C>& k) {
  if (new_max == run.max) return C(1);
  const C h = k.diff_scale;
  const C shift = run.max != rowmath::neg_inf<C>() ? new_max * h - run.max * h : C(0);
  const C factor = run_factor(run.max, new_max, h, k.inv_scaled_t);
  run.sum_t *= factor;
  if (k.need_student_1) run.sum_1 *= run_factor(run.max, new_max, h, k.inv_diff_scale);
  run.centered -= run.count * shift;
  run.max = new_max;
  return factor;
}

// Adds one batch of the student row (s: kE values, -inf outside the row; partial: the batch
// reaches outside the row, elements first + e); es gets exp(ds κ) per element. Returns the
// factor that moved the run's earlier sums (1 when the maximum did not change), which the
// teachers' reverse_kl sums take too.
template <int kE, class C, class ExpT, class Exp1>
KDFAST_HD C add_student_batch(StudentRun<C>& run, const C* s, int first, int vocab, bool partial, bool smooth,
                              const rowmath::Coefficients<C>& k, const ExpT& exp_over_t, const Exp1& exp_plain,
                              C* es) {
  C batch_max = rowmath::neg_inf<C>();
#pragma unroll
  for (int e = 0; e < kE; ++e) batch_max = run_max(batch_max, s[e]);
  const C factor = rebase_student(run, run_max(run.max, batch_max), k);
  const C h = k.diff_scale;
  const C shift = (run.max == rowmath::neg_inf<C>() ? C(0) : run.max) * h;
  int inside = 0;
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const C ds = rowmath::scaled_difference(s[e], h, shift);
    es[e] = exp_over_t(ds);
    run.sum_t += es[e];
    if (k.need_student_1) run.sum_1 += exp_plain(ds);
    const bool in = !partial || in_row(first + e, vocab);
    if (smooth && in) run.centered += ds;
    inside += in ? 1 : 0;
  }
  if (smooth) run.count += static_cast<C>(inside);
  return factor;
}

// Moves a teacher run onto new_max (>= its maximum); the student's factor at T (reverse_kl)
// is applied by the caller.
template <class C>
KDFAST_HD void rebase_teacher(TeacherRun<C>& run, C new_max, RunWeight weight, const rowmath::Coefficients<C>& k) {
  if (new_max == run.max) return;
  const C factor = run_factor(run.max, new_max, k.diff_scale, k.inv_scaled_t);
  run.sum *= factor;
  // An underflowed factor drops the old weighted terms with their exponentials (no 0 · inf).
  if (weight == RunWeight::Forward) run.weighted = factor > C(0) ? run.weighted * factor : C(0);
  run.max = new_max;
}

template <class C>
KDFAST_HD void apply_student_factor(TeacherRun<C>& run, C student_factor, RunWeight weight) {
  if (weight == RunWeight::Reverse && student_factor != C(1)) {
    run.weighted = student_factor > C(0) ? run.weighted * student_factor : C(0);
  }
}

// Adds one batch of a teacher row (t), with the student batch (s, es) and the factor
// add_student_batch returned for it.
template <int kE, class C, class ExpT>
KDFAST_HD void add_teacher_batch(TeacherRun<C>& run, const C* t, const C* s, const C* es, C student_factor,
                                 RunWeight weight, const rowmath::Coefficients<C>& k, const ExpT& exp_over_t) {
  C batch_max = rowmath::neg_inf<C>();
#pragma unroll
  for (int e = 0; e < kE; ++e) batch_max = run_max(batch_max, t[e]);
  rebase_teacher(run, run_max(run.max, batch_max), weight, k);
  apply_student_factor(run, student_factor, weight);
  const C h = k.diff_scale;
  const C shift = (run.max == rowmath::neg_inf<C>() ? C(0) : run.max) * h;
  C add_sum = C(0), add_weighted = C(0);
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const C et = exp_over_t(rowmath::scaled_difference(t[e], h, shift));
    add_sum += et;
    if (weight == RunWeight::Forward) add_weighted += et > C(0) ? et * (t[e] * h - s[e] * h) : C(0);
    if (weight == RunWeight::Reverse) add_weighted += es[e] > C(0) ? es[e] * (s[e] * h - t[e] * h) : C(0);
  }
  run.sum += add_sum;
  run.weighted += add_weighted;
}

// Moves a thread's teacher run onto the row's maxima (teacher: block_max; the student's
// factor at T: student_factor) before the runs are added.
template <class C>
KDFAST_HD void move_teacher_run(TeacherRun<C>& run, C block_max, C student_factor, RunWeight weight,
                                const rowmath::Coefficients<C>& k) {
  rebase_teacher(run, block_max, weight, k);
  apply_student_factor(run, student_factor, weight);
}

// D of one teacher (combine Sum) from the row's sums, in double: forward_kl Σ p (log p - log q),
// reverse_kl Σ q (log q - log p), with the gap h (s_max - t_max):
//   forward_kl  Σ p (dt - ds) = Σ p (-u) + gap,   reverse_kl  Σ q (ds - dt) = Σ q u - gap.
// aux = D / κ for reverse_kl (rowmath::RowStats::aux), 0 for forward_kl.
template <class C>
KDFAST_HD double one_pass_divergence(RunWeight weight, C weighted, C teacher_sum, C student_sum_t, C student_max,
                                     C teacher_max, C log_sum_q, C log_sum_p, const rowmath::Coefficients<C>& k,
                                     C& aux) {
  const double h = static_cast<double>(k.diff_scale);
  const double gap = static_cast<double>(student_max) * h - static_cast<double>(teacher_max) * h;
  const double lq = static_cast<double>(log_sum_q), lp = static_cast<double>(log_sum_p);
  aux = C(0);
  if (weight == RunWeight::Forward) {
    const double mean = static_cast<double>(weighted) / static_cast<double>(teacher_sum) + gap;
    return mean * k.inv_scaled_t_d - lp + lq;
  }
  const double mean = static_cast<double>(weighted) / static_cast<double>(student_sum_t) - gap;
  aux = static_cast<C>(mean + (lp - lq) / k.inv_scaled_t_d);
  return mean * k.inv_scaled_t_d - lq + lp;
}

// reverse_kl, combine Sum: the mean of u under q rebuilt in double from the saved statistics,
// mean_u = aux + h (s_max - t_max) - (log Z_p - log Z_q) / κ, as hi + lo in the compute type,
// so that the backward's bracket (u_i - hi) - lo cancels between numbers rounded as the
// forward's.
template <class C>
KDFAST_HD void reverse_kl_mean_u(C aux, C student_max, C teacher_max, C teacher_log_sum, C student_log_sum,
                                 const rowmath::Coefficients<C>& k, C& hi, C& lo) {
  const double h = static_cast<double>(k.diff_scale);
  const double mean_u = static_cast<double>(aux) +
                        (static_cast<double>(student_max) * h - static_cast<double>(teacher_max) * h) -
                        (static_cast<double>(teacher_log_sum) - static_cast<double>(student_log_sum)) /
                            k.inv_scaled_t_d;
  hi = static_cast<C>(mean_u);
  lo = static_cast<C>(mean_u - static_cast<double>(hi));
}

}  // namespace cuda
}  // namespace kdfast
