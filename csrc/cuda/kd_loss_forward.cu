// CUDA forward pass of the dense KD loss: kdfast::kd_forward_cuda (declared in bindings.cpp).
// Contract: the same as kd_forward_cpu (types.h, rowmath.h): row_stats[row] = the six
// rowmath::RowStats values (maxima of t and s; log-sums of exp((t - max)/T), exp((s - max)/T)
// and exp(s - max); aux), the row loss, then zeros; `loss` = the per-row losses (reduction
// none) or the reduced scalar (sum; mean over valid rows, 0 when none is valid; batchmean =
// sum / rows); `valid_rows` = number of rows whose label is not ignore_index. Ignored rows get
// zero statistics and loss. One difference from the CPU: a label outside [0, V) that is not
// ignore_index is not counted (that would need a host synchronisation); its row's statistics
// and loss are NaN (so a reduced loss is NaN too) and the function returns 0. Everything is
// enqueued on `stream`; nothing synchronises or allocates, so the calls can be captured in
// a CUDA graph.
//
// Kernels: (1) kd_forward_rows_kernel: one team of threads per row (a warp for short rows,
// up to 512 threads for long ones, 1024 when there are fewer rows than twice the number of
// multiprocessors) streams the row once with 16-byte loads (scalar head to the row's first
// 16-byte boundary, vector body, scalar tail; kd_loss_cuda_layout.cuh), one batch of loads in flight per
// thread while it computes the previous one, keeping per-thread running maxima and sums
// relative to them; the team then combines them (maxima first, then every thread's sums moved
// onto them with rowmath::rebase_partial and added) and finishes the row with rowmath
// (finish_stats, cross_entropy, combine_loss). JSD and TVD sweep the row a second time
// (jsd_terms / tvd_terms), mostly from L1/L2. Bytes per element: one read of the student and
// of the teacher logits (no teacher read when alpha == 1); JSD/TVD read them twice.
// (2) kd_forward_reduce_kernel: one block sums the row losses in a fixed order (double
// accumulator: deterministic) into the reduced loss and counts the valid rows.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kd_loss_cuda_common.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/rowmath.h"

namespace kdfast {
namespace cuda {

int multiprocessor_count() {
  static std::mutex mutex;
  static std::vector<int> counts;  // by device index; 0 = not queried yet
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(counts.size()) <= device) counts.resize(static_cast<size_t>(device) + 1, 0);
  if (counts[device] == 0) {
    int count = 0;
    check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    counts[device] = count > 0 ? count : 1;
  }
  return counts[device];
}

namespace {

using rowmath::Coefficients;
using rowmath::RowPartial;
using rowmath::RowStats;

// Kernel arguments of the row kernel (plain values; the options travel as Coefficients).
struct ForwardRowsParams {
  const void* student;
  int64_t student_row_stride;
  const void* teacher;
  int64_t teacher_row_stride;
  const int64_t* labels;  // null: every row valid
  int64_t rows;
  int vocab;
  int team_size;  // threads per row: a power of two, 32 <= team_size <= block size
  int64_t ignore_index;
  bool write_row_losses;  // reduction none: loss[row] = row loss
  void* loss;
  void* row_stats;
};

// Folds one batch of a thread's elements (s: student logits, t: teacher logits; -inf past the
// end of the row) into its running statistics, as chunk_stats does on the CPU: the running
// maxima grow to cover the batch (rowmath::rebase_partial moves the sums along), then the
// batch's terms are added relative to them, as scaled differences d = h x - h max
// (rowmath::difference_scale). While a running maximum is still -inf (every entry so far -inf
// or NaN) the batch is shifted by 0, so that its NaN and -inf entries still reach the sums.
// kPartial: the batch reaches outside the row (head or tail), so the element count and the centred total of
// the student logits skip the padding.
template <class C, bool kPartial>
__device__ __forceinline__ void accumulate_batch(RowPartial<C>& part, const C* s, const C* t, const int* first,
                                                 int vocab, const Coefficients<C>& k) {
  constexpr int kE = BatchLayout<C>::kElements;
  constexpr int kW = BatchLayout<C>::kWidth;
  const C h = k.diff_scale;
  const bool reverse_kl = k.need_kd && k.divergence == Divergence::ReverseKL;
  const bool forward_kl = k.need_kd && k.divergence == Divergence::ForwardKL;
  const bool smoothing = k.need_ce && k.label_smoothing > C(0);

  C batch_max_s = negative_infinity<C>();
  C batch_max_t = negative_infinity<C>();
#pragma unroll
  for (int e = 0; e < kE; ++e) batch_max_s = MaxOp{}(batch_max_s, s[e]);
  if (k.need_kd) {
#pragma unroll
    for (int e = 0; e < kE; ++e) batch_max_t = MaxOp{}(batch_max_t, t[e]);
  }
  const C max_s = MaxOp{}(part.student_max, batch_max_s);
  const C max_t = MaxOp{}(part.teacher_max, batch_max_t);
  if (max_s != part.student_max || max_t != part.teacher_max) {
    rowmath::rebase_partial(part, max_t, max_s, k, k.divergence);
  }
  if (kPartial) {
    int valid = 0;
#pragma unroll
    for (int e = 0; e < kE; ++e) valid += in_row(first[e / kW] + e % kW, vocab) ? 1 : 0;
    part.count += static_cast<C>(valid);
  } else {
    part.count += static_cast<C>(kE);
  }
  const ScaledExp<C> exp_over_t(k.inv_scaled_t);
  const C shift_s = (max_s == negative_infinity<C>() ? C(0) : max_s) * h;
  const C shift_t = (max_t == negative_infinity<C>() ? C(0) : max_t) * h;
  {
    C sum_t = C(0), sum_1 = C(0), centered = C(0), weighted = C(0);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C ds = rowmath::scaled_difference(s[e], h, shift_s);
      const C exp_b = exp_over_t(ds);
      sum_t += exp_b;
      if (reverse_kl) weighted += exp_b > C(0) ? exp_b * (ds - rowmath::scaled_difference(t[e], h, shift_t)) : C(0);
    }
    if (k.need_student_1) {
      const ScaledExp<C> exp_plain(k.inv_diff_scale);
#pragma unroll
      for (int e = 0; e < kE; ++e) sum_1 += exp_plain(rowmath::scaled_difference(s[e], h, shift_s));
    }
    if (smoothing) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        if (!kPartial || in_row(first[e / kW] + e % kW, vocab)) centered += rowmath::scaled_difference(s[e], h, shift_s);
      }
    }
    part.student_sum_T += sum_t;
    part.student_sum_1 += sum_1;
    part.student_centered_total += centered;
    if (reverse_kl) part.weighted += weighted;
  }
  if (k.need_kd) {
    C sum = C(0), weighted = C(0);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C dt = rowmath::scaled_difference(t[e], h, shift_t);
      const C exp_a = exp_over_t(dt);
      sum += exp_a;
      if (forward_kl) weighted += exp_a > C(0) ? exp_a * (dt - rowmath::scaled_difference(s[e], h, shift_s)) : C(0);
    }
    part.teacher_sum += sum;
    if (forward_kl) part.weighted += weighted;
  }
}

// Second sweep of JSD / TVD over one batch, with the row's maxima and log-sums known.
template <class C>
__device__ __forceinline__ void sweep_batch(const C* s, const C* t, const Coefficients<C>& k, const RowStats<C>& st,
                                            C& acc0, C& acc1) {
  constexpr int kE = BatchLayout<C>::kElements;
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  const C max_t = st.teacher_max * h, max_s = st.student_max * h;
  if (k.divergence == Divergence::JSD) {
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C log_p = rowmath::scaled_difference(t[e], h, max_t) * kappa - st.teacher_log_sum;
      const C log_q = rowmath::scaled_difference(s[e], h, max_s) * kappa - st.student_log_sum_T;
      rowmath::jsd_terms(log_p, log_q, k, acc0, acc1);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C log_p = rowmath::scaled_difference(t[e], h, max_t) * kappa - st.teacher_log_sum;
      const C log_q = rowmath::scaled_difference(s[e], h, max_s) * kappa - st.student_log_sum_T;
      rowmath::tvd_terms(log_p, log_q, acc0, acc1);
    }
  }
}

// Combines the threads' partials of a team into the row's partial, in every thread:
// maxima first, then each thread's sums moved onto them (rowmath::rebase_partial) and added.
template <int kWarps, class C>
__device__ __forceinline__ RowPartial<C> team_row_partial(RowPartial<C> part, const Coefficients<C>& k, int team,
                                                          C (&max_scratch)[kWarps][2],
                                                          C (&sum_scratch)[kWarps][6]) {
  C maxima[2] = {part.teacher_max, part.student_max};
  team_all_reduce(maxima, max_scratch, team, MaxOp{});
  rowmath::rebase_partial(part, maxima[0], maxima[1], k, k.divergence);
  C sums[6] = {part.teacher_sum, part.student_sum_T, part.student_sum_1,
               part.weighted,    part.student_centered_total, part.count};
  team_all_reduce(sums, sum_scratch, team, SumOp{});
  RowPartial<C> row;
  row.teacher_max = maxima[0];
  row.teacher_sum = sums[0];
  row.student_max = maxima[1];
  row.student_sum_T = sums[1];
  row.student_sum_1 = sums[2];
  row.weighted = sums[3];
  row.student_centered_total = sums[4];
  row.count = sums[5];
  return row;
}

// Block sizes 256, 512 or 1024 (a multiple of the team size); at most 64 registers per
// thread, so that 1024 threads stay resident per multiprocessor.
constexpr int kMaxRowsBlock = 1024;

template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kMaxRowsBlock, 1) kd_forward_rows_kernel(ForwardRowsParams p, Coefficients<C> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  constexpr int kWarps = kMaxRowsBlock / 32;
  __shared__ C max_scratch[kWarps][2];
  __shared__ C sum_scratch[kWarps][6];
  __shared__ C sweep_scratch[kWarps][2];

  const int team = p.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool in_range = row < p.rows;
  int64_t label = 0;
  bool ignored = !in_range;
  bool bad_label = false;
  if (in_range && p.labels != nullptr) {
    label = p.labels[row];
    ignored = label == p.ignore_index;
    bad_label = !ignored && (label < 0 || label >= p.vocab);
  }
  const bool computed = !ignored && !bad_label;
  // Rows without work still take part in the team reductions (block-wide barriers).
  const int vocab = computed ? p.vocab : 0;
  const typename SX::Raw* s_row =
      static_cast<const typename SX::Raw*>(p.student) + (computed ? row * p.student_row_stride : 0);
  const typename TX::Raw* t_row =
      static_cast<const typename TX::Raw*>(p.teacher) + (computed ? row * p.teacher_row_stride : 0);

  // Vectorised: the row's groups lie on the 16-byte grid (the host checked that the teacher row
  // has the same pad whenever it is read).
  int pad = 0;
  if (kVectorized && vocab > 0) {
    pad = row_pad<SX>(s_row);
    if (k.need_kd && row_pad<TX>(t_row) > pad) pad = row_pad<TX>(t_row);
  }
  RowPartial<C> part = rowmath::empty_partial<C>();
  const int groups = (vocab + pad + kW - 1) / kW;
  const ThreadBatches<C> batches(vocab, pad, 0, groups, team, lane);
  stream_batches<SX, TX, C, kVectorized, true>(s_row, t_row, vocab, batches, k.need_kd,
                                               [&](const C* s, const C* t, const int* first, auto partial) {
                                                 accumulate_batch<C, decltype(partial)::value>(part, s, t, first,
                                                                                               vocab, k);
                                               });

  const RowPartial<C> row_part = team_row_partial(part, k, team, max_scratch, sum_scratch);
  double divergence = 0.0;
  RowStats<C> stats = rowmath::finish_stats(row_part, k, &divergence);

  if (k.need_kd && (k.divergence == Divergence::JSD || k.divergence == Divergence::TVD)) {
    C acc[2] = {C(0), C(0)};
    stream_batches<SX, TX, C, kVectorized, true>(s_row, t_row, vocab, batches, true,
                                           [&](const C* s, const C* t, const int*, auto) {
                                             sweep_batch(s, t, k, stats, acc[0], acc[1]);
                                           });
    team_all_reduce(acc, sweep_scratch, team, SumOp{});
    divergence = static_cast<double>(k.divergence == Divergence::JSD ? rowmath::finish_jsd(acc[0], acc[1], k, stats)
                                                                      : rowmath::finish_tvd(acc[0], acc[1], stats));
  }

  if (!in_range || lane != 0) return;
  C* stats_out = static_cast<C*>(p.row_stats) + row * kRowStats;
  C row_loss = C(0);
  if (ignored) {
    for (int j = 0; j < kRowStats; ++j) stats_out[j] = C(0);
  } else if (bad_label) {
    row_loss = quiet_nan<C>();
    for (int j = 0; j < kRowStats; ++j) stats_out[j] = row_loss;
  } else {
    double ce = 0.0;
    if (k.need_ce && p.labels != nullptr) {
      const double label_logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + label))) -
                                 static_cast<double>(stats.student_max);
      const double centered =
          static_cast<double>(row_part.student_centered_total) / static_cast<double>(k.diff_scale);
      ce = rowmath::cross_entropy(label_logit, static_cast<double>(stats.student_log_sum_1), centered,
                                  static_cast<int64_t>(p.vocab), k.label_smoothing_d);
    }
    // NaN in, NaN out (rowmath::row_sums_defined); the backward pass then writes NaN gradients.
    row_loss = rowmath::row_sums_defined(row_part, k) ? static_cast<C>(rowmath::combine_loss(ce, divergence, k))
                                                      : quiet_nan<C>();
    stats_out[0] = stats.teacher_max;
    stats_out[1] = stats.teacher_log_sum;
    stats_out[2] = stats.student_max;
    stats_out[3] = stats.student_log_sum_T;
    stats_out[4] = stats.student_log_sum_1;
    stats_out[5] = stats.aux;
    stats_out[kRowLossColumn] = row_loss;
    for (int j = kRowLossColumn + 1; j < kRowStats; ++j) stats_out[j] = C(0);
  }
  if (p.write_row_losses) static_cast<C*>(p.loss)[row] = row_loss;
}

constexpr int kReduceThreads = 1024;

// One block: the scalar loss from row_stats[:, 4] (fixed order, double accumulator) and the
// number of valid rows. With reduction none only valid_rows is written (the row kernel wrote
// the per-row losses).
template <class C>
__global__ void __launch_bounds__(kReduceThreads)
    kd_forward_reduce_kernel(const C* row_stats, const int64_t* labels, int64_t rows, int64_t ignore_index,
                             Reduction reduction, C* loss, C* valid_rows) {
  double total = 0.0;
  double valid = 0.0;  // exact below 2^53 rows
  const bool want_total = reduction != Reduction::None;
#pragma unroll 4
  for (int64_t row = threadIdx.x; row < rows; row += kReduceThreads) {
    if (want_total) total += static_cast<double>(row_stats[row * kRowStats + kRowLossColumn]);
    valid += (labels == nullptr || labels[row] != ignore_index) ? 1.0 : 0.0;
  }
  __shared__ double scratch[kReduceThreads / 32][2];
  double values[2] = {total, valid};
  team_all_reduce(values, scratch, kReduceThreads, SumOp{});
  if (threadIdx.x != 0) return;
  total = values[0];
  valid = values[1];
  if (want_total) {
    double value = total;
    if (reduction == Reduction::Mean) value = valid > 0.0 ? total / valid : 0.0;
    if (reduction == Reduction::BatchMean) value = rows > 0 ? total / static_cast<double>(rows) : 0.0;
    *loss = static_cast<C>(value);
  }
  *valid_rows = static_cast<C>(valid);
}

template <class SX, class TX, class C, bool kVectorized>
void launch_rows(const ForwardRowsParams& params, const Coefficients<C>& k, cudaStream_t stream) {
  const int block = params.team_size < 256 ? 256 : params.team_size;
  const int64_t blocks = ceil_div(params.rows, block / params.team_size);
  if (blocks > int64_t(0x7fffffff)) throw std::invalid_argument("kd_forward_cuda: too many rows for one launch");
  kd_forward_rows_kernel<SX, TX, C, kVectorized><<<static_cast<unsigned>(blocks), block, 0, stream>>>(params, k);
  check_launch("kd_forward_rows_kernel");
}

template <class SX, class TX, class C>
void forward_typed(const KDForwardArgs& args, cudaStream_t stream) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  ForwardRowsParams params;
  params.student = args.student;
  params.student_row_stride = args.student_row_stride;
  params.teacher = args.teacher;
  params.teacher_row_stride = args.teacher_row_stride;
  params.labels = args.labels;
  params.rows = args.rows;
  params.vocab = static_cast<int>(args.vocab);
  params.team_size = forward_team_size<C>(args.vocab, args.rows, multiprocessor_count());
  params.ignore_index = args.options.ignore_index;
  params.write_row_losses = args.options.reduction == Reduction::None;
  params.loss = args.loss;
  params.row_stats = args.row_stats;
  if (args.rows > 0) {
    // Per-row 16-byte loads unless the student and teacher rows sit differently on the grid.
    const RowTensor tensors[2] = {{args.student, args.student_row_stride, static_cast<int>(sizeof(typename SX::Raw))},
                                  {args.teacher, args.teacher_row_stride, static_cast<int>(sizeof(typename TX::Raw))}};
    const bool vectorized = rows_share_pad(tensors, k.need_kd ? 2 : 1, args.rows, kGroupWidth<C>);
    if (vectorized) {
      launch_rows<SX, TX, C, true>(params, k, stream);
    } else {
      launch_rows<SX, TX, C, false>(params, k, stream);
    }
  }
  kd_forward_reduce_kernel<C><<<1, kReduceThreads, 0, stream>>>(
      static_cast<const C*>(args.row_stats), args.labels, args.rows, args.options.ignore_index, args.options.reduction,
      static_cast<C*>(args.loss), static_cast<C*>(args.valid_rows));
  check_launch("kd_forward_reduce_kernel");
}

template <class SX>
void forward_with_teacher(const KDForwardArgs& args, cudaStream_t stream) {
  switch (args.teacher_dtype) {
    case DType::Float32: return forward_typed<SX, Float32Storage, float>(args, stream);
    case DType::BFloat16: return forward_typed<SX, BFloat16Storage, float>(args, stream);
    case DType::Float16: return forward_typed<SX, Float16Storage, float>(args, stream);
    default: break;
  }
  throw std::invalid_argument("kd_forward_cuda: unsupported teacher dtype code " +
                              std::to_string(static_cast<int>(args.teacher_dtype)));
}

}  // namespace

void check_vocab_fits(int64_t vocab, const char* function) {
  // Element indices within a row are 32-bit in the kernels (with headroom for padding).
  if (vocab < 0 || vocab > (int64_t(1) << 30)) {
    throw std::invalid_argument(std::string(function) + ": vocabulary size " + std::to_string(vocab) +
                                " is outside the supported range [0, 2^30]");
  }
}

}  // namespace cuda

int64_t kd_forward_cuda(const KDForwardArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "kd_forward_cuda");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.student_dtype) {
    case DType::Float64:
      if (args.teacher_dtype != DType::Float64) {
        throw std::invalid_argument("kd_forward_cuda: float64 student logits need float64 teacher logits");
      }
      cuda::forward_typed<cuda::Float64Storage, cuda::Float64Storage, double>(args, stream);
      break;
    case DType::Float32: cuda::forward_with_teacher<cuda::Float32Storage>(args, stream); break;
    case DType::BFloat16: cuda::forward_with_teacher<cuda::BFloat16Storage>(args, stream); break;
    case DType::Float16: cuda::forward_with_teacher<cuda::Float16Storage>(args, stream); break;
    default:
      throw std::invalid_argument("kd_forward_cuda: unsupported student dtype code " +
                                  std::to_string(static_cast<int>(args.student_dtype)));
  }
  return 0;  // out-of-range labels are reported as NaN rows, not counted (see the file comment)
}

}  // namespace kdfast
