// CUDA kernels of the sparse KD loss against top-k soft labels: the forward pass and the loss
// reduction here, kdfast::sparse_kd_forward_cuda (declared in bindings.cpp); the backward pass,
// kdfast::sparse_kd_backward_cuda, in sparse_kd_backward.cu; what they share in
// sparse_kd_common.cuh.
// Contract: the same as sparse_kd_forward_cpu / sparse_kd_backward_cpu (types.h
// SparseKDForwardArgs / SparseKDBackwardArgs; per-bucket math in sparse_rowmath.h, shared with
// the CPU): row_stats [rows, kSparseRowStats] in float64 with the same columns, the loss in the
// compute dtype ([rows] for reduction none, else one element: sum, mean over valid rows (0 when
// none), batchmean = sum / rows), valid_rows in float64, and the student gradient in the
// student dtype. Two differences from the CPU, as for the dense CUDA kernels: a label outside
// [0, V) that is not ignore_index, or a row of soft-label indices with one outside [0, V) or a
// repeat, is not counted (that would need a host synchronisation); the row's statistics and
// loss are NaN (so a reduced loss is NaN too), its gradient is NaN, nothing is written outside
// the row, and the forward returns zero counts. Everything is enqueued on `stream`; nothing
// synchronises or allocates (CUDA-graph safe). The kept tokens are marked in a per-row bitmap
// of V bits in shared memory (V at most kCudaMaxSparseVocab, types.h: 2^20, 128 KiB); where the
// device's shared memory per block cannot hold it (99 KiB on sm_86 / sm_89: V above about
// 790K), the bitmap covers a window of the row and the row is marked and streamed window by
// window (shared_memory_plan.cuh), at the cost of one more pass over the k indices per window.
//
// Forward (sparse_kd_forward_rows_kernel, one block per row, or on sm_90 with fewer rows than
// multiprocessors a thread-block cluster of up to 8 blocks per row, chosen on the host from the
// compute capability and the kernel's binary: each block marks and streams its share of the
// row's windows, and the blocks' tail statistics are merged in rank order through distributed
// shared memory by the block of rank 0, which finishes the row; sm_80 keeps one block per
// row): the kept indices are checked and
// marked in the shared bitmap, then the student row is streamed once with 16-byte loads (per
// row: scalar head to the first 16-byte boundary, vector body, scalar tail, as the dense
// kernels; next batch in flight); every non-kept element enters the thread's tail log-sum-exp at T and/or at
// 1, relative to the thread's running maximum; the label-smoothing total adds every element.
// The threads' parts are combined in a fixed order, the k kept logits are read back (from L2),
// and the k + 1 bucket terms are formed in double with sparse::bucket_term, as on the CPU. In
// "renormalize" mode without cross-entropy only the kept logits are read. A one-block kernel
// then reduces the row losses in a fixed order (deterministic).
// Backward (sparse_kd_backward_kernel, one block per row): the row is streamed once more and
// every gradient element written once with 16-byte stores by the tail formula; after a block
// barrier the threads overwrite the k kept positions with their own gradient (scattered 2- or
// 4-byte stores to lines the block just wrote). Bytes per element: forward one read of the
// student, backward one read of the student and one write of the gradient.
// One-pass training (args.grad_student set; it must not alias the student): where the rows take
// one block each, sparse_kd_forward_grad_rows_kernel runs the forward row and then the row's
// gradient for grad_output = 1 times the reduction's scale in the same block (the backward
// kernel's sparse_row_gradient, sparse_kd_gradient.cuh: the same bits), rereading the row from
// L2 where it is still there; rows in clusters run the forward kernels, then the backward
// kernel with grad_output 1.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "row_split.cuh"
#include "shared_memory_plan.cuh"
#include "sparse_bitmap.cuh"
#include "sparse_kd_common.cuh"
#include "sparse_kd_gradient.cuh"
#include "topk_cuda_common.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/sparse_rowmath.h"

namespace kdfast {

void sparse_kd_backward_cuda(const SparseKDBackwardArgs& args, int device_index,
                             uintptr_t stream_handle);  // sparse_kd_backward.cu

namespace cuda {
namespace {

struct SparseRowParams {
  const void* student;
  int64_t student_row_stride;
  SoftLabelView soft_labels;
  const int64_t* labels;
  int64_t rows;
  int vocab;
  int bitmap_words;
  int window_groups;  // groups of the row marked and streamed per bitmap window (shared_memory_plan.cuh)
  int cluster_size;   // blocks per row (a thread-block cluster on sm_90; 1 elsewhere)
  int64_t ignore_index;
  SparsePlan plan;
  double temperature;
  bool write_row_losses;
  void* loss;
  double* row_stats;
};

// log Σ_j exp(x_j − max) + max from a block-reduced maximum and sum; −inf for an empty set.
__device__ __forceinline__ double finish_log_sum_exp(double max_value, double sum) {
  if (sum != sum) return sum;
  return sum > 0.0 ? max_value + ::log(sum) : -kInfinity;
}

// Marks the kept indices of `row` that lie in the window [lo, hi) of the row in the bitmap
// (cleared first; bit i - lo for index i); returns true (in every thread) when an index is
// outside [0, vocab) or one in the window is repeated. Every index lies in one window, so the
// windows of a row together find every repeat.
__device__ __forceinline__ bool mark_kept(const SoftLabelView& labels, int64_t row, int vocab, int lo, int hi,
                                          unsigned* bitmap, int bitmap_words) {
  __syncthreads();  // the previous window's readers are done
  for (int w = threadIdx.x; w < bitmap_words; w += blockDim.x) bitmap[w] = 0u;
  __syncthreads();
  bool bad = false;
  for (int j = threadIdx.x; j < labels.k; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * labels.k + j);
    if (index < 0 || index >= vocab) {
      bad = true;
      continue;
    }
    if (index < lo || index >= hi) continue;
    const int offset = static_cast<int>(index) - lo;
    const unsigned bit = 1u << (offset & 31);
    const unsigned old = atomicOr(&bitmap[offset >> 5], bit);
    bad = bad || (old & bit) != 0u;
  }
  return __syncthreads_or(bad ? 1 : 0) != 0;
}

// One block's (or, merged, one row's) tail statistics: the tails' maxima and their sums
// relative to them, the label-smoothing total, the NaN count, and whether a kept index is out
// of range or repeated.
struct TailPart {
  double max_t, sum_t, max_1, sum_1, total, nan_count;
  int bad;
};

// Cluster path: the blocks' parts of a row merged in rank order (maxima, then the sums moved
// onto them, in double) through distributed shared memory into `part` of the block of rank 0.
// Every thread of the cluster calls it; returns true in the block of rank 0.
__device__ __forceinline__ bool merge_cluster_parts(TailPart& part, TailPart* shared_part, double inv_t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (threadIdx.x == 0) *shared_part = part;
  cluster.sync();
  const bool first = cluster.block_rank() == 0;
  if (first && threadIdx.x == 0) {
    const unsigned ranks = cluster.num_blocks();
    TailPart merged{-kInfinity, 0.0, -kInfinity, 0.0, 0.0, 0.0, 0};
    for (unsigned r = 0; r < ranks; ++r) {
      const TailPart* other = cluster.map_shared_rank(shared_part, r);
      merged.max_t = fmax(merged.max_t, other->max_t);
      merged.max_1 = fmax(merged.max_1, other->max_1);
    }
    for (unsigned r = 0; r < ranks; ++r) {
      const TailPart* other = cluster.map_shared_rank(shared_part, r);
      merged.sum_t += other->max_t != -kInfinity ? other->sum_t * ::exp((other->max_t - merged.max_t) * inv_t)
                                                 : other->sum_t;
      merged.sum_1 += other->max_1 != -kInfinity ? other->sum_1 * ::exp(other->max_1 - merged.max_1) : other->sum_1;
      merged.total += other->total;
      merged.nan_count += other->nan_count;
      merged.bad |= other->bad;
    }
    *shared_part = merged;  // read by no other block: they only read their own part
  }
  cluster.sync();  // the other blocks' parts stay readable until rank 0 has merged them
  if (first) part = *shared_part;
  return first;
#else
  (void)part;
  (void)shared_part;
  (void)inv_t;
  __trap();  // the host launches the cluster instance only where sm_90 code runs
  return false;
#endif
}

// One row's forward pass by one block (or, kCluster, by the row's cluster: the blocks of rank
// other than 0 return after the merge): row_stats and, for reduction none, the row loss, written
// by the block's first threads. `bitmap` is the block's dynamic shared memory (bitmap_words
// words). Every thread of the block calls it; it returns (not exits) so that the one-pass
// kernel's block can go on to the gradient after a barrier.
template <class SX, class C, bool kVectorized, bool kCluster>
__device__ __forceinline__ void sparse_forward_row(const SparseRowParams& p, const SparseCoefficients<double>& k,
                                                   unsigned* bitmap) {
  constexpr int kW = BatchLayout<C>::kWidth;
  __shared__ BlockScratch<4> max_scratch;
  __shared__ BlockScratch<7> sum_scratch;
  __shared__ BlockScratch<2> term_scratch;
  __shared__ BlockScratch<4> tail_scratch;
  __shared__ TailPart cluster_part;

  const int ranks = kCluster ? p.cluster_size : 1;
  const int rank = kCluster ? static_cast<int>(blockIdx.x) % ranks : 0;
  const int64_t row = blockIdx.x / ranks;
  double* stats = p.row_stats + row * kSparseRowStats;
  const bool ignored = p.labels != nullptr && p.labels[row] == p.ignore_index;
  const bool bad_label = !ignored && p.labels != nullptr && (p.labels[row] < 0 || p.labels[row] >= p.vocab);
  if (ignored || bad_label) {  // uniform over the row's blocks; the block of rank 0 writes
    const double value = ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    if (rank != 0) return;
    if (threadIdx.x < kSparseRowStats) stats[threadIdx.x] = value;
    if (threadIdx.x == 0 && p.write_row_losses) static_cast<C*>(p.loss)[row] = static_cast<C>(value);
    return;
  }
  const int vocab = p.vocab;
  const int kk = static_cast<int>(p.soft_labels.k);
  const double inv_t = k.inv_temperature;
  const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;

  // Stream the row: tails (non-kept entries) at T and at 1, the total, NaN count; window by
  // window of the bitmap (one window holding the whole row unless shared memory is short).
  // A window covers row elements [lo, hi) (row_split.cuh); a group's bits start at bit first - lo.
  ThreadTail<C> tail_t, tail_1;
  double total = 0.0;
  int nan_count = 0;
  const bool stream = p.plan.tail_at_t || p.plan.tail_at_1 || p.plan.smoothing;
  const int pad = kVectorized ? row_pad<SX>(s_row) : 0;  // the row on the 16-byte grid
  const int groups = (vocab + pad + kW - 1) / kW;
  bool bad = false;
  // Windows rank, rank + ranks, ... (all of them with one block per row); the first window also
  // checks every index against the row (mark_kept), so an empty row is checked too.
  for (int g_lo = rank * p.window_groups; g_lo < groups || g_lo == 0; g_lo += ranks * p.window_groups) {
    const RowWindow window = row_window(g_lo, groups, p.window_groups, pad, vocab, kW);
    const int lo = window.lo;
    bad = mark_kept(p.soft_labels, row, vocab, lo, window.hi, bitmap, p.bitmap_words);
    if (bad) break;  // block-uniform
    if (!stream) continue;
    const ScaledExp<C> exp_over_t(static_cast<C>(inv_t));
    const ScaledExp<C> exp_plain(C(1));
    const ThreadBatches<C> batches(vocab, pad, g_lo, window.g_hi, static_cast<int>(blockDim.x),
                                   static_cast<int>(threadIdx.x));
    stream_batches<SX, SX, C, kVectorized, true>(
        s_row, s_row, vocab, batches, false, [&](const C* s, const C*, const int* first, auto) {
          const unsigned word = kept_bits(bitmap, p.bitmap_words, first[0] - lo);
          C x[kW];
#pragma unroll
          for (int e = 0; e < kW; ++e) {
            const bool inside = in_row(first[0] + e, vocab);
            const bool is_nan = s[e] != s[e];
            nan_count += inside && is_nan ? 1 : 0;
            if (p.plan.smoothing && inside) total += static_cast<double>(s[e]);
            x[e] = ((word >> e) & 1u) || is_nan ? negative_infinity<C>() : s[e];
          }
          if (p.plan.tail_at_t) tail_t.add(x, exp_over_t);
          if (p.plan.tail_at_1) tail_1.add(x, exp_plain);
        });
  }

  // The block's tails (maxima, then the sums moved onto them), and in a cluster the row's.
  TailPart part;
  {
    double tail_maxima[2] = {static_cast<double>(tail_t.max_value), static_cast<double>(tail_1.max_value)};
    block_reduce(tail_maxima, term_scratch, MaxOp{});
    double tail_sums[4] = {0.0, 0.0, total, static_cast<double>(nan_count)};
    if (tail_t.max_value != negative_infinity<C>()) {
      tail_sums[0] =
          static_cast<double>(tail_t.sum) * ::exp((static_cast<double>(tail_t.max_value) - tail_maxima[0]) * inv_t);
    }
    if (tail_1.max_value != negative_infinity<C>()) {
      tail_sums[1] = static_cast<double>(tail_1.sum) * ::exp(static_cast<double>(tail_1.max_value) - tail_maxima[1]);
    }
    block_reduce(tail_sums, tail_scratch, SumOp{});
    part = TailPart{tail_maxima[0], tail_sums[0], tail_maxima[1], tail_sums[1], tail_sums[2], tail_sums[3], bad ? 1 : 0};
  }
  if constexpr (kCluster) {
    if (!merge_cluster_parts(part, &cluster_part, inv_t)) return;  // the other blocks are done
  }
  if (part.bad != 0) {  // block-uniform
    if (threadIdx.x < kSparseRowStats) stats[threadIdx.x] = std::numeric_limits<double>::quiet_NaN();
    if (threadIdx.x == 0 && p.write_row_losses) static_cast<C*>(p.loss)[row] = std::numeric_limits<C>::quiet_NaN();
    return;
  }

  // The kept logits (read back; a thread handles slots j = threadIdx.x + i * blockDim.x).
  const SoftLabelView& labels = p.soft_labels;
  double kept_max = -kInfinity, teacher_max = -kInfinity;
  for (int j = threadIdx.x; j < kk; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    kept_max = fmax(kept_max, static_cast<double>(SX::to_compute(load_element<SX>(s_row + index))));
    if (k.need_kd) teacher_max = fmax(teacher_max, sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j));
  }
  double maxima[4] = {part.max_t, part.max_1, kept_max, teacher_max};
  block_reduce(maxima, max_scratch, MaxOp{});
  // The log-normalisers are relative to the largest student logit the row reads (as on the CPU).
  const bool streamed = p.plan.tail_at_t || p.plan.tail_at_1;
  const double tail_max = streamed ? fmax(maxima[0], maxima[1]) : -kInfinity;
  const double kd_reference = sparse::reference_logit(maxima[2], k.bucket ? tail_max : -kInfinity);
  const double reference = sparse::reference_logit(maxima[2], tail_max);
  // The row's tail sums and counts enter once (from thread 0: the block sum adds zeros to them).
  const bool lead = threadIdx.x == 0;
  double sums[7] = {lead ? part.sum_t : 0.0, lead ? part.sum_1 : 0.0, 0.0, 0.0, 0.0, lead ? part.total : 0.0,
                    lead ? part.nan_count : 0.0};
  for (int j = threadIdx.x; j < kk; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    const double logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + index)));
    sums[2] += ::exp((logit - kd_reference) * inv_t);
    sums[3] += ::exp(logit - reference);
    if (k.need_kd) {  // relative to the largest (0 when none is finite: -inf stays -inf, NaN stays NaN)
      const double shift = maxima[3] == -kInfinity ? 0.0 : maxima[3];
      sums[4] += ::exp(sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j) - shift);
    }
  }
  block_reduce(sums, sum_scratch, SumOp{});

  const double tail_lse_t =
      p.plan.tail_at_t ? finish_log_sum_exp((maxima[0] - kd_reference) * inv_t, sums[0]) : -kInfinity;
  const double lse_kept_t = finish_log_sum_exp(0.0, sums[2]);
  const double student_norm = k.bucket ? sparse::log_add_exp(lse_kept_t, tail_lse_t) : lse_kept_t;
  double lse_1 = student_norm;  // T == 1 in bucket mode: the full row's log-sum-exp at T
  if (p.plan.tail_at_1) {
    lse_1 = sparse::log_add_exp(finish_log_sum_exp(0.0, sums[3]), finish_log_sum_exp(maxima[1] - reference, sums[1]));
  }

  double divergence = 0.0, g_bar = 0.0, tail_coeff = 0.0, teacher_norm = 0.0;
  if (k.need_kd) {
    const double teacher_tail = k.bucket ? sparse::load_value<double>(labels.tail_logprob, labels.tail_dtype, row) : -kInfinity;
    teacher_norm = sparse::log_add_exp(finish_log_sum_exp(maxima[3] == -kInfinity ? 0.0 : maxima[3], sums[4]),
                                       teacher_tail);
    double terms[2] = {0.0, 0.0};
    for (int j = threadIdx.x; j < kk; j += blockDim.x) {
      const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
      const double logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + index)));
      const double log_p = sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j) - teacher_norm;
      const auto term =
          sparse::bucket_term<double>(log_p, (logit - kd_reference) * inv_t - student_norm, k.divergence, k.beta);
      terms[0] += term.divergence;
      terms[1] += term.weight;
    }
    block_reduce(terms, term_scratch, SumOp{});
    divergence = terms[0];
    g_bar = terms[1];
    if (k.bucket) {
      const double log_q_tail = tail_lse_t - student_norm;
      const auto term = sparse::bucket_term<double>(teacher_tail - teacher_norm, log_q_tail, k.divergence, k.beta);
      divergence += term.divergence;
      g_bar += term.weight;
      const double q_tail = log_q_tail == -kInfinity ? 0.0 : ::exp(log_q_tail);
      tail_coeff = term.weight - g_bar * q_tail;
    }
  }
  if (threadIdx.x != 0) return;
  double ce = 0.0;
  if (k.need_ce) {
    const double label_logit =
        static_cast<double>(SX::to_compute(load_element<SX>(s_row + p.labels[row]))) - reference;
    const double eps = k.label_smoothing;
    ce = -(1.0 - eps) * (label_logit - lse_1);
    if (eps > 0.0) ce -= eps * ((sums[5] / static_cast<double>(vocab) - reference) - lse_1);
  }
  double loss = 0.0;
  if (k.need_ce) loss += k.alpha * ce;
  if (k.need_kd) loss += (1.0 - k.alpha) * k.divergence_scale * divergence;
  // NaN in, NaN out (sparse::row_defined); the backward pass then writes a NaN gradient row.
  if (!sparse::row_defined(k, static_cast<int64_t>(sums[6]), student_norm, teacher_norm, lse_1)) {
    loss = std::numeric_limits<double>::quiet_NaN();
  }

  stats[0] = tail_max;
  stats[1] = p.plan.tail_at_t && sums[0] > 0.0 ? ::log(sums[0]) : (sums[0] != sums[0] ? sums[0] : -kInfinity);
  stats[2] = student_norm;
  stats[3] = lse_1;
  stats[4] = teacher_norm;
  stats[5] = g_bar;
  stats[6] = tail_coeff;
  stats[7] = loss;
  if (p.write_row_losses) static_cast<C*>(p.loss)[row] = static_cast<C>(loss);
}

template <class SX, class C, bool kVectorized, bool kCluster>
__global__ void __launch_bounds__(kSparseMaxBlock)
    sparse_kd_forward_rows_kernel(SparseRowParams p, SparseCoefficients<double> k) {
  extern __shared__ unsigned bitmap[];
  sparse_forward_row<SX, C, kVectorized, kCluster>(p, k, bitmap);
}

// The one-pass training kernel (CUDA twin of the CPU's sparse forward with grad_student): one
// block per row runs the forward pass, then, after a barrier (the row's statistics, written to
// row_stats by its first threads, are then visible to the block), the row's gradient for
// grad_output = 1 times the reduction's scale (sparse_row_gradient, as the backward kernel
// computes it: the same bits), while the row it has just read is still in L2. valid_rows is
// counted ahead of it for reduction mean (the one reduction whose scale reads it).
template <class SX, class C, bool kVectorized>
__global__ void __launch_bounds__(kSparseMaxBlock)
    sparse_kd_forward_grad_rows_kernel(SparseRowParams p, SparseGradientParams g, SparseCoefficients<double> k) {
  extern __shared__ unsigned bitmap[];
  sparse_forward_row<SX, C, kVectorized, false>(p, k, bitmap);
  __syncthreads();
  sparse_row_gradient<SX, C, kVectorized>(g, k, static_cast<int64_t>(blockIdx.x),
                                          reduction_scale<double>(g.reduction, g.valid_rows, g.rows));
}

constexpr int kSparseReduceThreads = 1024;

// One block: the reduced loss from row_stats[:, 7] (fixed order, double accumulator) and the
// number of valid rows. With reduction none only valid_rows is written.
template <class C>
__global__ void __launch_bounds__(kSparseReduceThreads)
    sparse_kd_reduce_kernel(const double* row_stats, const int64_t* labels, int64_t rows, int64_t ignore_index,
                            Reduction reduction, C* loss, double* valid_rows) {
  double total = 0.0, valid = 0.0;
  const bool want_total = reduction != Reduction::None;
  for (int64_t row = threadIdx.x; row < rows; row += kSparseReduceThreads) {
    if (want_total) total += row_stats[row * kSparseRowStats + kSparseLossColumn];
    valid += (labels == nullptr || labels[row] != ignore_index) ? 1.0 : 0.0;
  }
  __shared__ double scratch[kSparseReduceThreads / 32][2];
  double values[2] = {total, valid};
  team_all_reduce(values, scratch, kSparseReduceThreads, SumOp{});
  if (threadIdx.x != 0) return;
  if (want_total) {
    double value = values[0];
    if (reduction == Reduction::Mean) value = values[1] > 0.0 ? values[0] / values[1] : 0.0;
    if (reduction == Reduction::BatchMean) value = rows > 0 ? values[0] / static_cast<double>(rows) : 0.0;
    *loss = static_cast<C>(value);
  }
  *valid_rows = values[1];
}

// ---------------------------------------------------------------- launch helpers

inline void check_sparse_vocab(int64_t vocab, const char* function) {
  if (vocab > kCudaMaxSparseVocab) {
    throw std::invalid_argument(std::string(function) + ": vocabulary size " + std::to_string(vocab) +
                                " exceeds the kernel's limit " + std::to_string(kCudaMaxSparseVocab));
  }
}

// Static shared memory the forward kernel is granted besides its bitmap (its scratch is about
// 1.6 KiB in double; the rest is headroom).
constexpr size_t kSparseForwardStaticBytes = 4096;

// The device's shared memory per block (opt-in limit) and whether it runs this file's sm_90
// code (thread-block clusters): compute capability 9 or more and an sm_90 (or newer) binary of
// `kernel` rather than one compiled for an older architecture.
struct SparseDevice {
  int shared_limit;
  bool clusters;
};

inline SparseDevice sparse_device(const void* cluster_kernel) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  SparseDevice d{0, false};
  check_cuda(cudaDeviceGetAttribute(&d.shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  if (major >= 9) {
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, cluster_kernel), "cudaFuncGetAttributes");
    d.clusters = attributes.binaryVersion >= 90;
  }
  return d;
}

// How the forward kernel covers the rows: threads per block, blocks per row (a thread-block
// cluster on sm_90 for few long rows, else 1), the bitmap's words and windows and the dynamic
// shared memory they take.
struct SparseForwardLayout {
  int block;
  int cluster_size;
  int bitmap_words;
  int window_groups;
  size_t shared_bytes;
};

template <class SX, class C, bool kVectorized>
SparseForwardLayout sparse_forward_layout(int64_t rows, int64_t vocab) {
  const int block = sparse_block_size(vocab);
  auto cluster_kernel = sparse_kd_forward_rows_kernel<SX, C, kVectorized, true>;
  const SparseDevice device = sparse_device(reinterpret_cast<const void*>(cluster_kernel));
  const size_t limit = static_cast<size_t>(device.shared_limit);
  // Few long rows on sm_90: a cluster of blocks per row, each streaming its share of the
  // windows, merged through distributed shared memory; else one block per row.
  const int cluster = device.clusters ? sparse_cluster_size(rows, vocab, block, kGroupWidth<C>,
                                                            multiprocessor_count())
                                      : 1;
  const SparseBitmapPlan plan =
      plan_sparse_cluster(vocab, block, kGroupWidth<C>, kSparseForwardStaticBytes, limit, cluster);
  if (!plan.fits) {
    throw std::invalid_argument("sparse_kd_loss (CUDA): the device offers " + std::to_string(limit) +
                                " bytes of shared memory per block, too few for one bitmap window of kept tokens");
  }
  return SparseForwardLayout{block, cluster > 1 && plan.windows > 1 ? cluster : 1, plan.bitmap_words,
                             plan.window_groups, plan.dynamic_bytes};
}

template <class SX, class C, bool kVectorized>
void launch_sparse_forward(SparseRowParams p, const SparseForwardLayout& layout, const SparseCoefficients<double>& k,
                           int64_t rows, cudaStream_t stream) {
  p.bitmap_words = layout.bitmap_words;
  p.window_groups = layout.window_groups;
  p.cluster_size = layout.cluster_size;
  if (p.cluster_size == 1) {
    auto plain_kernel = sparse_kd_forward_rows_kernel<SX, C, kVectorized, false>;
    allow_dynamic_shared_memory(reinterpret_cast<const void*>(plain_kernel), layout.shared_bytes);
    plain_kernel<<<static_cast<unsigned>(rows), layout.block, layout.shared_bytes, stream>>>(p, k);
    check_launch("sparse_kd_forward_rows_kernel");
    return;
  }
  auto cluster_kernel = sparse_kd_forward_rows_kernel<SX, C, kVectorized, true>;
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(cluster_kernel), layout.shared_bytes);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(rows * p.cluster_size));
  config.blockDim = dim3(static_cast<unsigned>(layout.block));
  config.dynamicSmemBytes = layout.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(p.cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&config, cluster_kernel, p, k), "sparse_kd_forward_rows_kernel (cluster)");
}

// The one-pass kernel over every row, one block each (layout.cluster_size is 1).
template <class SX, class C, bool kVectorized>
void launch_sparse_forward_grad(SparseRowParams p, const SparseGradientParams& gradient,
                                const SparseForwardLayout& layout, const SparseCoefficients<double>& k, int64_t rows,
                                cudaStream_t stream) {
  p.bitmap_words = layout.bitmap_words;
  p.window_groups = layout.window_groups;
  p.cluster_size = 1;
  auto kernel = sparse_kd_forward_grad_rows_kernel<SX, C, kVectorized>;
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), layout.shared_bytes);
  kernel<<<static_cast<unsigned>(rows), layout.block, layout.shared_bytes, stream>>>(p, gradient, k);
  check_launch("sparse_kd_forward_grad_rows_kernel");
}

template <class C>
void launch_reduce(const SparseKDForwardArgs& args, Reduction reduction, cudaStream_t stream) {
  sparse_kd_reduce_kernel<C><<<1, kSparseReduceThreads, 0, stream>>>(
      args.row_stats, args.labels, args.rows, args.options.ignore_index, reduction, static_cast<C*>(args.loss),
      args.valid_rows);
  check_launch("sparse_kd_reduce_kernel");
}

// The forward pass; with args.grad_student also the gradient for grad_output = 1: the one-pass
// kernel where the rows take one block each, else (few long rows in clusters) the backward
// kernel after the forward kernels.
template <class SX, class C>
void sparse_forward_typed(const SparseKDForwardArgs& args, cudaStream_t stream) {
  const SparseCoefficients<double> k = sparse::make_sparse_coefficients<double>(args.options, args.tail);
  bool gradient_written = args.grad_student == nullptr || args.rows == 0;
  if (args.rows > 0) {
    SparseRowParams p;
    p.student = args.student;
    p.student_row_stride = args.student_row_stride;
    p.soft_labels = args.soft_labels;
    p.labels = args.labels;
    p.rows = args.rows;
    p.vocab = static_cast<int>(args.vocab);
    p.ignore_index = args.options.ignore_index;
    p.plan = make_plan(k, args.options.temperature);
    p.temperature = args.options.temperature;
    p.write_row_losses = args.options.reduction == Reduction::None;
    p.loss = args.loss;
    p.row_stats = args.row_stats;
    if (args.rows > int64_t(0x7fffffff)) throw std::invalid_argument("sparse_kd_forward (CUDA): too many rows for one launch");
    // The one-pass kernel also needs the gradient rows on the student's 16-byte pad.
    const bool vectorized = rows_vectorizable<SX, C>(args.student, args.student_row_stride, args.grad_student,
                                                     args.vocab, args.rows);
    const SparseForwardLayout layout = vectorized ? sparse_forward_layout<SX, C, true>(args.rows, args.vocab)
                                                  : sparse_forward_layout<SX, C, false>(args.rows, args.vocab);
    if (args.grad_student != nullptr && layout.cluster_size == 1) {
      if (args.options.reduction == Reduction::Mean) launch_reduce<C>(args, Reduction::None, stream);
      const SparseGradientParams gradient =
          make_gradient_params(args, k, args.row_stats, args.valid_rows, args.grad_student);
      if (vectorized) launch_sparse_forward_grad<SX, C, true>(p, gradient, layout, k, args.rows, stream);
      else launch_sparse_forward_grad<SX, C, false>(p, gradient, layout, k, args.rows, stream);
      gradient_written = true;
    } else if (vectorized) {
      launch_sparse_forward<SX, C, true>(p, layout, k, args.rows, stream);
    } else {
      launch_sparse_forward<SX, C, false>(p, layout, k, args.rows, stream);
    }
  }
  launch_reduce<C>(args, args.options.reduction, stream);
  if (!gradient_written) {  // the gradient for grad_output = 1 by the backward kernel (nullptr: 1)
    SparseKDBackwardArgs backward;
    static_cast<SparseKDInputs&>(backward) = args;
    backward.grad_output = nullptr;
    backward.grad_output_stride = 0;
    backward.row_stats = args.row_stats;
    backward.valid_rows = args.valid_rows;
    backward.grad_student = args.grad_student;
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    sparse_kd_backward_cuda(backward, device, reinterpret_cast<uintptr_t>(stream));
  }
}

}  // namespace
}  // namespace cuda

SparseKDForwardResult sparse_kd_forward_cuda(const SparseKDForwardArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "sparse_kd_forward (CUDA)");
  cuda::DeviceGuard guard(device_index);
  cuda::check_sparse_vocab(args.vocab, "sparse_kd_loss (CUDA)");
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.student_dtype) {
    case DType::Float32: cuda::sparse_forward_typed<cuda::Float32Storage, float>(args, stream); break;
    case DType::BFloat16: cuda::sparse_forward_typed<cuda::BFloat16Storage, float>(args, stream); break;
    case DType::Float16: cuda::sparse_forward_typed<cuda::Float16Storage, float>(args, stream); break;
    case DType::Float64: cuda::sparse_forward_typed<cuda::Float64Storage, double>(args, stream); break;
    default:
      throw std::invalid_argument("sparse_kd_forward (CUDA): unsupported student dtype code " +
                                  std::to_string(static_cast<int>(args.student_dtype)));
  }
  return SparseKDForwardResult{0, 0};  // bad rows are NaN rows, not counted (see the file comment)
}

}  // namespace kdfast
