// CUDA forward pass of the dense KD loss: kdfast::kd_forward_cuda (declared in bindings.cpp).
// Contract: the same as kd_forward_cpu (types.h, rowmath.h): row_stats[row] = the six
// rowmath::RowStats values (maxima of t and s; log-sums of exp((t - max)/T), exp((s - max)/T)
// and exp(s - max); aux), the row loss, then zeros (float reverse_kl: aux and column 7 as
// kd_loss_cuda_rows.cuh states); `loss` = the per-row losses (reduction
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
// 16-byte boundary, vector body, scalar tail; kd_loss_cuda_layout.cuh), with 16-bit inputs one
// batch of loads in flight per thread while it computes the previous one (float32 batches are
// loaded, then computed: holding them would spill at 64 registers), keeping per-thread running maxima and sums
// relative to them (accumulate_batch, kd_loss_cuda_rows.cuh); the team then combines them
// (maxima first, then every thread's sums moved onto them with rebase_row_partial and added)
// and finishes the row (finish_row_stats, rowmath's cross_entropy and combine_loss). JSD and
// TVD sweep the row a second time (jsd_terms / tvd_terms), mostly from L1/L2. Bytes per
// element: one read of the student and of the teacher logits (no teacher read when alpha ==
// 1); JSD/TVD read them twice. (1b) kd_forward_cluster_kernel (compute capability 9.0 and
// newer, few long rows, forward_clusters): the same per chunk of a row, one block per chunk,
// the row's blocks forming a thread-block cluster that merges their partials through
// distributed shared memory. (2) kd_forward_reduce_kernel: one block sums the row losses in a fixed order (double
// accumulator: deterministic) into the reduced loss and counts the valid rows.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kd_loss_cuda_common.cuh"
#include "kd_loss_cuda_gradient.cuh"
#include "kd_loss_cuda_rows.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/rowmath.h"

namespace kdfast {

void kd_backward_cuda(const KDBackwardArgs& args, int device_index, uintptr_t stream_handle);  // kd_loss_backward.cu

namespace cuda {

namespace {

// A value of the current device, made by make(device) on the first call for that device and
// cached (T{} marks "not made yet"; make must not return it), so that later calls, also inside
// CUDA graph capture, make no runtime query besides cudaGetDevice.
template <class T, class Make>
T per_device(std::vector<T>& cache, std::mutex& mutex, Make&& make) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(cache.size()) <= device) cache.resize(static_cast<size_t>(device) + 1, T{});
  if (cache[device] == T{}) cache[device] = make(device);
  return cache[device];
}

// One attribute of the current device, queried once per device (at least 1).
int cached_device_attribute(cudaDeviceAttr attribute, std::vector<int>& cache, std::mutex& mutex) {
  return per_device(cache, mutex, [attribute](int device) {
    int value = 0;
    check_cuda(cudaDeviceGetAttribute(&value, attribute, device), "cudaDeviceGetAttribute");
    return value > 0 ? value : 1;
  });
}

// Major compute capability of the current device (9 for sm_90).
int compute_capability_major() {
  static std::mutex mutex;
  static std::vector<int> majors;
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, majors, mutex);
}

// Whether the forward pass may split few long rows over clusters: KDFAST_CUDA_CLUSTERS=never
// turns it off (any other value, or none, leaves forward_clusters to decide). Read per call.
bool clusters_allowed() {
  const char* setting = std::getenv("KDFAST_CUDA_CLUSTERS");
  return setting == nullptr || std::strcmp(setting, "never") != 0;
}

}  // namespace

int multiprocessor_count() {
  static std::mutex mutex;
  static std::vector<int> counts;
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, counts, mutex);
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
  int chunk_groups;  // kd_forward_cluster_kernel: groups per block (forward_clusters)
  int64_t ignore_index;
  bool write_row_losses;  // reduction none: loss[row] = row loss
  void* loss;
  void* row_stats;
  // kd_forward_grad_rows_kernel only: the gradient for grad_output = 1 ([rows, vocab],
  // contiguous), the reduction and the valid-row count it scales by (written before the launch).
  void* grad_student;
  Reduction reduction;
  const void* valid_rows;
};

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
// maxima first, then each thread's sums moved onto them (rebase_row_partial) and added.
template <int kWarps, class C>
__device__ __forceinline__ RowPartial<C> team_row_partial(RowPartial<C> part, const Coefficients<C>& k, int team,
                                                          C (&max_scratch)[kWarps][2],
                                                          C (&sum_scratch)[kWarps][6]) {
  C maxima[2] = {part.teacher_max, part.student_max};
  team_all_reduce(maxima, max_scratch, team, MaxOp{});
  rebase_row_partial<kReverseKLOffsets<C>>(part, maxima[0], maxima[1], k);
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
static_assert(kForwardClusterBlock == kMaxRowsBlock, "a cluster's block is one team of the largest size");

// What every thread of a row's team (or cluster) knows about the row before it streams it.
template <class SX, class TX, class C>
struct RowSetup {
  int64_t label;
  bool ignored, bad_label;
  int vocab;  // 0 for rows without work (ignored, bad label, out of range)
  const typename SX::Raw* s_row;
  const typename TX::Raw* t_row;
  int pad;
  bool offsets;  // reverse_kl's offsets (kd_loss_cuda_rows.cuh)
  ReverseKLRefs<C> refs;
};

template <class SX, class TX, class C, bool kVectorized>
__device__ __forceinline__ RowSetup<SX, TX, C> setup_row(const ForwardRowsParams& p, const Coefficients<C>& k,
                                                         int64_t row) {
  RowSetup<SX, TX, C> r;
  const bool in_range = row < p.rows;
  r.label = 0;
  r.ignored = !in_range;
  r.bad_label = false;
  if (in_range && p.labels != nullptr) {
    r.label = p.labels[row];
    r.ignored = r.label == p.ignore_index;
    r.bad_label = !r.ignored && (r.label < 0 || r.label >= p.vocab);
  }
  const bool computed = !r.ignored && !r.bad_label;
  // Rows without work still take part in the team reductions (block-wide barriers).
  r.vocab = computed ? p.vocab : 0;
  r.s_row = static_cast<const typename SX::Raw*>(p.student) + (computed ? row * p.student_row_stride : 0);
  r.t_row = static_cast<const typename TX::Raw*>(p.teacher) + (computed ? row * p.teacher_row_stride : 0);
  // Vectorised: the row's groups lie on the 16-byte grid (the host checked that the teacher row
  // has the same pad whenever it is read).
  r.pad = 0;
  if (kVectorized && r.vocab > 0) {
    r.pad = row_pad<SX>(r.s_row);
    if (k.need_kd && row_pad<TX>(r.t_row) > r.pad) r.pad = row_pad<TX>(r.t_row);
  }
  // reverse_kl's references: the row's first logits.
  r.offsets = uses_reverse_kl_offsets<kReverseKLOffsets<C>>(k) && r.vocab > 0;
  r.refs = reverse_kl_refs(r.offsets ? SX::to_compute(load_element<SX>(r.s_row)) : C(0),
                           r.offsets ? TX::to_compute(load_element<TX>(r.t_row)) : C(0), k.diff_scale);
  return r;
}

// Streams the thread's batches of the row into its running statistics (kPrefetch: registers
// for the next batch's loads, kd_loss_cuda_common.cuh's kPrefetchBatches).
template <class SX, class TX, class C, bool kVectorized, int kPrefetch>
__device__ __forceinline__ RowPartial<C> stream_row(const RowSetup<SX, TX, C>& r, const ThreadBatches<C>& batches,
                                                    const Coefficients<C>& k) {
  RowPartial<C> part = rowmath::empty_partial<C>();
  stream_batches<SX, TX, C, kVectorized, true, kPrefetch>(r.s_row, r.t_row, r.vocab, batches, k.need_kd,
                                               [&](const C* s, const C* t, const int* first, auto partial) {
                                                 accumulate_batch<ScaledExp, kReverseKLOffsets<C>,
                                                                  decltype(partial)::value>(part, s, t, first,
                                                                                            r.vocab, k, r.refs);
                                               });
  return part;
}

// JSD / TVD: the thread's sums of the second sweep (sweep_batch) over its batches.
template <class SX, class TX, class C, bool kVectorized, int kPrefetch>
__device__ __forceinline__ void sweep_row(const RowSetup<SX, TX, C>& r, const ThreadBatches<C>& batches,
                                          const Coefficients<C>& k, const RowStats<C>& stats, C (&acc)[2]) {
  stream_batches<SX, TX, C, kVectorized, true, kPrefetch>(r.s_row, r.t_row, r.vocab, batches, true,
                                               [&](const C* s, const C* t, const int*, auto) {
                                                 sweep_batch(s, t, k, stats, acc[0], acc[1]);
                                               });
}

// The row's outputs (one thread per row): row_stats, the row loss (reduction none).
template <class SX, class TX, class C>
__device__ __forceinline__ void write_row_outputs(const ForwardRowsParams& p, const Coefficients<C>& k, int64_t row,
                                                  const RowSetup<SX, TX, C>& r, const RowPartial<C>& row_part,
                                                  const RowStats<C>& stats, double divergence) {
  C* stats_out = static_cast<C*>(p.row_stats) + row * kRowStats;
  C row_loss = C(0);
  if (r.ignored) {
    for (int j = 0; j < kRowStats; ++j) stats_out[j] = C(0);
  } else if (r.bad_label) {
    row_loss = quiet_nan<C>();
    for (int j = 0; j < kRowStats; ++j) stats_out[j] = row_loss;
  } else {
    double ce = 0.0;
    if (k.need_ce && p.labels != nullptr) {
      const double label_logit = static_cast<double>(SX::to_compute(load_element<SX>(r.s_row + r.label))) -
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
    // s_ref (reloaded rather than kept in a register through the streaming).
    if (r.offsets) stats_out[kStudentRefColumn] = finite_or_zero(SX::to_compute(load_element<SX>(r.s_row)));
  }
  if (p.write_row_losses) static_cast<C*>(p.loss)[row] = row_loss;
}

// One row per team: setup, statistics sweep, team merge, finishing (JSD / TVD: the second sweep),
// and lane 0 writes the row's outputs. Every thread of the block reaches the team barriers,
// rows past the end included. kPrefetch: as stream_row.
template <class SX, class TX, class C, bool kVectorized, int kPrefetch>
__device__ __forceinline__ void forward_row(const ForwardRowsParams& p, const Coefficients<C>& k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  constexpr int kWarps = kMaxRowsBlock / 32;
  __shared__ C max_scratch[kWarps][2];
  __shared__ C sum_scratch[kWarps][6];
  __shared__ C sweep_scratch[kWarps][2];

  const int team = p.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const RowSetup<SX, TX, C> r = setup_row<SX, TX, C, kVectorized>(p, k, row);
  const int groups = (r.vocab + r.pad + kW - 1) / kW;
  const ThreadBatches<C> batches(r.vocab, r.pad, 0, groups, team, lane);
  const RowPartial<C> part = stream_row<SX, TX, C, kVectorized, kPrefetch>(r, batches, k);

  const RowPartial<C> row_part = team_row_partial(part, k, team, max_scratch, sum_scratch);
  double divergence = 0.0;
  RowStats<C> stats = finish_row_stats<kReverseKLOffsets<C>>(row_part, k, r.refs, &divergence);

  if (k.need_kd && (k.divergence == Divergence::JSD || k.divergence == Divergence::TVD)) {
    C acc[2] = {C(0), C(0)};
    sweep_row<SX, TX, C, kVectorized, kPrefetch>(r, batches, k, stats, acc);
    team_all_reduce(acc, sweep_scratch, team, SumOp{});
    divergence = static_cast<double>(k.divergence == Divergence::JSD ? rowmath::finish_jsd(acc[0], acc[1], k, stats)
                                                                      : rowmath::finish_tvd(acc[0], acc[1], stats));
  }
  if (row < p.rows && lane == 0) write_row_outputs(p, k, row, r, row_part, stats, divergence);
}

template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kMaxRowsBlock, 1) kd_forward_rows_kernel(ForwardRowsParams p, Coefficients<C> k) {
  forward_row<SX, TX, C, kVectorized, kPrefetchNarrowBatches>(p, k);
}

// Blocks of the one-pass kernel: at most 512 threads (its rows get teams of up to 512 threads:
// forward_team_size with at least twice as many rows as multiprocessors), so that it may use
// up to 128 registers, as the backward kernel's gradient loop needs (at 64 it spills in every
// loop; benches/cuda_resources.py --sass).
constexpr int kMaxGradRowsBlock = 512;

// The one-pass training kernel (CUDA twin of the CPU's forward_grad_impl): forward_row, then
// the same team writes the row's gradient for grad_output = 1 times the reduction's scale
// (write_row_gradient, as kd_backward_kernel computes it) right after, while the row it has
// just read is in L1/L2 (for rows whose two logits rows fit the cache share of a team). The
// row's statistics reach the team through row_stats (written by lane 0, visible to the block
// after the barrier). The gradient, student and teacher rows share one pad (host-checked);
// the gradient never aliases the student (in place is CPU-only), so loads take the read-only
// path.
template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kMaxGradRowsBlock, 1) kd_forward_grad_rows_kernel(ForwardRowsParams p,
                                                                                   Coefficients<C> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  forward_row<SX, TX, C, kVectorized, kPrefetchAnyBatch>(p, k);
  __syncthreads();  // row_stats of the block's rows, written by their lanes 0
  const int team = p.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  if (row >= p.rows) return;  // no barriers below
  const int vocab = p.vocab;
  const GradientRows<SX, TX> rows = gradient_rows<SX, TX, C, kVectorized>(
      p.grad_student, p.student, p.student_row_stride, p.teacher, p.teacher_row_stride, row, vocab, k);
  const ThreadBatches<C> batches(vocab, rows.pad, 0, (vocab + rows.pad + kW - 1) / kW, team, lane);
  const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  const bool ignored = p.labels != nullptr && label == p.ignore_index;
  const C* st = static_cast<const C*>(p.row_stats) + row * kRowStats;
  const double g = reduction_scale<C>(p.reduction, p.valid_rows, p.rows);
  write_row_gradient<SX, TX, C, kVectorized, true>(rows.g, rows.s, rows.t, vocab, batches, st, ignored, label,
                                                   p.labels != nullptr, g, k);
}

// Few long rows on sm_90 and newer (forward_clusters): block `rank` of a row's cluster streams
// chunk `rank` of the row with all its threads; the blocks' partials meet in distributed shared
// memory, where every block merges them in rank order (merge_row_partials), so that all hold
// the same row statistics; JSD and TVD then sweep their chunks a second time, and block 0 adds
// the sweeps in rank order and writes the row's results. The sums are added in another order
// than the one-block kernel's, so a row's loss can differ in its last bits between the two
// launches (never between runs of one shape). No workspace: graph-capturable like the rest.
template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kForwardClusterBlock, 1)
    kd_forward_cluster_kernel(ForwardRowsParams p, Coefficients<C> k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kW = BatchLayout<C>::kWidth;
  constexpr int kWarps = kForwardClusterBlock / 32;
  __shared__ C max_scratch[kWarps][2];
  __shared__ C sum_scratch[kWarps][6];
  __shared__ C sweep_scratch[kWarps][2];
  __shared__ RowPartial<C> chunk_partial;  // this block's, read by every block of the cluster
  __shared__ C chunk_sweep[2];             // this block's JSD / TVD sums, read by block 0

  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int size = static_cast<int>(cluster.num_blocks());
  const int64_t row = static_cast<int64_t>(blockIdx.x) / size;  // the grid holds rows × size blocks
  const RowSetup<SX, TX, C> r = setup_row<SX, TX, C, kVectorized>(p, k, row);
  const int groups = (r.vocab + r.pad + kW - 1) / kW;
  const int first_group = rank * p.chunk_groups;
  const int end_group = first_group + p.chunk_groups < groups ? first_group + p.chunk_groups : groups;
  const ThreadBatches<C> batches(r.vocab, r.pad, first_group, end_group, kForwardClusterBlock,
                                 static_cast<int>(threadIdx.x));
  const RowPartial<C> part = stream_row<SX, TX, C, kVectorized, kPrefetchNarrowBatches>(r, batches, k);
  const RowPartial<C> block_part = team_row_partial(part, k, kForwardClusterBlock, max_scratch, sum_scratch);
  if (threadIdx.x == 0) chunk_partial = block_part;
  cluster.sync();
  RowPartial<C> row_part = *cluster.map_shared_rank(&chunk_partial, 0);
  for (int b = 1; b < size; ++b) {
    merge_row_partials<kReverseKLOffsets<C>>(row_part, *cluster.map_shared_rank(&chunk_partial, b), k);
  }
  double divergence = 0.0;
  RowStats<C> stats = finish_row_stats<kReverseKLOffsets<C>>(row_part, k, r.refs, &divergence);
  if (k.need_kd && (k.divergence == Divergence::JSD || k.divergence == Divergence::TVD)) {
    C acc[2] = {C(0), C(0)};
    sweep_row<SX, TX, C, kVectorized, kPrefetchNarrowBatches>(r, batches, k, stats, acc);
    team_all_reduce(acc, sweep_scratch, kForwardClusterBlock, SumOp{});
    if (threadIdx.x == 0) {
      chunk_sweep[0] = acc[0];
      chunk_sweep[1] = acc[1];
    }
    cluster.sync();
    if (rank == 0 && threadIdx.x == 0) {
      for (int b = 1; b < size; ++b) {
        const C* other = cluster.map_shared_rank(chunk_sweep, b);
        acc[0] += other[0];
        acc[1] += other[1];
      }
      divergence = static_cast<double>(k.divergence == Divergence::JSD ? rowmath::finish_jsd(acc[0], acc[1], k, stats)
                                                                        : rowmath::finish_tvd(acc[0], acc[1], stats));
    }
  }
  if (rank == 0 && threadIdx.x == 0 && row < p.rows) write_row_outputs(p, k, row, r, row_part, stats, divergence);
  cluster.sync();  // no block leaves while another may still read its shared memory
#endif
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

// kd_forward_cluster_kernel: rows × cluster_size blocks, clusters of cluster_size along x.
// Returns false, launching nothing, when the device cannot run one such cluster at a time
// (cudaOccupancyMaxActiveClusters; asked once per device, kernel instance and cluster size).
template <class SX, class TX, class C, bool kVectorized>
bool launch_clusters(const ForwardRowsParams& params, const Coefficients<C>& k, int cluster_size,
                     cudaStream_t stream) {
  const int64_t blocks = params.rows * cluster_size;
  if (blocks > int64_t(0x7fffffff)) throw std::invalid_argument("kd_forward_cuda: too many rows for one launch");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  config.blockDim = dim3(kForwardClusterBlock, 1, 1);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  const auto kernel = kd_forward_cluster_kernel<SX, TX, C, kVectorized>;
  static std::mutex mutex;
  static std::vector<int> runnable;  // by device index: bit (log2 cluster_size) = 1 runnable, + 16 known
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  int shift = 0;
  while ((1 << shift) < cluster_size) ++shift;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<int>(runnable.size()) <= device) runnable.resize(static_cast<size_t>(device) + 1, 0);
    int& known = runnable[static_cast<size_t>(device)];
    if (!((known >> (shift + 16)) & 1)) {
      int clusters = 0;
      const cudaError_t status = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
      if (status != cudaSuccess) cudaGetLastError();  // clear it: the one-block kernel runs instead
      known |= (1 << (shift + 16)) | ((status == cudaSuccess && clusters > 0) ? (1 << shift) : 0);
    }
    if (!((known >> shift) & 1)) return false;
  }
  check_cuda(cudaLaunchKernelEx(&config, kernel, params, k), "kd_forward_cluster_kernel launch");
  return true;
}

// kd_forward_rows_kernel, or with `gradient` kd_forward_grad_rows_kernel (the same layout).
template <class SX, class TX, class C, bool kVectorized>
void launch_rows(const ForwardRowsParams& params, const Coefficients<C>& k, cudaStream_t stream, bool gradient) {
  const int block = params.team_size < 256 ? 256 : params.team_size;
  const int64_t blocks = ceil_div(params.rows, block / params.team_size);
  if (blocks > int64_t(0x7fffffff)) throw std::invalid_argument("kd_forward_cuda: too many rows for one launch");
  if (gradient) {
    kd_forward_grad_rows_kernel<SX, TX, C, kVectorized><<<static_cast<unsigned>(blocks), block, 0, stream>>>(params,
                                                                                                          k);
    check_launch("kd_forward_grad_rows_kernel");
  } else {
    kd_forward_rows_kernel<SX, TX, C, kVectorized><<<static_cast<unsigned>(blocks), block, 0, stream>>>(params, k);
    check_launch("kd_forward_rows_kernel");
  }
}

// grad_output = 1 on the device, for the backward kernel run after the forward kernels when the
// one-pass kernel does not apply (kd_forward_cuda with grad_student).
__device__ const float kUnitFloat = 1.0f;
__device__ const double kUnitDouble = 1.0;

// Its address on the current device, looked up once per device (per_device).
template <class C>
const void* device_unit() {
  static std::mutex mutex;
  static std::vector<void*> addresses;  // by device index
  return per_device(addresses, mutex, [](int) {
    void* address = nullptr;
    if constexpr (sizeof(C) == sizeof(double)) {
      check_cuda(cudaGetSymbolAddress(&address, kUnitDouble), "cudaGetSymbolAddress");
    } else {
      check_cuda(cudaGetSymbolAddress(&address, kUnitFloat), "cudaGetSymbolAddress");
    }
    return address;
  });
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
  const int multiprocessors = multiprocessor_count();
  params.team_size = forward_team_size<C>(args.vocab, args.rows, multiprocessors);
  const ForwardClusters clusters = clusters_allowed() ? forward_clusters<C>(args.vocab, args.rows, multiprocessors,
                                                                            compute_capability_major())
                                                       : ForwardClusters{1, 0};
  params.chunk_groups = clusters.chunk_groups;
  params.ignore_index = args.options.ignore_index;
  params.write_row_losses = args.options.reduction == Reduction::None;
  params.loss = args.loss;
  params.row_stats = args.row_stats;
  params.grad_student = args.grad_student;
  params.reduction = args.options.reduction;
  params.valid_rows = args.valid_rows;
  // The one-pass kernel when there are rows enough for every multiprocessor (otherwise the
  // backward kernel's split of rows into chunks spreads the gradient better).
  const bool one_pass = args.grad_student != nullptr && clusters.cluster_size == 1 &&
                        args.rows >= 2 * static_cast<int64_t>(multiprocessors) && params.team_size <= kMaxGradRowsBlock;
  if (one_pass) {
    if (args.options.reduction == Reduction::Mean) {
      // valid_rows first (the gradient's mean scale, the only reduction that reads it);
      // reduction none writes nothing else.
      kd_forward_reduce_kernel<C><<<1, kReduceThreads, 0, stream>>>(
          static_cast<const C*>(args.row_stats), args.labels, args.rows, args.options.ignore_index, Reduction::None,
          static_cast<C*>(args.loss), static_cast<C*>(args.valid_rows));
      check_launch("kd_forward_reduce_kernel");
    }
    const int size_s = static_cast<int>(sizeof(typename SX::Raw));
    const RowTensor tensors[3] = {{args.grad_student, args.vocab, size_s},
                                  {args.student, args.student_row_stride, size_s},
                                  {args.teacher, args.teacher_row_stride, static_cast<int>(sizeof(typename TX::Raw))}};
    const bool vectorized = rows_share_pad(tensors, k.need_kd ? 3 : 2, args.rows, kGroupWidth<C>);
    if (vectorized) launch_rows<SX, TX, C, true>(params, k, stream, true);
    else launch_rows<SX, TX, C, false>(params, k, stream, true);
  } else if (args.rows > 0) {
    // Per-row 16-byte loads unless the student and teacher rows sit differently on the grid.
    const RowTensor tensors[2] = {{args.student, args.student_row_stride, static_cast<int>(sizeof(typename SX::Raw))},
                                  {args.teacher, args.teacher_row_stride, static_cast<int>(sizeof(typename TX::Raw))}};
    const bool vectorized = rows_share_pad(tensors, k.need_kd ? 2 : 1, args.rows, kGroupWidth<C>);
    bool launched = false;
    if (clusters.cluster_size > 1) {  // few long rows, sm_90 and newer
      ForwardRowsParams cluster_params = params;
      cluster_params.team_size = kForwardClusterBlock;
      launched = vectorized ? launch_clusters<SX, TX, C, true>(cluster_params, k, clusters.cluster_size, stream)
                            : launch_clusters<SX, TX, C, false>(cluster_params, k, clusters.cluster_size, stream);
    }
    if (!launched && vectorized) launch_rows<SX, TX, C, true>(params, k, stream, false);
    if (!launched && !vectorized) launch_rows<SX, TX, C, false>(params, k, stream, false);
  }
  kd_forward_reduce_kernel<C><<<1, kReduceThreads, 0, stream>>>(
      static_cast<const C*>(args.row_stats), args.labels, args.rows, args.options.ignore_index, args.options.reduction,
      static_cast<C*>(args.loss), static_cast<C*>(args.valid_rows));
  check_launch("kd_forward_reduce_kernel");
  if (args.grad_student != nullptr && !one_pass) {  // the gradient for grad_output = 1 by the backward kernel
    KDBackwardArgs backward;
    static_cast<KDInputs&>(backward) = args;
    backward.grad_output = device_unit<C>();
    backward.grad_output_stride = 0;
    backward.row_stats = args.row_stats;
    backward.valid_rows = args.valid_rows;
    backward.grad_student = args.grad_student;
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    kd_backward_cuda(backward, device, reinterpret_cast<uintptr_t>(stream));
  }
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
