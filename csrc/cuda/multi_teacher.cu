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

// D(p, q) terms of one element given log p and log q (as the CPU sweep), into acc0 / acc1.
template <class C>
__device__ __forceinline__ void divergence_terms(Divergence d, C log_p, C log_q, const rowmath::Coefficients<C>& k, C& acc0,
                                                 C& acc1) {
  switch (d) {
    case Divergence::ForwardKL: {
      const C p = rowmath::exp_c(log_p);
      acc0 += p > C(0) ? p * (log_p - log_q) : C(0);
      break;
    }
    case Divergence::ReverseKL: {
      const C q = rowmath::exp_c(log_q);
      acc0 += q > C(0) ? q * (log_q - log_p) : C(0);
      break;
    }
    case Divergence::JSD: rowmath::jsd_terms(log_p, log_q, k, acc0, acc1); break;
    case Divergence::TVD: rowmath::tvd_terms(log_p, log_q, acc0, acc1); break;
  }
}

// D and its aux value (rowmath::RowStats::aux) from the sweep sums.
template <class C>
__device__ __forceinline__ C finish_divergence(Divergence d, C acc0, C acc1, const rowmath::Coefficients<C>& k, C& aux) {
  rowmath::RowStats<C> st{};
  C value = acc0;
  st.aux = C(0);
  if (d == Divergence::ReverseKL) st.aux = acc0;
  if (d == Divergence::JSD) value = rowmath::finish_jsd(acc0, acc1, k, st);
  if (d == Divergence::TVD) value = rowmath::finish_tvd(acc0, acc1, st);
  aux = st.aux;
  return value;
}

template <class C>
__device__ __forceinline__ C divergence_gradient(Divergence d, C log_p, C log_q, C q, C aux,
                                                 const rowmath::Coefficients<C>& k) {
  switch (d) {
    case Divergence::ForwardKL: return rowmath::divergence_grad<Divergence::ForwardKL>(log_p, log_q, q, aux, k);
    case Divergence::ReverseKL: return rowmath::divergence_grad<Divergence::ReverseKL>(log_p, log_q, q, aux, k);
    case Divergence::JSD: return rowmath::divergence_grad<Divergence::JSD>(log_p, log_q, q, aux, k);
    case Divergence::TVD: break;
  }
  return rowmath::divergence_grad<Divergence::TVD>(log_p, log_q, q, aux, k);
}

template <class C>
__device__ __forceinline__ C weight_of(const MultiParams& p, int m, int64_t row) {
  return static_cast<const C*>(p.weights)[m * p.weight_teacher_stride + row * p.weight_row_stride];
}

template <class SX, class TX, class C>
__global__ void __launch_bounds__(kThreads) multi_teacher_forward_kernel(MultiParams p, rowmath::Coefficients<C> k) {
  const C inv_t = k.inv_temperature;
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
    // Student: maximum, then the sums relative to it.
    C student_max[1] = {negative_infinity<C>()};
    for (int i = threadIdx.x; i < p.vocab; i += kThreads)
      student_max[0] = fmax(student_max[0], load_value<SX, C>(p.student, p.student_row_stride, row, i));
    block_all_reduce(student_max, MaxOp{});
    const C shift_s = student_max[0] == negative_infinity<C>() ? C(0) : student_max[0];
    C sums[3] = {C(0), C(0), C(0)};  // sum exp(ds/T), sum exp(ds), sum ds
    for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
      const C ds = load_value<SX, C>(p.student, p.student_row_stride, row, i) - shift_s;
      sums[0] += rowmath::exp_c(ds * inv_t);
      if (k.need_student_1) sums[1] += rowmath::exp_c(ds);
      if (smooth) sums[2] += ds;
    }
    block_all_reduce(sums, SumOp{});
    const C log_sum_t = rowmath::log_of_sum(sums[0]);
    const C log_sum_1 = k.need_student_1 ? rowmath::log_of_sum(sums[1]) : log_sum_t;

    C divergence = C(0), mixture_aux = C(0);
    C teacher_shift[kCudaMaxTeachers], teacher_log_sum[kCudaMaxTeachers];
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
        for (int i = threadIdx.x; i < p.vocab; i += kThreads)
          teacher_sum[0] += rowmath::exp_c((load_value<TX, C>(t_base, t_stride, row, i) - shift_t) * inv_t);
        block_all_reduce(teacher_sum, SumOp{});
        teacher_shift[m] = shift_t;
        teacher_log_sum[m] = rowmath::log_of_sum(teacher_sum[0]);
      }
      if (!p.mixture) {
        for (int m = 0; m < p.num_teachers; ++m) {
          C acc[2] = {C(0), C(0)};
          for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
            const C log_q = (load_value<SX, C>(p.student, p.student_row_stride, row, i) - shift_s) * inv_t - log_sum_t;
            const C log_p =
                (load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i) - teacher_shift[m]) * inv_t -
                teacher_log_sum[m];
            divergence_terms(p.divergence, log_p, log_q, k, acc[0], acc[1]);
          }
          block_all_reduce(acc, SumOp{});
          C aux = C(0);
          const C d_m = finish_divergence(p.divergence, acc[0], acc[1], k, aux);
          const C w = weight_of<C>(p, m, row);
          if (w > C(0)) divergence += w * d_m;
          if (threadIdx.x == 0) stats[kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m + 2] = aux;
        }
      } else {
        C acc[2] = {C(0), C(0)};
        for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
          const C log_q = (load_value<SX, C>(p.student, p.student_row_stride, row, i) - shift_s) * inv_t - log_sum_t;
          C mixture = C(0);
          for (int m = 0; m < p.num_teachers; ++m) {
            const C log_p =
                (load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i) - teacher_shift[m]) * inv_t -
                teacher_log_sum[m];
            mixture += weight_of<C>(p, m, row) * rowmath::exp_c(log_p);
          }
          divergence_terms(p.divergence, rowmath::log_c(mixture), log_q, k, acc[0], acc[1]);
        }
        block_all_reduce(acc, SumOp{});
        divergence = finish_divergence(p.divergence, acc[0], acc[1], k, mixture_aux);
      }
    }
    if (threadIdx.x == 0) {
      C ce = C(0);
      if (k.need_ce) {
        const C label_logit = load_value<SX, C>(p.student, p.student_row_stride, row, static_cast<int>(label)) - shift_s;
        ce = rowmath::cross_entropy(label_logit, log_sum_1, sums[2], static_cast<int64_t>(p.vocab), k.label_smoothing);
      }
      const C row_loss = rowmath::combine_loss(ce, divergence, k);
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
  const C inv_t = k.inv_temperature;
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
    if (p.labels != nullptr && p.labels[row] == p.ignore_index) {
      for (int i = threadIdx.x; i < p.vocab; i += kThreads) g_row[i] = SX::from_compute(C(0));
      continue;
    }
    const C g = static_cast<C>(static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) *
                               reduction_scale);
    const C* st = static_cast<const C*>(p.row_stats) + row * p.stats_width;
    const C shift_s = st[0], log_sum_t = st[1], log_sum_1 = st[2], mixture_aux = st[3];
    const C ce_factor = g * k.alpha;
    const C kd_factor = g * (C(1) - k.alpha) * k.divergence_scale * inv_t;
    const C smooth = k.label_smoothing / static_cast<C>(p.vocab);
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    const C label_step = g * k.alpha * (C(1) - k.label_smoothing);
    for (int i = threadIdx.x; i < p.vocab; i += kThreads) {
      const C ds = load_value<SX, C>(p.student, p.student_row_stride, row, i) - shift_s;
      const C log_q = ds * inv_t - log_sum_t;
      const C q = rowmath::exp_c(log_q);
      C value = C(0);
      if (k.need_ce) {
        const C r = k.need_student_1 ? rowmath::exp_c(ds - log_sum_1) : q;
        value += ce_factor * (r - smooth);
        if (i == label) value -= label_step;
      }
      if (k.need_kd) {
        C mixture = C(0), kd_sum = C(0);
        for (int m = 0; m < p.num_teachers; ++m) {
          const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
          const C log_p =
              (load_value<TX, C>(p.teachers.rows[m], p.teachers.row_strides[m], row, i) - ts[0]) * inv_t - ts[1];
          const C w = weight_of<C>(p, m, row);
          if (p.mixture) mixture += w * rowmath::exp_c(log_p);
          else if (w > C(0)) kd_sum += w * divergence_gradient(p.divergence, log_p, log_q, q, ts[2], k);
        }
        if (p.mixture) kd_sum = divergence_gradient(p.divergence, rowmath::log_c(mixture), log_q, q, mixture_aux, k);
        value += kd_factor * kd_sum;
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
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options);
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
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options);
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
