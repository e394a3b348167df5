// What the multi-teacher CUDA kernels share (multi_teacher.cu: forward and the loss reduction;
// multi_teacher_backward.cu: backward): the kernel arguments (MultiParams, by value, with the
// teachers' addresses and row strides), the per-element divergence terms and gradients on top
// of rowmath.h, the mixture's per-teacher offsets, batch loads, the launch helpers (grid,
// vector-path test, dtype dispatch). Contract: types.h (MultiTeacherKDArgs, the row_stats
// layout) and the file comments of the two kernel files. Everything here is in an anonymous
// namespace, one copy per kernel file.
#pragma once

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
// Values per teacher and thread in the forward kernel's shared state: running maximum, sum of
// exponentials, weighted sum (reused by the second sweep for its two sums).
constexpr int kStateFields = 3;

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

// (log w - log Z)/κ in h units; -inf for a zero weight.
template <class C>
__device__ __forceinline__ C mixture_offset(C weight, C log_sum, const rowmath::Coefficients<C>& k) {
  const double log_w = weight > C(0) ? ::log(static_cast<double>(weight)) : rowmath::neg_inf<double>();
  return static_cast<C>((log_w - static_cast<double>(log_sum)) / k.inv_scaled_t_d);
}

// Loads one batch of a row (kd_loss_cuda_common.cuh): element by element when it reaches
// outside the row (head or tail: -inf there), else with 16-byte loads when kVectorized.
template <class X, class C, bool kVectorized>
__device__ __forceinline__ void load_batch(const typename X::Raw* row, const int* first, int vocab, bool partial,
                                           C* out) {
  if (partial) {
    load_partial_batch<X, C, true>(row, first, vocab, out);
  } else {
    FullBatch<X, C, kVectorized, true> raw;
    raw.load(row, first);
    raw.to_compute(out);
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

// Whether every row of the student, of every teacher that is read and (backward) of the
// gradient lies on one group grid (kd_loss_cuda_layout.cuh, rows_share_pad): then the kernels
// read (and write) the row bodies with 16-byte accesses.
template <class SX, class TX, class C>
bool rows_vectorizable(const MultiTeacherKDArgs& args, bool with_teachers, bool with_gradient) {
  RowTensor tensors[kCudaMaxTeachers + 2];
  int count = 0;
  tensors[count++] = {args.student, args.student_row_stride, static_cast<int>(sizeof(typename SX::Raw))};
  if (with_gradient) tensors[count++] = {args.grad_student, args.vocab, static_cast<int>(sizeof(typename SX::Raw))};
  for (int64_t m = 0; m < args.num_teachers && with_teachers; ++m) {
    tensors[count++] = {args.teachers[m], args.teacher_row_strides[m], static_cast<int>(sizeof(typename TX::Raw))};
  }
  return rows_share_pad(tensors, count, args.rows, kGroupWidth<C>);
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
}  // namespace kdfast
