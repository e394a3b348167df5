// CUDA backward kernel of the multi-teacher KD loss: kdfast::multi_teacher_backward_cuda
// (declared in bindings.cpp). Contract and design: multi_teacher.cu's file comment (row_stats
// as its forward pass writes them; the gradient [rows, vocab] contiguous in the student dtype,
// multiplied by grad_output). One block of 256 threads per row (rows strided over the grid):
// one read of the student row and of every teacher row on the rows' common 16-byte grid when
// the student, teacher and gradient rows share one pad (else element by element), the
// gradient written once. reverse_kl with combine Sum forms u_i - mean_u
// (multi_teacher_runs.cuh: reverse_kl_mean_u) so that the entries with q near 1 cancel between
// numbers rounded as in the forward pass; the mixture's log-probabilities are a log-sum-exp
// over the teachers per element. Ignored rows get zeros, rows with a NaN row loss NaN.
#include <cstdint>

#include "multi_teacher_common.cuh"
#include "multi_teacher_runs.cuh"
#include "row_split.cuh"

namespace kdfast {
namespace cuda {
namespace {

template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kThreads) multi_teacher_backward_kernel(MultiParams p, rowmath::Coefficients<C> k) {
  constexpr int kE = BatchLayout<C>::kElements;
  constexpr int kW = BatchLayout<C>::kWidth;
  using Raw = typename SX::Raw;
  __shared__ const typename TX::Raw* t_rows[kCudaMaxTeachers];
  __shared__ C scaled_shift[kCudaMaxTeachers], log_sum[kCudaMaxTeachers], aux[kCudaMaxTeachers];
  __shared__ C offset[kCudaMaxTeachers], kd_w[kCudaMaxTeachers];
  __shared__ C rkl_a[kCudaMaxTeachers], rkl_b[kCudaMaxTeachers], rkl_c[kCudaMaxTeachers];
  __shared__ C mean_hi[kCudaMaxTeachers], mean_lo[kCudaMaxTeachers];
  const int threads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int M = p.num_teachers;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const double scale = reduction_scale<C>(p.reduction, p.valid_rows, p.rows);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int vocab = p.vocab;
    Raw* g_row = static_cast<Raw*>(p.grad_student) + row * static_cast<int64_t>(vocab);
    const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;
    const C* st = static_cast<const C*>(p.row_stats) + row * p.stats_width;
    __syncthreads();  // the previous row's readers of the shared arrays are done
    if (tid < M) {
      t_rows[tid] = static_cast<const typename TX::Raw*>(p.teachers.rows[tid]) + row * p.teachers.row_strides[tid];
    }
    __syncthreads();
    int pad = 0;
    if (kVectorized) {
      pad = max(row_pad<SX>(s_row), row_pad<SX>(g_row));
      for (int m = 0; m < M && k.need_kd; ++m) pad = max(pad, row_pad<TX>(t_rows[m]));
    }
    const int groups = (vocab + pad + kW - 1) / kW;
    const bool ignored = p.labels != nullptr && p.labels[row] == p.ignore_index;
    if (ignored || st[4] != st[4]) {  // ignored: zeros; a NaN row loss (NaN input, bad label): NaN
      C fill[kW];
#pragma unroll
      for (int e = 0; e < kW; ++e) fill[e] = ignored ? C(0) : quiet_nan<C>();
      for (int g = tid; g < groups; g += threads) store_group<SX, C, kVectorized>(g_row, g * kW - pad, vocab, fill);
      continue;
    }
    const double g =
        static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) * scale;
    const C shift_s = st[0] * h, log_sum_t = st[1], log_sum_1 = st[2], mixture_aux = st[3];
    // The row's factors: for the mixture (teacher log-sum 0: y is a log-probability) and per
    // teacher (combine Sum: its weight folded in), one teacher per thread.
    const rowmath::GradRow<C> factors =
        rowmath::make_grad_row(g, k, rowmath::RowStats<C>{C(0), C(0), st[0], log_sum_t, log_sum_1, mixture_aux},
                               static_cast<int64_t>(vocab));
    if (tid < M && k.need_kd) {
      const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * tid;
      const C w = weight_of<C>(p, tid, row);
      const rowmath::GradRow<C> teacher = rowmath::make_grad_row(
          g * static_cast<double>(w), k, rowmath::RowStats<C>{ts[0], ts[1], st[0], log_sum_t, log_sum_1, ts[2]},
          static_cast<int64_t>(vocab));
      scaled_shift[tid] = ts[0] * h;
      log_sum[tid] = ts[1];
      aux[tid] = ts[2];
      offset[tid] = mixture_offset(w, ts[1], k);
      kd_w[tid] = teacher.kd_factor;
      rkl_a[tid] = teacher.rkl_a;
      rkl_b[tid] = teacher.rkl_b;
      rkl_c[tid] = teacher.rkl_c;
      // reverse_kl, combine Sum: the forward's mean of u = h s - h t under q, from its aux
      // (D / κ = mean_u - h (s_max - t_max) + (log Z_p - log Z_q) / κ) in double, as hi + lo,
      // so that the gradient's bracket u_i - mean_u cancels between numbers rounded alike.
      reverse_kl_mean_u(ts[2], st[0], ts[0], ts[1], log_sum_t, k, mean_hi[tid], mean_lo[tid]);
    }
    __syncthreads();
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    const ThreadBatches<C> batches(vocab, pad, 0, groups, threads, tid);
    for (int b = 0; b < batches.total; ++b) {
      int first[1];
      batches.first_elements(b, first);
      const bool partial = batch_is_partial(batches, b);
      C s[kE], ds[kE], log_q[kE], q[kE], value[kE], top[kE], msum[kE];
      load_batch<SX, C, kVectorized>(s_row, first, vocab, partial, s);
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        ds[e] = rowmath::scaled_difference(s[e], h, shift_s);
        log_q[e] = ds[e] * kappa - log_sum_t;
        q[e] = rowmath::exp_c(log_q[e]);
        value[e] = C(0);
        if (k.need_ce) {
          const C r = k.need_student_1 ? rowmath::exp_c(ds[e] * inv_h - log_sum_1) : q[e];
          value[e] += factors.ce_factor * (r - factors.smooth);
          if (first[0] + e == label) value[e] -= factors.label_step;
        }
        if (k.need_kd && p.divergence == Divergence::ForwardKL) value[e] += factors.kd_factor * q[e];
        top[e] = negative_infinity<C>();
        msum[e] = C(0);
      }
      if (k.need_kd) {
        FullBatch<TX, C, kVectorized, true> raw;
        if (!partial) raw.load(t_rows[0], first);
        for (int m = 0; m < M; ++m) {
          C t[kE];
          if (partial) {
            load_partial_batch<TX, C, true>(t_rows[m], first, vocab, t);
          } else {
            raw.to_compute(t);
            if (m + 1 < M) raw.load(t_rows[m + 1], first);
          }
          if (p.divergence == Divergence::ForwardKL) {
            // Sum and mixture alike: kd_factor (q - Σ_m w_m p_m).
#pragma unroll
            for (int e = 0; e < kE; ++e) {
              value[e] -= kd_w[m] * rowmath::exp_c(rowmath::scaled_difference(t[e], h, scaled_shift[m]) * kappa -
                                                   log_sum[m]);
            }
          } else if (p.mixture) {
#pragma unroll
            for (int e = 0; e < kE; ++e) {
              const C y = rowmath::scaled_difference(t[e], h, scaled_shift[m]) + offset[m];
              const C new_top = y > top[e] ? y : top[e];
              const C shift = new_top == negative_infinity<C>() ? C(0) : new_top;
              msum[e] = msum[e] * rowmath::exp_c((top[e] - shift) * kappa) + rowmath::exp_c((y - shift) * kappa);
              top[e] = new_top;
            }
          } else if (kd_w[m] != C(0)) {  // a zero weight: no gradient (and no 0 · inf)
            if (p.divergence == Divergence::ReverseKL) {
              const C hi = mean_hi[m], minus_lo = -mean_lo[m];
#pragma unroll
              for (int e = 0; e < kE; ++e) {
                value[e] += rowmath::reverse_kl_grad(s[e] * h - t[e] * h, hi, q[e], rkl_a[m], rkl_b[m], minus_lo);
              }
            } else {
#pragma unroll
              for (int e = 0; e < kE; ++e) {
                const C dt = rowmath::scaled_difference(t[e], h, scaled_shift[m]);
                value[e] += kd_w[m] * divergence_gradient(p.divergence, dt * kappa - log_sum[m], log_q[e], q[e],
                                                          aux[m], k);
              }
            }
          }
        }
        if (p.mixture && p.divergence != Divergence::ForwardKL) {
#pragma unroll
          for (int e = 0; e < kE; ++e) {
            const C y = top[e] + rowmath::log_c(msum[e]) / kappa;
            if (p.divergence == Divergence::ReverseKL) {
              value[e] += rowmath::reverse_kl_grad(ds[e], y, q[e], factors.rkl_a, factors.rkl_b, factors.rkl_c);
            } else {
              value[e] += factors.kd_factor * divergence_gradient(p.divergence, y * kappa, log_q[e], q[e], mixture_aux, k);
            }
          }
        }
      }
      store_group<SX, C, kVectorized>(g_row, first[0], vocab, value);
    }
  }
}

template <class SX, class TX, class C>
void backward_typed(const MultiTeacherKDArgs& args, cudaStream_t stream) {
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const MultiParams p = make_params<C>(args);
  if (args.rows == 0) return;
  if (rows_vectorizable<SX, TX, C>(args, k.need_kd, true)) {
    multi_teacher_backward_kernel<SX, TX, C, true><<<grid_for(args.rows), kThreads, 0, stream>>>(p, k);
  } else {
    multi_teacher_backward_kernel<SX, TX, C, false><<<grid_for(args.rows), kThreads, 0, stream>>>(p, k);
  }
  check_launch("multi_teacher_backward_kernel");
}

}  // namespace
}  // namespace cuda

void multi_teacher_backward_cuda(const MultiTeacherKDArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "multi_teacher_backward_cuda");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cuda::with_storage(args, "multi_teacher_backward_cuda", [&](auto s, auto t, auto c) {
    cuda::backward_typed<decltype(s), decltype(t), decltype(c)>(args, stream);
  });
}

}  // namespace kdfast
