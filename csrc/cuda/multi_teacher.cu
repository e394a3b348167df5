// CUDA kernels of the multi-teacher KD loss (forward statistics + loss, backward gradient).
// Contract: types.h (MultiTeacherKDArgs, the row_stats layout shared with the CPU kernel) and
// rowmath.h (the per-element math, shared with the CPU kernels). One block of kThreads
// threads per row (rows strided over the grid); up to kCudaMaxTeachers (types.h) teachers,
// whose addresses and row strides travel by value in the kernel parameters (the core
// allocates no device memory). Forward, per row: the student's maximum and sums, each
// teacher's maximum and log-sum, then one sweep per teacher (combine Sum) or one sweep over
// all teachers (Mixture: p̄_i = Σ_m w_m p_mi) for the divergence; a second single-block
// kernel reduces the row losses in a fixed order (deterministic). Backward, per row: one
// sweep that reads the student element and the M teacher elements and writes the gradient,
// multiplied by grad_output (read on the device, with the valid-row count for "mean"). Rows
// with a label outside [0, vocab) that is not ignore_index get NaN statistics, loss and
// gradient (no device-to-host synchronisation to report them). Elements are loaded one at a
// time (coalesced across the block); the dense kernels' vectorised streaming is not used here.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kReduceThreads = 1024;

struct TeacherTable {
  const void* rows[kCudaMaxTeachers];
  int64_t row_strides[kCudaMaxTeachers];
};

struct MultiParams {
  const void* student;
  int64_t student_row_stride;
  TeacherTable teachers;
  int num_teachers;
  const void* weights;
  int64_t weight_teacher_stride;
  int64_t weight_row_stride;
  const int64_t* labels;
  int64_t rows;
  int vocab;
  int64_t ignore_index;
  bool mixture;
  Divergence divergence;
  Reduction reduction;
  int64_t stats_width;
  void* loss;
  void* row_stats;
  // backward only
  const void* grad_output;
  int64_t grad_output_stride;
  const void* valid_rows;
  void* grad_student;
};

template <class X, class C>
__device__ __forceinline__ C load_value(const void* base, int64_t row_stride, int64_t row, int index) {
  return X::to_compute(load_element<X>(static_cast<const typename X::Raw*>(base) + row * row_stride + index));
}

template <int N, class C, class Op>
__device__ __forceinline__ void block_all_reduce(C (&values)[N], Op op) {
  __shared__ C scratch[kWarps][N];
  team_all_reduce(values, scratch, kThreads, op);
}

// Logits enter as scaled differences d = h x - h max (rowmath.h, difference_scale), with
// κ = 1/(hT) and 1/h the scales of their exponentials at T and at 1.

// D(p, q) terms of one element into acc0 / acc1, given the scaled differences of the two sides
// (dp: the teacher's, or the mixture's log-probability y in h units; dq: the student's) and
// the log-probabilities log p, log q. forward_kl / reverse_kl sum in h units, acc0 += p (dp - dq)
// (q (dq - dp)) and acc1 += p (q), so that no (dp - dq)/T is formed on its own: D follows in
// double from κ acc0 / acc1 and the log-sums (finish_divergence).
template <class C>
__device__ __forceinline__ void divergence_terms(Divergence d, C dp, C dq, C log_p, C log_q,
                                                 const rowmath::Coefficients<C>& k, C& acc0, C& acc1) {
  switch (d) {
    case Divergence::ForwardKL: {
      const C p = rowmath::exp_c(log_p);
      acc0 += p > C(0) ? p * (dp - dq) : C(0);
      acc1 += p;
      break;
    }
    case Divergence::ReverseKL: {
      const C q = rowmath::exp_c(log_q);
      acc0 += q > C(0) ? q * (dq - dp) : C(0);
      acc1 += q;
      break;
    }
    case Divergence::JSD: rowmath::jsd_terms(log_p, log_q, k, acc0, acc1); break;
    case Divergence::TVD: rowmath::tvd_terms(log_p, log_q, acc0, acc1); break;
  }
}

// D (double) and its aux value (rowmath::RowStats::aux) from the sweep sums; log_offset is
// log Z_q - log Z_p (forward_kl: the log p − log q offset; reverse_kl uses its negative).
template <class C>
__device__ __forceinline__ double finish_divergence(Divergence d, C acc0, C acc1, double log_offset,
                                                    const rowmath::Coefficients<C>& k, C& aux) {
  rowmath::RowStats<C> st{};
  st.aux = C(0);
  double value = 0.0;
  if (d == Divergence::ForwardKL || d == Divergence::ReverseKL) {
    const double mean = static_cast<double>(acc0) / static_cast<double>(acc1);
    const double offset = d == Divergence::ForwardKL ? log_offset : -log_offset;
    value = mean * k.inv_scaled_t_d + offset;
    if (d == Divergence::ReverseKL) st.aux = static_cast<C>(mean + offset / k.inv_scaled_t_d);  // D / κ
  }
  if (d == Divergence::JSD) value = static_cast<double>(rowmath::finish_jsd(acc0, acc1, k, st));
  if (d == Divergence::TVD) value = static_cast<double>(rowmath::finish_tvd(acc0, acc1, st));
  aux = st.aux;
  return value;
}

template <class C>
__device__ __forceinline__ C divergence_gradient(Divergence d, C log_p, C log_q, C q, C aux,
                                                 const rowmath::Coefficients<C>& k) {
  switch (d) {
    case Divergence::ForwardKL: return rowmath::divergence_grad<Divergence::ForwardKL>(log_p, log_q, q, aux, k);
    case Divergence::JSD: return rowmath::divergence_grad<Divergence::JSD>(log_p, log_q, q, aux, k);
    default: break;
  }
  return rowmath::divergence_grad<Divergence::TVD>(log_p, log_q, q, aux, k);
}

template <class C>
__device__ __forceinline__ C weight_of(const MultiParams& p, int m, int64_t row) {
  return static_cast<const C*>(p.weights)[m * p.weight_teacher_stride + row * p.weight_row_stride];
}

// The mixture's log-probability of element i in h units, y = log p̄_i / κ with
// p̄_i = Σ_m w_m p_mi: a log-sum-exp over the teachers of dt_mi + offset[m], offset[m] =
// (log w_m - log Z_m)/κ, so that a token every teacher gives a probability below the float
// range keeps its exact log p̄_i.
template <class TX, class C>
__device__ __forceinline__ C mixture_log_prob(const MultiParams& p, int64_t row, int i, const C* scaled_max,
                                              const C* offset, const rowmath::Coefficients<C>& k) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  C top = negative_infinity<C>(), sum = C(0);
  for (int m = 0; m < p.num_teachers; ++m) {
    const C x = load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i);
    const C y = rowmath::scaled_difference(x, h, scaled_max[m]) + offset[m];
    const C new_top = y > top ? y : top;
    const C shift = new_top == negative_infinity<C>() ? C(0) : new_top;
    sum = sum * rowmath::exp_c((top - shift) * kappa) + rowmath::exp_c((y - shift) * kappa);
    top = new_top;
  }
  return top + rowmath::log_c(sum) / kappa;
}

// (log w - log Z)/κ in h units; -inf for a zero weight.
template <class C>
__device__ __forceinline__ C mixture_offset(C weight, C log_sum, const rowmath::Coefficients<C>& k) {
  const double log_w = weight > C(0) ? ::log(static_cast<double>(weight)) : rowmath::neg_inf<double>();
  return static_cast<C>((log_w - static_cast<double>(log_sum)) / k.inv_scaled_t_d);
}

template <class SX, class TX, class C>
__global__ void __launch_bounds__(kThreads) multi_teacher_forward_kernel(MultiParams p, rowmath::Coefficients<C> k) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const bool smooth = k.need_ce && k.label_smoothing > C(0);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    C* stats = static_cast<C*>(p.row_stats) + row * p.stats_width;
    const bool valid = p.labels == nullptr || p.labels[row] != p.ignore_index;
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    if (!valid || (p.labels != nullptr && (label < 0 || label >= p.vocab))) {
      const C fill = valid ? quiet_nan<C>() : C(0);
      for (int64_t j = threadIdx.x; j < p.stats_width; j += kThreads) stats[j] = fill;
      if (p.reduction == Reduction::None && threadIdx.x == 0) static_cast<C*>(p.loss)[row] = fill;
      continue;  // uniform over the block: one row per block
    }
    // Student: maximum, then the sums relative to it (shifted by 0 when the maximum is -inf).
    C student_max[1] = {negative_infinity<C>()};
    for (int i = threadIdx.x; i < p.vocab; i += kThreads)
      student_max[0] = fmax(student_max[0], load_value<SX, C>(p.student, p.student_row_stride, row, i));
    block_all_reduce(student_max, MaxOp{});
    const C shift_s = student_max[0] == negative_infinity<C>() ? C(0) : student_max[0];
    const C scaled_shift_s = shift_s * h;
    C sums[3] = {C(0), C(0), C(0)};  // sum exp(ds κ), sum exp(ds / h), sum ds
    for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
      const C ds = rowmath::scaled_difference(load_value<SX, C>(p.student, p.student_row_stride, row, i), h,
                                              scaled_shift_s);
      sums[0] += rowmath::exp_c(ds * kappa);
      if (k.need_student_1) sums[1] += rowmath::exp_c(ds * inv_h);
      if (smooth) sums[2] += ds;
    }
    block_all_reduce(sums, SumOp{});
    const C log_sum_t = rowmath::log_of_sum(sums[0]);
    const C log_sum_1 = k.need_student_1 ? rowmath::log_of_sum(sums[1]) : log_sum_t;
    bool defined = rowmath::student_sums_defined(sums[0], sums[1], k);  // NaN in, NaN out (rowmath.h)

    double divergence = 0.0;
    C mixture_aux = C(0);
    C teacher_shift[kCudaMaxTeachers], teacher_log_sum[kCudaMaxTeachers], offset[kCudaMaxTeachers];
    if (k.need_kd) {
      for (int m = 0; m < p.num_teachers; ++m) {
        const void* t_base = p.teachers.rows[m];
        const int64_t t_stride = p.teachers.row_strides[m];
        C teacher_max[1] = {negative_infinity<C>()};
        for (int i = threadIdx.x; i < p.vocab; i += kThreads)
          teacher_max[0] = fmax(teacher_max[0], load_value<TX, C>(t_base, t_stride, row, i));
        block_all_reduce(teacher_max, MaxOp{});
        const C shift_t = teacher_max[0] == negative_infinity<C>() ? C(0) : teacher_max[0];
        C teacher_sum[1] = {C(0)};
        for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
          const C dt = rowmath::scaled_difference(load_value<TX, C>(t_base, t_stride, row, i), h, shift_t * h);
          teacher_sum[0] += rowmath::exp_c(dt * kappa);
        }
        block_all_reduce(teacher_sum, SumOp{});
        defined = defined && rowmath::sum_defined(teacher_sum[0]);  // every teacher counts, whatever its weight
        teacher_shift[m] = shift_t;
        teacher_log_sum[m] = rowmath::log_of_sum(teacher_sum[0]);
      }
      C scaled_shift[kCudaMaxTeachers];
      for (int m = 0; m < p.num_teachers; ++m) {
        scaled_shift[m] = teacher_shift[m] * h;
        offset[m] = mixture_offset(weight_of<C>(p, m, row), teacher_log_sum[m], k);
      }
      if (!p.mixture) {
        for (int m = 0; m < p.num_teachers; ++m) {
          C acc[2] = {C(0), C(0)};
          for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
            const C ds = rowmath::scaled_difference(load_value<SX, C>(p.student, p.student_row_stride, row, i), h,
                                                    scaled_shift_s);
            const C dt = rowmath::scaled_difference(
                load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i), h, scaled_shift[m]);
            divergence_terms(p.divergence, dt, ds, dt * kappa - teacher_log_sum[m], ds * kappa - log_sum_t, k, acc[0],
                             acc[1]);
          }
          block_all_reduce(acc, SumOp{});
          C aux = C(0);
          const double d_m = finish_divergence(p.divergence, acc[0], acc[1],
                                               static_cast<double>(log_sum_t) - static_cast<double>(teacher_log_sum[m]),
                                               k, aux);
          const C w = weight_of<C>(p, m, row);
          if (w > C(0)) divergence += static_cast<double>(w) * d_m;
          if (threadIdx.x == 0) stats[kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m + 2] = aux;
        }
      } else {
        C acc[2] = {C(0), C(0)};
        for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
          const C ds = rowmath::scaled_difference(load_value<SX, C>(p.student, p.student_row_stride, row, i), h,
                                                  scaled_shift_s);
          const C y = mixture_log_prob<TX, C>(p, row, i, scaled_shift, offset, k);
          divergence_terms(p.divergence, y, ds, y * kappa, ds * kappa - log_sum_t, k, acc[0], acc[1]);
        }
        block_all_reduce(acc, SumOp{});
        divergence = finish_divergence(p.divergence, acc[0], acc[1], static_cast<double>(log_sum_t), k, mixture_aux);
      }
    }
    if (threadIdx.x == 0) {
      double ce = 0.0;
      if (k.need_ce) {
        const double label_logit =
            static_cast<double>(load_value<SX, C>(p.student, p.student_row_stride, row, static_cast<int>(label))) -
            static_cast<double>(shift_s);
        ce = rowmath::cross_entropy(label_logit, static_cast<double>(log_sum_1),
                                    static_cast<double>(sums[2]) / static_cast<double>(h),
                                    static_cast<int64_t>(p.vocab), k.label_smoothing_d);
      }
      const C row_loss = defined ? static_cast<C>(rowmath::combine_loss(ce, divergence, k)) : quiet_nan<C>();
      stats[0] = shift_s;
      stats[1] = log_sum_t;
      stats[2] = log_sum_1;
      stats[3] = mixture_aux;
      stats[4] = row_loss;
      stats[5] = C(0);
      for (int m = 0; m < p.num_teachers; ++m) {
        C* teacher_out = stats + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
        teacher_out[0] = k.need_kd ? teacher_shift[m] : C(0);
        teacher_out[1] = k.need_kd ? teacher_log_sum[m] : C(0);
        if (!k.need_kd || p.mixture) teacher_out[2] = C(0);
      }
      if (p.reduction == Reduction::None) static_cast<C*>(p.loss)[row] = row_loss;
    }
  }
}

// One block: the scalar loss from row_stats[:, 4] (fixed order, double accumulator) and the
// number of valid rows; with reduction none only valid_rows is written.
template <class C>
__global__ void __launch_bounds__(kReduceThreads)
    multi_teacher_reduce_kernel(const C* row_stats, int64_t stats_width, const int64_t* labels, int64_t rows,
                                int64_t ignore_index, Reduction reduction, C* loss, C* valid_rows) {
  double values[2] = {0.0, 0.0};  // total, valid (exact below 2^53 rows)
  const bool want_total = reduction != Reduction::None;
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) {
    if (want_total) values[0] += static_cast<double>(row_stats[row * stats_width + 4]);
    values[1] += (labels == nullptr || labels[row] != ignore_index) ? 1.0 : 0.0;
  }
  __shared__ double scratch[kReduceThreads / 32][2];
  team_all_reduce(values, scratch, kReduceThreads, SumOp{});
  if (threadIdx.x != 0) return;
  if (want_total) {
    double value = values[0];
    if (reduction == Reduction::Mean) value = values[1] > 0.0 ? values[0] / values[1] : 0.0;
    if (reduction == Reduction::BatchMean) value = rows > 0 ? values[0] / static_cast<double>(rows) : 0.0;
    *loss = static_cast<C>(value);
  }
  *valid_rows = static_cast<C>(values[1]);
}

template <class SX, class TX, class C>
__global__ void __launch_bounds__(kThreads) multi_teacher_backward_kernel(MultiParams p, rowmath::Coefficients<C> k) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  using Raw = typename SX::Raw;
  double reduction_scale = 1.0;
  if (p.reduction == Reduction::Mean) {
    const double valid = static_cast<double>(*static_cast<const C*>(p.valid_rows));
    reduction_scale = valid > 0.0 ? 1.0 / valid : 0.0;
  } else if (p.reduction == Reduction::BatchMean) {
    reduction_scale = p.rows > 0 ? 1.0 / static_cast<double>(p.rows) : 0.0;
  }
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    Raw* g_row = static_cast<Raw*>(p.grad_student) + row * static_cast<int64_t>(p.vocab);
    const C* st = static_cast<const C*>(p.row_stats) + row * p.stats_width;
    const bool ignored = p.labels != nullptr && p.labels[row] == p.ignore_index;
    if (ignored || st[4] != st[4]) {  // ignored: zeros; a NaN row loss (NaN input, bad label): NaN
      const C fill = ignored ? C(0) : quiet_nan<C>();
      for (int i = threadIdx.x; i < p.vocab; i += kThreads) g_row[i] = SX::from_compute(fill);
      continue;
    }
    const double g =
        static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) * reduction_scale;
    const C shift_s = st[0] * h, log_sum_t = st[1], log_sum_1 = st[2], mixture_aux = st[3];
    // The row's factors: for the mixture (teacher log-sum 0: y is a log-probability) and per
    // teacher (combine Sum: its weight folded in).
    const rowmath::GradRow<C> factors =
        rowmath::make_grad_row(g, k, rowmath::RowStats<C>{C(0), C(0), st[0], log_sum_t, log_sum_1, mixture_aux},
                               static_cast<int64_t>(p.vocab));
    C scaled_shift[kCudaMaxTeachers], offset[kCudaMaxTeachers], kd_w[kCudaMaxTeachers], rkl_a[kCudaMaxTeachers],
        rkl_b[kCudaMaxTeachers], rkl_c[kCudaMaxTeachers];
    for (int m = 0; m < p.num_teachers && k.need_kd; ++m) {
      const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
      const C w = weight_of<C>(p, m, row);
      const rowmath::GradRow<C> teacher = rowmath::make_grad_row(
          g * static_cast<double>(w), k, rowmath::RowStats<C>{ts[0], ts[1], st[0], log_sum_t, log_sum_1, ts[2]},
          static_cast<int64_t>(p.vocab));
      scaled_shift[m] = ts[0] * h;
      offset[m] = mixture_offset(w, ts[1], k);
      kd_w[m] = teacher.kd_factor;
      rkl_a[m] = teacher.rkl_a;
      rkl_b[m] = teacher.rkl_b;
      rkl_c[m] = teacher.rkl_c;
    }
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
      const C ds = rowmath::scaled_difference(load_value<SX, C>(p.student, p.student_row_stride, row, i), h, shift_s);
      const C log_q = ds * kappa - log_sum_t;
      const C q = rowmath::exp_c(log_q);
      C value = C(0);
      if (k.need_ce) {
        const C r = k.need_student_1 ? rowmath::exp_c(ds * inv_h - log_sum_1) : q;
        value += factors.ce_factor * (r - factors.smooth);
        if (i == label) value -= factors.label_step;
      }
      if (k.need_kd) {
        if (p.divergence == Divergence::ForwardKL) {
          // Sum and mixture alike: kd_factor (q - Σ_m w_m p_m).
          C teacher_part = C(0);
          for (int m = 0; m < p.num_teachers; ++m) {
            const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
            const C dt = rowmath::scaled_difference(
                load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i), h, scaled_shift[m]);
            teacher_part += kd_w[m] * rowmath::exp_c(dt * kappa - ts[1]);
          }
          value += factors.kd_factor * q - teacher_part;  // the weights sum to 1
        } else if (p.mixture) {
          const C y = mixture_log_prob<TX, C>(p, row, i, scaled_shift, offset, k);
          if (p.divergence == Divergence::ReverseKL) {
            value += rowmath::reverse_kl_grad(ds, y, q, factors.rkl_a, factors.rkl_b, factors.rkl_c);
          } else {
            value += factors.kd_factor * divergence_gradient(p.divergence, y * kappa, log_q, q, mixture_aux, k);
          }
        } else {
          for (int m = 0; m < p.num_teachers; ++m) {
            if (!(kd_w[m] != C(0))) continue;  // a zero weight: no gradient (and no 0 · inf)
            const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
            const C dt = rowmath::scaled_difference(
                load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i), h, scaled_shift[m]);
            if (p.divergence == Divergence::ReverseKL) {
              value += rowmath::reverse_kl_grad(ds, dt, q, rkl_a[m], rkl_b[m], rkl_c[m]);
            } else {
              value += kd_w[m] * divergence_gradient(p.divergence, dt * kappa - ts[1], log_q, q, ts[2], k);
            }
          }
        }
      }
      g_row[i] = SX::from_compute(value);
    }
  }
}

template <class C>
MultiParams make_params(const MultiTeacherKDArgs& args) {
  if (args.num_teachers < 1 || args.num_teachers > kCudaMaxTeachers) {
    throw std::invalid_argument("multi_teacher_kd CUDA: between 1 and " + std::to_string(kCudaMaxTeachers) +
                                " teachers are supported, got " + std::to_string(args.num_teachers));
  }
  MultiParams p{};
  p.student = args.student;
  p.student_row_stride = args.student_row_stride;
  for (int64_t m = 0; m < args.num_teachers; ++m) {
    p.teachers.rows[m] = args.teachers[m];
    p.teachers.row_strides[m] = args.teacher_row_strides[m];
  }
  p.num_teachers = static_cast<int>(args.num_teachers);
  p.weights = args.weights;
  p.weight_teacher_stride = args.weight_teacher_stride;
  p.weight_row_stride = args.weight_row_stride;
  p.labels = args.labels;
  p.rows = args.rows;
  p.vocab = static_cast<int>(args.vocab);
  p.ignore_index = args.options.ignore_index;
  p.mixture = args.combine == Combine::Mixture;
  p.divergence = args.options.divergence;
  p.reduction = args.options.reduction;
  p.stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * args.num_teachers;
  p.loss = args.loss;
  p.row_stats = args.row_stats;
  p.grad_output = args.grad_output;
  p.grad_output_stride = args.grad_output_stride;
  p.valid_rows = args.valid_rows;
  p.grad_student = args.grad_student;
  return p;
}

unsigned grid_for(int64_t rows) {
  const int64_t limit = static_cast<int64_t>(multiprocessor_count()) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, limit)));
}

template <class SX, class TX, class C>
void forward_typed(const MultiTeacherKDArgs& args, cudaStream_t stream) {
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const MultiParams p = make_params<C>(args);
  if (args.rows > 0) {
    multi_teacher_forward_kernel<SX, TX, C><<<grid_for(args.rows), kThreads, 0, stream>>>(p, k);
    check_launch("multi_teacher_forward_kernel");
  }
  multi_teacher_reduce_kernel<C><<<1, kReduceThreads, 0, stream>>>(
      static_cast<const C*>(args.row_stats), p.stats_width, args.labels, args.rows, args.options.ignore_index,
      args.options.reduction, static_cast<C*>(args.loss), static_cast<C*>(args.valid_rows));
  check_launch("multi_teacher_reduce_kernel");
}

template <class SX, class TX, class C>
void backward_typed(const MultiTeacherKDArgs& args, cudaStream_t stream) {
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const MultiParams p = make_params<C>(args);
  if (args.rows == 0) return;
  multi_teacher_backward_kernel<SX, TX, C><<<grid_for(args.rows), kThreads, 0, stream>>>(p, k);
  check_launch("multi_teacher_backward_kernel");
}

// Calls fn(student storage, teacher storage, compute type) for the args' dtypes.
template <class Fn>
void with_storage(const MultiTeacherKDArgs& args, const char* function, Fn&& fn) {
  auto with_teacher = [&](auto student_tag) {
    switch (args.teacher_dtype) {
      case DType::Float32: return fn(student_tag, Float32Storage{}, float{});
      case DType::BFloat16: return fn(student_tag, BFloat16Storage{}, float{});
      case DType::Float16: return fn(student_tag, Float16Storage{}, float{});
      default: break;
    }
    throw std::invalid_argument(std::string(function) + ": unsupported teacher dtype code " +
                                std::to_string(static_cast<int>(args.teacher_dtype)));
  };
  switch (args.student_dtype) {
    case DType::Float64:
      if (args.teacher_dtype != DType::Float64)
        throw std::invalid_argument(std::string(function) + ": float64 student logits need float64 teachers");
      return fn(Float64Storage{}, Float64Storage{}, double{});
    case DType::Float32: return with_teacher(Float32Storage{});
    case DType::BFloat16: return with_teacher(BFloat16Storage{});
    case DType::Float16: return with_teacher(Float16Storage{});
    default: break;
  }
  throw std::invalid_argument(std::string(function) + ": unsupported student dtype code " +
                              std::to_string(static_cast<int>(args.student_dtype)));
}

}  // namespace
}  // namespace cuda

int64_t multi_teacher_forward_cuda(const MultiTeacherKDArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "multi_teacher_forward_cuda");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cuda::with_storage(args, "multi_teacher_forward_cuda", [&](auto s, auto t, auto c) {
    cuda::forward_typed<decltype(s), decltype(t), decltype(c)>(args, stream);
  });
  return 0;  // out-of-range labels give NaN rows, not a count (see the file comment)
}

void multi_teacher_backward_cuda(const MultiTeacherKDArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "multi_teacher_backward_cuda");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cuda::with_storage(args, "multi_teacher_backward_cuda", [&](auto s, auto t, auto c) {
    cuda::backward_typed<decltype(s), decltype(t), decltype(c)>(args, stream);
  });
}

}  // namespace kdfast
