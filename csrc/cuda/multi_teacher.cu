// CUDA kernels of the multi-teacher KD loss: the forward pass (statistics + loss) and the loss
// reduction here, kdfast::multi_teacher_forward_cuda (declared in bindings.cpp); the backward
// pass in multi_teacher_backward.cu; what they share in multi_teacher_common.cuh.
// Contract: types.h (MultiTeacherKDArgs, the row_stats layout shared with the CPU kernel) and
// rowmath.h (the per-element math, shared with the CPU kernels). One block per row (rows
// strided over the grid); up to kCudaMaxTeachers (types.h) teachers, whose addresses and row
// strides travel by value in the kernel parameters (the core allocates no device memory). Rows
// with a label outside [0, vocab) that is not ignore_index get NaN statistics, loss and
// gradient (no device-to-host synchronisation to report them); NaN or +inf logits give a NaN
// row (rowmath::row_sums_defined), -inf logits are masked, as on the CPU.
// Rows are read in groups of 8 elements (2 in float64) on the 16-byte grid
// (kd_loss_cuda_layout.cuh): scalar head to the first 16-byte boundary, 16-byte loads for the
// body, scalar tail, when the student, every teacher and (backward) the gradient rows share one
// pad (rows_share_pad), else element by element; each thread walks its batches with
// ThreadBatches (row_split.cuh), the next teacher's loads issued before the current one is used.
// Forward, per row: one read of the student row and of every teacher row. Each thread keeps
// running maxima and the sums relative to them (the online log-sum-exp of kd_loss_forward.cu;
// the arithmetic is in multi_teacher_runs.cuh, host-callable and tested on the CPU):
// the student's in registers, each teacher's (maximum, sum of exponentials, weighted sum) in
// shared memory (3 M values per thread: 48 KiB at M = 16 and 256 threads in float32; the block
// shrinks where a device offers less, shared_memory_plan.cuh). Combine Sum with forward_kl /
// reverse_kl finishes from these sums: the weighted sums are over u_i = h s_i - h t_i
// (forward_kl: Σ e^{dt κ} (-u), reverse_kl: Σ e^{ds κ} u), which no maximum shifts, so merging
// threads only multiplies them by the exponentials' factors; D follows in double with the
// gap h (s_max - t_max). The mixture (every divergence) and jsd / tvd need normalised
// distributions, so they sweep the rows a second time with the row's statistics known; that
// sweep re-reads the rows (from L2 while they are still there; the rows are not kept in
// shared memory, which holds about 50K float32 elements per block at most). A second
// single-block kernel reduces the row losses in a fixed order (deterministic).
// Backward (multi_teacher_backward.cu), per row: one read of the student row and of every teacher row, the gradient written
// once (16-byte stores on the grid), multiplied by grad_output (read on the device, with the
// valid-row count for "mean"). reverse_kl with combine Sum uses u_i - mean_u (mean_u rebuilt in
// double from the forward's aux, split into two floats) so that the bracket of the entries
// with q near 1 cancels between numbers rounded as in the forward pass, whatever the spread of
// the logits.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "multi_teacher_common.cuh"
#include "multi_teacher_runs.cuh"
#include "row_split.cuh"
#include "shared_memory_plan.cuh"
#include "topk_cuda_common.cuh"

namespace kdfast {
namespace cuda {
namespace {

// out[m] = op over the block's threads of field `field` of teacher m's per-thread state
// (layout: state[(m kStateFields + field) blockDim + thread]); one warp per teacher, each lane
// combining threads lane, lane + 32, ... in order and the warp by a butterfly, so the result is
// deterministic. The caller synchronises the block before (state complete) and after (out read).
template <class C, class Op>
__device__ __forceinline__ void reduce_teacher_field(const C* state, int teachers, int field, C* out, Op op) {
  const int threads = static_cast<int>(blockDim.x), lane = threadIdx.x & 31;
  for (int m = threadIdx.x >> 5; m < teachers; m += threads >> 5) {
    const C* values = state + (m * kStateFields + field) * threads;
    C acc = values[lane];
    for (int t = lane + 32; t < threads; t += 32) acc = op(acc, values[t]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc = op(acc, __shfl_xor_sync(0xffffffffu, acc, offset));
    if (lane == 0) out[m] = acc;
  }
}

template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kThreads) multi_teacher_forward_kernel(MultiParams p, rowmath::Coefficients<C> k) {
  constexpr int kE = BatchLayout<C>::kElements;
  constexpr int kW = BatchLayout<C>::kWidth;
  extern __shared__ uint4 dynamic_shared[];
  C* const state = reinterpret_cast<C*>(dynamic_shared);  // [M][kStateFields][blockDim]
  __shared__ const typename TX::Raw* t_rows[kCudaMaxTeachers];
  __shared__ C t_max[kCudaMaxTeachers], t_sum[kCudaMaxTeachers], t_weighted[kCudaMaxTeachers];
  __shared__ C t_log_sum[kCudaMaxTeachers], t_offset[kCudaMaxTeachers];
  __shared__ C max_scratch[kWarps][1];
  __shared__ C sum_scratch[kWarps][3];
  __shared__ C acc_scratch[kWarps][2];

  const int threads = static_cast<int>(blockDim.x), tid = static_cast<int>(threadIdx.x);
  const int M = p.num_teachers;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const ScaledExp<C> exp_over_t(kappa);
  const ScaledExp<C> exp_plain(inv_h);
  const bool smooth = k.need_ce && k.label_smoothing > C(0);
  const bool one_pass = k.need_kd && !p.mixture &&
                        (p.divergence == Divergence::ForwardKL || p.divergence == Divergence::ReverseKL);
  const RunWeight weight = !one_pass                                  ? RunWeight::None
                           : p.divergence == Divergence::ForwardKL ? RunWeight::Forward
                                                                   : RunWeight::Reverse;
  auto field = [&](int m, int f) -> C& { return state[(m * kStateFields + f) * threads + tid]; };

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    C* stats = static_cast<C*>(p.row_stats) + row * p.stats_width;
    const bool valid = p.labels == nullptr || p.labels[row] != p.ignore_index;
    const int64_t label = p.labels != nullptr ? p.labels[row] : -1;
    if (!valid || (p.labels != nullptr && (label < 0 || label >= p.vocab))) {
      const C fill = valid ? quiet_nan<C>() : C(0);
      for (int64_t j = tid; j < p.stats_width; j += threads) stats[j] = fill;
      if (p.reduction == Reduction::None && tid == 0) static_cast<C*>(p.loss)[row] = fill;
      continue;  // uniform over the block: one row per block
    }
    const int vocab = p.vocab;
    const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;
    __syncthreads();  // the previous row's readers of t_rows and the teacher arrays are done
    if (tid < M) {
      t_rows[tid] = static_cast<const typename TX::Raw*>(p.teachers.rows[tid]) + row * p.teachers.row_strides[tid];
    }
    __syncthreads();
    // Vectorised: every row read lies on one group grid (host-checked); pad = the largest pad.
    int pad = 0;
    if (kVectorized) {
      pad = row_pad<SX>(s_row);
      for (int m = 0; m < M && k.need_kd; ++m) pad = max(pad, row_pad<TX>(t_rows[m]));
    }
    const int groups = (vocab + pad + kW - 1) / kW;
    const ThreadBatches<C> batches(vocab, pad, 0, groups, threads, tid);

    // ---- the one read: running maxima and the sums relative to them, per thread
    // (multi_teacher_runs.cuh); the teachers' runs live in shared memory.
    StudentRun<C> student = empty_student_run<C>();
    for (int m = 0; m < M && k.need_kd; ++m) {
      field(m, 0) = negative_infinity<C>();
      field(m, 1) = C(0);
      field(m, 2) = C(0);
    }
    for (int b = 0; b < batches.total; ++b) {
      int first[1];
      batches.first_elements(b, first);
      const bool partial = batch_is_partial(batches, b);
      C s[kE], es[kE];
      load_batch<SX, C, kVectorized>(s_row, first, vocab, partial, s);
      const C factor_s =
          add_student_batch<kE>(student, s, first[0], vocab, partial, smooth, k, exp_over_t, exp_plain, es);
      if (!k.need_kd) continue;
      // Teachers in turn, the next teacher's 16-byte loads issued before this one is used.
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
        TeacherRun<C> run{field(m, 0), field(m, 1), field(m, 2)};
        add_teacher_batch<kE>(run, t, s, es, factor_s, weight, k, exp_over_t);
        field(m, 0) = run.max;
        field(m, 1) = run.sum;
        field(m, 2) = run.weighted;
      }
    }

    // ---- the block's statistics: maxima, then every thread's sums moved onto them and added
    C maxima[1] = {student.max};
    team_all_reduce(maxima, max_scratch, threads, MaxOp{});
    const C row_max_s = maxima[0];
    const C factor_row = rebase_student(student, row_max_s, k);
    C sums[3] = {student.sum_t, student.sum_1, student.centered};  // sum exp(ds κ), sum exp(ds / h), sum ds
    team_all_reduce(sums, sum_scratch, threads, SumOp{});
    const C shift_s = row_max_s == negative_infinity<C>() ? C(0) : row_max_s;
    const C log_sum_t = rowmath::log_of_sum(sums[0]);
    const C log_sum_1 = k.need_student_1 ? rowmath::log_of_sum(sums[1]) : log_sum_t;
    bool defined = rowmath::student_sums_defined(sums[0], sums[1], k);  // NaN in, NaN out (rowmath.h)
    if (k.need_kd) {
      __syncthreads();  // every thread's state is written
      reduce_teacher_field(state, M, 0, t_max, MaxOp{});
      __syncthreads();
      for (int m = 0; m < M; ++m) {
        TeacherRun<C> run{field(m, 0), field(m, 1), field(m, 2)};
        move_teacher_run(run, t_max[m], factor_row, weight, k);
        field(m, 1) = run.sum;
        field(m, 2) = run.weighted;
      }
      __syncthreads();
      reduce_teacher_field(state, M, 1, t_sum, SumOp{});
      if (one_pass) reduce_teacher_field(state, M, 2, t_weighted, SumOp{});
      __syncthreads();
      if (tid < M) {
        t_log_sum[tid] = rowmath::log_of_sum(t_sum[tid]);
        t_offset[tid] = mixture_offset(weight_of<C>(p, tid, row), t_log_sum[tid], k);
      }
      __syncthreads();
      for (int m = 0; m < M; ++m) defined = defined && rowmath::sum_defined(t_sum[m]);  // whatever its weight
    }

    // ---- the divergence: from the one-read sums (combine Sum, forward / reverse KL), else
    // from a second sweep over the rows, which re-reads them (from L2 where they are still
    // there: the rows of a block are not kept in shared memory)
    double divergence = 0.0;
    C mixture_aux = C(0);
    if (one_pass && tid == 0) {
      for (int m = 0; m < M; ++m) {
        C aux = C(0);
        const double d_m = one_pass_divergence(weight, t_weighted[m], t_sum[m], sums[0], shift_s, t_max[m],
                                               log_sum_t, t_log_sum[m], k, aux);
        const C w = weight_of<C>(p, m, row);
        if (w > C(0)) divergence += static_cast<double>(w) * d_m;
        stats[kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m + 2] = aux;
      }
    }
    if (k.need_kd && !one_pass && defined) {  // `defined` is block-uniform
      const C scaled_shift_s = shift_s * h;
      for (int m = 0; m < M && !p.mixture; ++m) {
        field(m, 1) = C(0);
        field(m, 2) = C(0);
      }
      C acc[2] = {C(0), C(0)};
      for (int b = 0; b < batches.total; ++b) {
        int first[1];
        batches.first_elements(b, first);
        const bool partial = batch_is_partial(batches, b);
        C s[kE], ds[kE], log_q[kE], top[kE], msum[kE];
        load_batch<SX, C, kVectorized>(s_row, first, vocab, partial, s);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          ds[e] = rowmath::scaled_difference(s[e], h, scaled_shift_s);
          log_q[e] = ds[e] * kappa - log_sum_t;
          top[e] = negative_infinity<C>();
          msum[e] = C(0);
        }
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
          const C scaled_shift_t = t_max[m] * h;
          if (!p.mixture) {
            C a0 = C(0), a1 = C(0);
#pragma unroll
            for (int e = 0; e < kE; ++e) {
              const C dt = rowmath::scaled_difference(t[e], h, scaled_shift_t);
              divergence_terms(p.divergence, dt, ds[e], dt * kappa - t_log_sum[m], log_q[e], k, a0, a1);
            }
            field(m, 1) += a0;
            field(m, 2) += a1;
          } else {
            // The mixture's log-probability per element: a log-sum-exp over the teachers of
            // dt + offset (mixture_offset), kept as (running top, sum).
            const C offset = t_offset[m];
#pragma unroll
            for (int e = 0; e < kE; ++e) {
              const C y = rowmath::scaled_difference(t[e], h, scaled_shift_t) + offset;
              const C new_top = y > top[e] ? y : top[e];
              const C shift = new_top == negative_infinity<C>() ? C(0) : new_top;
              msum[e] = msum[e] * rowmath::exp_c((top[e] - shift) * kappa) + rowmath::exp_c((y - shift) * kappa);
              top[e] = new_top;
            }
          }
        }
        if (p.mixture) {
#pragma unroll
          for (int e = 0; e < kE; ++e) {
            const C y = top[e] + rowmath::log_c(msum[e]) / kappa;
            divergence_terms(p.divergence, y, ds[e], y * kappa, log_q[e], k, acc[0], acc[1]);
          }
        }
      }
      if (p.mixture) {
        team_all_reduce(acc, acc_scratch, threads, SumOp{});
        divergence = finish_divergence(p.divergence, acc[0], acc[1], static_cast<double>(log_sum_t), k, mixture_aux);
      } else {
        __syncthreads();
        reduce_teacher_field(state, M, 1, t_weighted, SumOp{});  // acc0 per teacher
        reduce_teacher_field(state, M, 2, t_offset, SumOp{});    // acc1 per teacher (offsets no longer read)
        __syncthreads();
        if (tid == 0) {
          for (int m = 0; m < M; ++m) {
            C aux = C(0);
            const double d_m = finish_divergence(
                p.divergence, t_weighted[m], t_offset[m],
                static_cast<double>(log_sum_t) - static_cast<double>(t_log_sum[m]), k, aux);
            const C w = weight_of<C>(p, m, row);
            if (w > C(0)) divergence += static_cast<double>(w) * d_m;
            stats[kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m + 2] = aux;
          }
        }
      }
    }
    if (tid == 0) {
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
        teacher_out[0] = k.need_kd ? (t_max[m] == negative_infinity<C>() ? C(0) : t_max[m]) : C(0);
        teacher_out[1] = k.need_kd ? t_log_sum[m] : C(0);
        if (!k.need_kd || p.mixture || (!one_pass && !defined)) teacher_out[2] = C(0);
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

// Static shared memory the forward kernel is granted besides its per-thread teacher state.
constexpr size_t kForwardStaticBytes = 2048;

template <class SX, class TX, class C>
void forward_typed(const MultiTeacherKDArgs& args, cudaStream_t stream) {
  const rowmath::Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const MultiParams p = make_params<C>(args);
  if (args.rows > 0) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    int limit = 0;
    check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    const int64_t teachers = k.need_kd ? args.num_teachers : 0;
    const int block = plan_multi_teacher_threads(teachers, kStateFields, sizeof(C), kThreads, kForwardStaticBytes,
                                                 static_cast<size_t>(limit));
    if (block == 0) {
      throw std::invalid_argument("multi_teacher_forward_cuda: the device's shared memory per block (" +
                                  std::to_string(limit) + " bytes) cannot hold the teachers' running sums");
    }
    const size_t shared_bytes = static_cast<size_t>(teachers) * kStateFields * sizeof(C) * static_cast<size_t>(block);
    auto launch = [&](auto kernel) {
      allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), shared_bytes);
      kernel<<<grid_for(args.rows), block, shared_bytes, stream>>>(p, k);
      check_launch("multi_teacher_forward_kernel");
    };
    if (rows_vectorizable<SX, TX, C>(args, k.need_kd, false)) {
      launch(multi_teacher_forward_kernel<SX, TX, C, true>);
    } else {
      launch(multi_teacher_forward_kernel<SX, TX, C, false>);
    }
  }
  multi_teacher_reduce_kernel<C><<<1, kReduceThreads, 0, stream>>>(
      static_cast<const C*>(args.row_stats), p.stats_width, args.labels, args.rows, args.options.ignore_index,
      args.options.reduction, static_cast<C*>(args.loss), static_cast<C*>(args.valid_rows));
  check_launch("multi_teacher_reduce_kernel");
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

}  // namespace kdfast
