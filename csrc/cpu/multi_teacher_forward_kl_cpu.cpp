// CPU kernel of the multi-teacher KD loss's forward pass with divergence forward_kl, both
// combine modes: multi_teacher_forward_kl (declared in multi_teacher_common.h), which
// multi_teacher_forward in multi_teacher_cpu.cpp calls for that divergence; also this
// variant's scaled_exp test hook (the exp lanes these passes use). Compiled once per
// instruction-set variant (namespace kdfast::cpu::KDFAST_CPU_VARIANT); dispatch.cpp picks one
// at run time. Contract: types.h (MultiTeacherKDArgs): the loss, valid_rows and row_stats of
// the chunked forward pass in multi_teacher_cpu.cpp (per-teacher aux columns zero), the
// number of rows with a label outside [0, vocab) that is not ignore_index as the result, and,
// when args.grad_student is set, the student gradient for grad_output = 1 in the compute
// dtype, so that no backward pass is needed. Rows are split over OpenMP threads in contiguous
// blocks; each thread keeps six whole-row buffers in the compute type.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "convert.h"
#include "exp_lanes.h"
#include "kernel_common.h"
#include "multi_teacher_common.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using rowmath::Coefficients;

namespace {

// ---- forward_kl: loss and (optionally) the gradient in one pass per input row ----
//
// forward_kl needs only sums of exponentials and, for the gradient, q - p̄ with
// p̄ = Σ_m w_m p_m (combine Sum and Mixture alike). Per row, with whole-row buffers in the
// compute type (es: exp((s - s_max)/T), mixture: p̄, scratch: one teacher's exponentials):
//   1. student: a max pass, then one exp pass filling es (and the sums for CE);
//   2. each teacher: an exp pass giving Z_m = Σ e and A_m = Σ e (t - t_max) into a scratch
//      row; the same sweep adds the previous teacher's (w / Z) e to p̄ and takes the
//      maximum of the next teacher's row, which is that row's one read from memory
//      (float32 / float64 teachers; converted ones take a separate max pass);
//   3. one pass over the row adds the last teacher to p̄ and gives the gradient (when asked
//      for) and B = Σ p̄ (s - s_max) (Mixture: also Σ p̄ log p̄).
// Logits enter as scaled differences d = h x - h max (rowmath.h, difference_scale; κ = 1/(hT)),
// so A and B are in h units. With Σ_i p_mi log p_mi = κ A_m / Z_m - log Z_m and
// Σ_i p̄_i log q_i = κ B - log Z_s:
//   Sum:     D = Σ_m w_m (κ A_m / Z_m - log Z_m) - κ B + log Z_s
//   Mixture: D = Σ_i p̄_i log p̄_i - κ B + log Z_s,
// formed in double per row.
// Each teacher row is read from memory once and exponentiated once; the student row is
// exponentiated once (twice with CE at a temperature other than 1, 2, 4). The gradient is
// written for grad_output = 1 (reductions applied) into args.grad_student, a contiguous
// [rows, vocab] buffer in the compute type; the caller scales it by grad_output.
// The exp passes (1, 2) are written once over lanes (lanes.h, exp_lanes.h): 8 float lanes with AVX2 and
// a table-based exp(x/T), plain float / double elsewhere. Being bound by their exps (and
// not by memory: the rows stream at a fraction of the bandwidth), they are where the time
// goes; see exp_scalar.h for the exp and the note before student_exp_row for its cutoff test.

// The row sums of the passes below add up by blocks of kSumBlock elements (lanes.h, RowSums).

template <class C>
C row_max(const C* x, int64_t n) {
  C m = kNegInf<C>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The exp passes below run twice only when needed: float rows on AVX2 lanes first try the
// exp without its cutoff test (and the teacher pass without clamping -inf differences),
// tracking the row's smallest difference; where that is below the cutoff (a masked -inf
// logit, or a spread beyond 87 T) the exps and sums are redone with the tests. Rows in range
// give bitwise the same result either way.

// Student exp pass, with ds_i = h s_i - shift (shift = h max): es[i] = exp(ds_i κ); sums of es,
// of exp(ds_i / h) and of ds_i.
// NEXT: also the maximum of the next row to process (`next`, a teacher row), so its first
// read from memory overlaps this pass's arithmetic. exp_t, exp_1: exp(x/T) and exp(x).
// Returns false when CHECKED is false and some s_i - shift is below a cutoff. FOLD: exp(x/T)
// with the folded polynomial (exp_scalar.h, where exp_t is foldable; the unchecked pass only).
template <class C, int S1, bool SMOOTH, bool NEXT, bool CHECKED, bool FOLD>
bool student_exp_row(const C* s, int64_t n, C h, C shift, const ExpLanes<C>& exp_t_in, const ExpLanes<C>& exp_1_in,
                     C* es, C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  // Local copies: stores through es cannot alias them, so the constants stay in registers.
  const ExpLanes<C> exp_t = exp_t_in, exp_1 = exp_1_in;
  RowSums<C, 3> row;
  row.sweep(n, [&](auto& acc, auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto ds = fma_(L::load(s + i), L::splat(h), L::splat(-shift));
    const auto e = exp_t.template apply<CHECKED, FOLD>(ds);
    store(es + i, e);
    sums[0] = sums[0] + e;
    if constexpr (S1 == rowmath::kStudent1Exp) sums[1] = sums[1] + exp_1.template apply<CHECKED>(ds);
    if constexpr (S1 == 2 || S1 == 4) sums[1] = sums[1] + rowmath::integer_power<S1>(e);
    if constexpr (SMOOTH) sums[2] = sums[2] + ds;
    if constexpr (NEXT) acc.max(lane) = max_(acc.max(lane), L::load(next + i));
    if constexpr (!CHECKED) acc.min(lane) = min_(acc.min(lane), ds);
  });
  sum_t = row.total(0);
  sum_1 = row.total(1);
  centered = row.total(2);
  if constexpr (NEXT) next_max = row.maximum;
  if constexpr (CHECKED) return true;
  const C low = row.minimum;
  return low >= exp_t_in.scalar_cutoff() && (S1 != rowmath::kStudent1Exp || low >= exp_1_in.scalar_cutoff());
}

template <class C, int S1, bool SMOOTH, bool CHECKED, bool FOLD>
bool student_exp_row_dispatch(const C* s, int64_t n, C h, C shift, const ExpLanes<C>& exp_t, const ExpLanes<C>& exp_1,
                              C* es, C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  if (next != nullptr)
    return student_exp_row<C, S1, SMOOTH, true, CHECKED, FOLD>(s, n, h, shift, exp_t, exp_1, es, sum_t, sum_1,
                                                               centered, next, next_max);
  return student_exp_row<C, S1, SMOOTH, false, CHECKED, FOLD>(s, n, h, shift, exp_t, exp_1, es, sum_t, sum_1,
                                                              centered, next, next_max);
}

template <class C, int S1, bool SMOOTH>
void student_exp_row_for(const C* s, int64_t n, C h, C shift, const ExpLanes<C>& exp_t, const ExpLanes<C>& exp_1,
                         C* es, C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  next_max = kNegInf<C>;
  if constexpr (kTryWithoutCutoff<C>) {
    const bool done = exp_t.foldable()
                          ? student_exp_row_dispatch<C, S1, SMOOTH, false, true>(s, n, h, shift, exp_t, exp_1, es,
                                                                                 sum_t, sum_1, centered, next, next_max)
                          : student_exp_row_dispatch<C, S1, SMOOTH, false, false>(s, n, h, shift, exp_t, exp_1, es,
                                                                                  sum_t, sum_1, centered, next, next_max);
    if (done) return;
    // next_max is already known: only the exps and sums are redone.
    student_exp_row<C, S1, SMOOTH, false, true, false>(s, n, h, shift, exp_t, exp_1, es, sum_t, sum_1, centered,
                                                       nullptr, next_max);
    return;
  }
  student_exp_row_dispatch<C, S1, SMOOTH, true, false>(s, n, h, shift, exp_t, exp_1, es, sum_t, sum_1, centered, next,
                                                       next_max);
}

// Teacher exp pass, with dt_i = h t_i - shift: scratch[i] = exp(dt_i κ); returns Z = Σ e and
// A = Σ e dt_i.
// Fused into the same sweep: NEXT, the maximum of the next teacher row (its read from memory
// overlaps the arithmetic); PREV, mixture (+)= prev_c * prev (the previous teacher's
// exponentials, = when FIRST).
// SUM: also A (combine Sum needs it; Mixture does not). Returns false when CHECKED is false
// and some t_i - shift is below the cutoff. FOLD as in student_exp_row.
template <class C, bool SUM, bool NEXT, bool PREV, bool FIRST, bool CHECKED, bool FOLD>
bool teacher_exp_row(const C* t, int64_t n, C h, C shift, const ExpLanes<C>& exp_t_in, C* scratch, C& z_out,
                     C& a_out, const C* next, C& next_max, const C* prev, C prev_c, C* mixture) {
  // A -inf logit has e = 0: its dt is clamped to the lowest finite value so that e * dt = 0.
  constexpr C kLowest = std::numeric_limits<C>::lowest();
  const ExpLanes<C> exp_t = exp_t_in;  // a local copy, as in student_exp_row
  RowSums<C, 2> row;
  row.sweep(n, [&](auto& acc, auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto dt = fma_(L::load(t + i), L::splat(h), L::splat(-shift));
    const auto e = exp_t.template apply<CHECKED, FOLD>(dt);
    store(scratch + i, e);
    sums[0] = sums[0] + e;
    if constexpr (SUM && CHECKED) sums[1] = fma_(e, max_(dt, L::splat(kLowest)), sums[1]);
    if constexpr (SUM && !CHECKED) sums[1] = fma_(e, dt, sums[1]);
    if constexpr (!CHECKED) acc.min(lane) = min_(acc.min(lane), dt);
    if constexpr (NEXT) acc.max(lane) = max_(acc.max(lane), L::load(next + i));
    if constexpr (PREV) {
      const auto add = L::splat(prev_c) * L::load(prev + i);
      if constexpr (FIRST) store(mixture + i, add);
      else store(mixture + i, L::load(mixture + i) + add);
    }
  });
  z_out = row.total(0);
  a_out = row.total(1);
  if constexpr (NEXT) next_max = row.maximum;
  if constexpr (CHECKED) return true;
  return row.minimum >= exp_t_in.scalar_cutoff();
}

template <class C, bool SUM, bool CHECKED, bool FOLD>
bool teacher_exp_row_dispatch(const C* t, int64_t n, C h, C shift, const ExpLanes<C>& exp_t, C* scratch, C& z, C& a,
                              const C* next, C& next_max, const C* prev, C prev_c, C* mixture, bool first) {
#define KDFAST_TEACHER_ROW(NEXT_, PREV_, FIRST_)                                                                        \
  teacher_exp_row<C, SUM, NEXT_, PREV_, FIRST_, CHECKED, FOLD>(t, n, h, shift, exp_t, scratch, z, a, next, next_max, \
                                                               prev, prev_c, mixture)
  if (next != nullptr) {
    if (prev == nullptr) return KDFAST_TEACHER_ROW(true, false, false);
    if (first) return KDFAST_TEACHER_ROW(true, true, true);
    return KDFAST_TEACHER_ROW(true, true, false);
  }
  if (prev == nullptr) return KDFAST_TEACHER_ROW(false, false, false);
  if (first) return KDFAST_TEACHER_ROW(false, true, true);
  return KDFAST_TEACHER_ROW(false, true, false);
#undef KDFAST_TEACHER_ROW
}

template <class C, bool SUM>
void teacher_exp_row_for(const C* t, int64_t n, C h, C shift, const ExpLanes<C>& exp_t, C* scratch, C& z, C& a,
                         const C* next, C& next_max, const C* prev, C prev_c, C* mixture, bool first) {
  next_max = kNegInf<C>;
  if constexpr (kTryWithoutCutoff<C>) {
    const bool done = exp_t.foldable()
                          ? teacher_exp_row_dispatch<C, SUM, false, true>(t, n, h, shift, exp_t, scratch, z, a, next,
                                                                          next_max, prev, prev_c, mixture, first)
                          : teacher_exp_row_dispatch<C, SUM, false, false>(t, n, h, shift, exp_t, scratch, z, a, next,
                                                                           next_max, prev, prev_c, mixture, first);
    if (done) return;
    // next_max and the mixture update are done: only the exps and sums are redone.
    C unused = 0;
    teacher_exp_row<C, SUM, false, false, false, true, false>(t, n, h, shift, exp_t, scratch, z, a, nullptr, unused,
                                                              nullptr, C(0), nullptr);
    return;
  }
  teacher_exp_row_dispatch<C, SUM, true, false>(t, n, h, shift, exp_t, scratch, z, a, next, next_max, prev, prev_c,
                                                mixture, first);
}

// Final pass: B = Σ p̄ ds (ds = h s - shift), H = Σ p̄ log p̄ (MIXTURE), and when GRAD the
// gradient out = kd (es/Z_s - p̄) + ce (r - smooth), r per the student_1 mode S1 (r = es/Z_s at T = 1).
// The mixture is p̄_i = mixture_scale * mixture[i] + last_c * last[i] (the last teacher's
// exponentials are added here, in the same sweep).
template <class C, bool GRAD, bool KD, bool CE, int S1, bool MIXTURE>
void final_row(const C* s, const C* es, const C* mixture, C mixture_scale, const C* last, C last_c, int64_t n,
               C scale, C shift, C inv_scale, C inv_zs, C log_sum_1, C r_scale, C kd, C ce, C smooth, C* out,
               double& b_out, double& h_out) {
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    C b = 0, h = 0;
#pragma omp simd reduction(+ : b, h)
    for (int64_t i = start; i < end; ++i) {
      const C pbar = KD ? mixture_scale * mixture[i] + last_c * last[i] : C(0);
      const C ds = rowmath::scaled_difference(s[i], scale, shift);
      if constexpr (KD) {
        b += pbar > C(0) ? pbar * ds : C(0);
        if constexpr (MIXTURE) h += pbar > C(0) ? pbar * rowmath::log_c(pbar) : C(0);
      }
      if constexpr (GRAD) {
        const C q = es[i] * inv_zs;
        C value = 0;
        if constexpr (KD) value += kd * (q - pbar);
        if constexpr (CE) {
          C r = q;
          if constexpr (S1 == rowmath::kStudent1Exp) r = rowmath::exp_c(ds * inv_scale - log_sum_1);
          if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(es[i]) * r_scale;
          value += ce * (r - smooth);
        }
        out[i] = value;
      }
    }
    b_out += static_cast<double>(b);
    h_out += static_cast<double>(h);
  }
}

// dst[0:n] = src[0:n], with non-temporal stores for float32 where dst is aligned: the
// gradient is written once and not read again here, so it need not be read into the cache
// first. The writing thread calls store_fence() before its writes are used.
template <class C>
void stream_store(const C* src, int64_t n, C* dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<C, float>) {
#if defined(__AVX__)
    if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0)
      for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#elif defined(__SSE2__)
    if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0)
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  }
  if (i < n) std::memcpy(dst + i, src + i, sizeof(C) * static_cast<size_t>(n - i));
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <class C, bool GRAD, bool KD, bool MIXTURE>
void final_row_for(int student_1_mode, bool ce, const C* s, const C* es, const C* mixture, C mixture_scale,
                   const C* last, C last_c, int64_t n, C scale, C shift, C inv_scale, C inv_zs, C log_sum_1, C r_scale,
                   C kd, C ce_factor, C smooth, C* out, double& b, double& h) {
#define KDFAST_FINAL_ROW(CE_, S1_)                                                                                 \
  final_row<C, GRAD, KD, CE_, S1_, MIXTURE>(s, es, mixture, mixture_scale, last, last_c, n, scale, shift, inv_scale, \
                                            inv_zs, log_sum_1, r_scale, kd, ce_factor, smooth, out, b, h)
  if (!ce) return KDFAST_FINAL_ROW(false, rowmath::kStudent1None);
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return KDFAST_FINAL_ROW(true, rowmath::kStudent1Exp);
    case 2: return KDFAST_FINAL_ROW(true, 2);
    case 4: return KDFAST_FINAL_ROW(true, 4);
    default: return KDFAST_FINAL_ROW(true, rowmath::kStudent1None);
  }
#undef KDFAST_FINAL_ROW
}

template <class S, class T, class C, Combine MODE>
int64_t forward_kl_impl(const MultiTeacherKDArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  C* row_stats = static_cast<C*>(args.row_stats);
  C* grad = static_cast<C*>(args.grad_student);
  const C h = k.diff_scale, inv_h = k.inv_diff_scale;
  const double kappa = k.inv_scaled_t_d;
  const bool smooth = k.need_ce && k.label_smoothing > C(0);
  constexpr bool kMixture = MODE == Combine::Mixture;
  constexpr bool kInPlace = std::is_same_v<T, C>;  // teachers read without conversion

  // The gradient's reduction scale needs the number of valid rows up front.
  int64_t valid = 0;
  for (int64_t row = 0; row < rows; ++row) valid += label_valid(args.labels, row, args.options.ignore_index) ? 1 : 0;
  double reduction_scale = 1.0;
  if (args.options.reduction == Reduction::Mean) reduction_scale = valid > 0 ? 1.0 / static_cast<double>(valid) : 0.0;
  else if (args.options.reduction == Reduction::BatchMean) reduction_scale = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  const rowmath::GradRow<C> factors = rowmath::make_grad_row(reduction_scale, k, rowmath::RowStats<C>{}, vocab);
  const C ce_factor = factors.ce_factor, kd_factor = factors.kd_factor, smooth_value = factors.smooth;
  const C label_step = factors.label_step;
  int64_t bad_labels = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab * (num_teachers + 1))) reduction(+ : bad_labels)
  {
    // Whole-row buffers: converted student and teacher rows (low-precision inputs), es, p̄, scratch.
    std::vector<C> buffers(static_cast<size_t>(vocab) * 6);
    C* student_buf = buffers.data();
    C* teacher_buf = student_buf + vocab;
    C* es = teacher_buf + vocab;
    C* mixture = es + vocab;
    C* scratch_pair[2] = {mixture + vocab, mixture + 2 * vocab};
    alignas(64) C grad_chunk[kChunk];
    const ExpLanes<C> exp_t(kappa), exp_1(1.0 / static_cast<double>(h));
    // Each thread takes one contiguous block of rows, so that a row's last teacher pass can
    // take the maximum of the next row's student logits on the way (carried_max).
#if defined(_OPENMP)
    const int64_t team = omp_get_num_threads(), member = omp_get_thread_num();
#else
    const int64_t team = 1, member = 0;
#endif
    const int64_t row_begin = rows * member / team, row_end = rows * (member + 1) / team;
    int64_t carried_row = -1;
    C carried_max = kNegInf<C>;

    for (int64_t row = row_begin; row < row_end; ++row) {
      C* stats_out = row_stats + row * stats_width;
      C* g_row = grad != nullptr ? grad + row * vocab : nullptr;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = C(0);
        if (g_row) std::fill(g_row, g_row + vocab, C(0));
        continue;
      }
      const int64_t label = args.labels ? args.labels[row] : -1;
      if (args.labels && (label < 0 || label >= vocab)) {
        ++bad_labels;
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = std::numeric_limits<C>::quiet_NaN();
        if (g_row) std::fill(g_row, g_row + vocab, std::numeric_limits<C>::quiet_NaN());
        continue;
      }
      const C* s = load_chunk<S, C>(student + row * args.student_row_stride, vocab, student_buf);
      const C max_s = carried_row == row ? carried_max : row_max(s, vocab);
      // A row whose entries are all -inf shifts by 0 instead (no inf - inf).
      const C shift_s = max_s == kNegInf<C> ? C(0) : max_s;
      const C scaled_shift_s = shift_s * h;
      auto teacher_row = [&](int64_t m) {
        return static_cast<const T*>(args.teachers[m]) + row * args.teacher_row_strides[m];
      };
      // Float32 / float64 teachers are read in place, so each pass can take the next
      // teacher's maximum on the way; converted teachers take theirs after conversion.
      const C* next = nullptr;
      if constexpr (kInPlace) next = k.need_kd ? reinterpret_cast<const C*>(teacher_row(0)) : nullptr;
      C next_max = kNegInf<C>;
      C sum_t = 0, sum_1 = 0, centered = 0;
      switch (k.need_ce ? k.student_1_mode : rowmath::kStudent1None) {
        case rowmath::kStudent1Exp:
          if (smooth) student_exp_row_for<C, rowmath::kStudent1Exp, true>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, rowmath::kStudent1Exp, false>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        case 2:
          if (smooth) student_exp_row_for<C, 2, true>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, 2, false>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        case 4:
          if (smooth) student_exp_row_for<C, 4, true>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, 4, false>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        default:
          if (smooth) student_exp_row_for<C, rowmath::kStudent1None, true>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, rowmath::kStudent1None, false>(s, vocab, h, scaled_shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
      }
      const C log_sum_t = rowmath::log_of_sum(sum_t);
      const C log_sum_1 = k.need_student_1 ? rowmath::log_of_sum(sum_1) : log_sum_t;

      double teacher_part = 0.0;  // Sum: Σ_m w_m (κ A_m / Z_m - log Z_m)
      bool defined = rowmath::student_sums_defined(sum_t, sum_1, k);  // NaN in, NaN out (rowmath.h)
      // The previous teacher's exponentials and factor w/Z, added to the mixture one pass later.
      const C* prev = nullptr;
      C prev_c = 0;
      bool mixture_empty = true;
      for (int64_t m = 0; m < num_teachers && k.need_kd; ++m) {
        const C* t;
        C max_t;
        if constexpr (kInPlace) {
          t = reinterpret_cast<const C*>(teacher_row(m));
          max_t = next_max;
          next = m + 1 < num_teachers ? reinterpret_cast<const C*>(teacher_row(m + 1)) : nullptr;
          if constexpr (std::is_same_v<S, C>) {  // the last pass looks at the next row's student
            if (next == nullptr && row + 1 < row_end) next = reinterpret_cast<const C*>(student + (row + 1) * args.student_row_stride);
          }
        } else {
          t = load_chunk<T, C>(teacher_row(m), vocab, teacher_buf);
          max_t = row_max(t, vocab);
        }
        const C shift_t = max_t == kNegInf<C> ? C(0) : max_t;
        C* scratch = scratch_pair[m % 2];
        C z = 0, a = 0;
        teacher_exp_row_for<C, !kMixture>(t, vocab, h, shift_t * h, exp_t, scratch, z, a, next, next_max, prev, prev_c,
                                          mixture, mixture_empty);
        if (kInPlace && std::is_same_v<S, C> && m + 1 == num_teachers && next != nullptr) {
          carried_row = row + 1;
          carried_max = next_max;
        }
        if (prev != nullptr) mixture_empty = false;
        const C w = weight_of<C>(args, m, row);
        const C log_z = rowmath::log_of_sum(z);
        prev = scratch;
        prev_c = w / z;
        defined = defined && rowmath::sum_defined(z);  // every teacher counts, whatever its weight
        if (!kMixture && w > C(0)) {
          teacher_part += static_cast<double>(w) * (static_cast<double>(a) / static_cast<double>(z) * kappa -
                                                    static_cast<double>(log_z));
        }
        C* teacher_out = stats_out + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
        teacher_out[0] = shift_t;
        teacher_out[1] = log_z;
        teacher_out[2] = C(0);
      }
      if (!k.need_kd) {
        for (int64_t j = kMultiTeacherRowStatsBase; j < stats_width; ++j) stats_out[j] = C(0);
      }
      // p̄ = mixture (unless empty) + prev_c * prev, formed in the final pass.
      const C mixture_scale = mixture_empty ? C(0) : C(1);
      const C* mixture_in = mixture_empty ? (prev != nullptr ? prev : es) : mixture;
      const C* last = prev != nullptr ? prev : es;

      const C inv_zs = C(1) / sum_t;
      const C r_scale = k.student_1_mode == 2 || k.student_1_mode == 4
                            ? static_cast<C>(std::exp(-static_cast<double>(log_sum_1)))
                            : C(0);
      double b = 0.0, entropy = 0.0;  // Σ p̄ ds and Σ p̄ log p̄, added up in blocks (kSumBlock)
      C* out = g_row;
      const int mode = k.student_1_mode;
      if (out != nullptr) {
        // Chunk by chunk through an L1 buffer, then streamed to the gradient row.
        for (int64_t start = 0; start < vocab; start += kChunk) {
          const int64_t n = std::min(kChunk, vocab - start);
          if (k.need_kd) final_row_for<C, true, true, kMixture>(mode, k.need_ce, s + start, es + start, mixture_in + start, mixture_scale, last + start, prev_c, n, h, scaled_shift_s, inv_h, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, grad_chunk, b, entropy);
          else final_row_for<C, true, false, kMixture>(mode, k.need_ce, s + start, es + start, mixture_in + start, mixture_scale, last + start, prev_c, n, h, scaled_shift_s, inv_h, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, grad_chunk, b, entropy);
          if (k.need_ce && label >= start && label < start + n) grad_chunk[label - start] -= label_step;
          stream_store(grad_chunk, n, out + start);
        }
      } else if (k.need_kd) {
        final_row_for<C, false, true, kMixture>(mode, false, s, es, mixture_in, mixture_scale, last, prev_c, vocab, h, scaled_shift_s, inv_h, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, out, b, entropy);
      }

      double divergence = 0.0;
      if (k.need_kd) {
        const double cross = static_cast<double>(b) * kappa - static_cast<double>(log_sum_t);  // Σ p̄ log q
        divergence = (kMixture ? static_cast<double>(entropy) : teacher_part) - cross;
      }
      double ce = 0.0;
      if (k.need_ce) {
        ce = rowmath::cross_entropy(static_cast<double>(s[label]) - static_cast<double>(shift_s),
                                    static_cast<double>(log_sum_1), static_cast<double>(centered) / static_cast<double>(h),
                                    vocab, k.label_smoothing_d);
      }
      const double row_loss = defined ? rowmath::combine_loss(ce, divergence, k) : kNaN<double>;
      if (!defined && g_row != nullptr) std::fill(g_row, g_row + vocab, kNaN<C>);  // NaN loss: NaN gradient
      stats_out[0] = shift_s;
      stats_out[1] = log_sum_t;
      stats_out[2] = log_sum_1;
      stats_out[3] = C(0);
      stats_out[4] = static_cast<C>(row_loss);
      stats_out[5] = C(0);
    }
    store_fence();  // the streamed gradient rows are complete before the team's barrier
  }

  reduce_row_losses(row_stats, stats_width, 4, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
}

// ---- combine / dtype dispatch ----

template <class S, class T>
int64_t forward_kl_for(const MultiTeacherKDArgs& args) {
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  if (args.combine == Combine::Mixture) return forward_kl_impl<S, T, C, Combine::Mixture>(args);
  return forward_kl_impl<S, T, C, Combine::Sum>(args);
}

}  // namespace

// Test hook: exp(x / T) over n floats on this variant's lanes (ScaledExp, as the kernels use
// it: with the folded coefficients where they are foldable); cutoff = false is the form without
// the cutoff test, exact for x >= -87 T.
void scaled_exp(const float* x, int64_t n, float inv_t, bool cutoff, float* out) {
  const ExpLanes<float> exp(inv_t);
  const bool fold = exp.foldable();
  sweep_lanes<float>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto v = L::load(x + i);
    if (fold) store(out + i, cutoff ? exp.template apply<true, true>(v) : exp.template apply<false, true>(v));
    else store(out + i, cutoff ? exp.template apply<true, false>(v) : exp.template apply<false, false>(v));
  });
}

int64_t multi_teacher_forward_kl(const MultiTeacherKDArgs& args) {
  if (args.student_dtype == DType::Float64) return forward_kl_for<double, double>(args);
  return with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    return forward_kl_for<decltype(s), decltype(t)>(args);
  });
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
