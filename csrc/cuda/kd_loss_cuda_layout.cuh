// How the CUDA kernels of the dense KD loss (and the sparse loss) cut a row into work, shared
// by the kernels (kd_loss_cuda_common.cuh) and the host replay of the split
// (tests/functional/cuda_indexing_replay.cu, built as host code only).
// A row is read in "groups" of kGroupWidth<C> consecutive elements (C = compute type). With
// 16-byte accesses the groups are laid on the 16-byte grid of memory, per row: the row starts
// `pad` elements past a 16-byte boundary (row_pad, host_row_pad), group g covers the row
// elements [g W - pad, g W - pad + W), so that group 0 is the scalar head (when pad > 0), every
// group wholly inside the row is a vector access and the group that reaches past the row end
// is the scalar tail. The host checks that every tensor a kernel reads or writes in a row has
// the same pad (rows_share_pad), else it launches the element-by-element instance (pad 0).
// Every element of a row lies in exactly one group, and every group in exactly one batch of
// one thread (ThreadBatches). The launch layouts: threads per row of the forward pass
// (forward_team_size), its split of few long rows over thread-block clusters
// (forward_clusters) and the (row, chunk) items of the backward pass (backward_chunks).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdfast {
namespace cuda {

// ------------------------------------------------------------------ groups and alignment

// Elements per group: 8 in float math (one 16-byte vector of a 16-bit dtype, two of float32),
// 2 in double math (one 16-byte vector of float64).
template <class C>
constexpr int kGroupWidth = sizeof(C) == 4 ? 8 : 2;

// Groups each thread loads per batch (all of a batch's loads are issued before any is used).
// One keeps the register count low (the forward row kernel has 64 per thread);
// stream_batches issues the next batch's loads before computing on the current one where the
// kernel's register budget allows (kPrefetchBatches, kd_loss_cuda_common.cuh).
template <class C>
constexpr int kGroupsPerBatch = 1;

// One tensor a kernel reads or writes row by row: base address, row stride (elements), element size.
struct RowTensor {
  const void* base;
  int64_t row_stride;
  int element_size;
};

// Elements from the previous 16-byte boundary to the start of row `row` of `x` (0 when aligned).
inline int host_row_pad(const RowTensor& x, int64_t row) {
  const uint64_t address = reinterpret_cast<uintptr_t>(x.base) + static_cast<uint64_t>(row * x.row_stride) *
                                                                     static_cast<uint64_t>(x.element_size);
  return static_cast<int>(address % 16) / x.element_size;
}

// True when, in every row, all `count` tensors start the same number of elements `pad` past a
// 16-byte boundary, pad < group_width, in the sense the kernels use: pad = the largest of the
// tensors' own pads (row_pad) and every tensor's pad equals pad modulo its elements per 16
// bytes. Then one group grid (ThreadBatches with that pad) puts every full group of every
// tensor on 16-byte boundaries. Row addresses modulo 16 repeat with a period dividing 16, so
// the first 16 rows decide for all. Element addresses must be multiples of the element size.
inline bool rows_share_pad(const RowTensor* tensors, int count, int64_t rows, int group_width) {
  for (int i = 0; i < count; ++i) {
    if (reinterpret_cast<uintptr_t>(tensors[i].base) % static_cast<uintptr_t>(tensors[i].element_size) != 0) {
      return false;
    }
  }
  const int64_t checked = rows < 16 ? rows : 16;
  for (int64_t row = 0; row < checked; ++row) {
    int pad = 0;
    for (int i = 0; i < count; ++i) pad = host_row_pad(tensors[i], row) > pad ? host_row_pad(tensors[i], row) : pad;
    if (pad >= group_width) return false;
    for (int i = 0; i < count; ++i) {
      if (pad % (16 / tensors[i].element_size) != host_row_pad(tensors[i], row)) return false;
    }
  }
  return true;
}

// True when every row of a tensor starts on a 16-byte boundary.
inline bool rows_are_16_byte_aligned(const void* base, int64_t row_stride_elements, int element_size) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride_elements * element_size) % 16 == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_power_of_two(int64_t value) {
  int result = 1;
  while (result < value && result < (1 << 30)) result <<= 1;
  return result;
}

// ------------------------------------------------------------------ batches of groups

// The batches one thread of a team handles in the group range [first_group, end_group) of a
// row of `vocab` elements laid on the group grid with `pad` (file comment; pad = 0 when not
// vectorised): batch b holds groups first_group + b * stride + u * team + lane (u < kGroups),
// with stride = kGroups * team; (end_group - first_group) is a multiple of stride or end_group
// is the row's last group. Group g starts at row element g * kWidth - pad. A batch is "full"
// when all its groups lie wholly inside the row (16-byte loads); the others are loaded element
// by element. Order of a thread's batches: the head batch (batch 0 when it holds group 0 and
// pad > 0, so that it starts before the row) when `head`, then the full batches [begin, full),
// then the partial ones [full, total) that reach past the row end. When no batch is full the
// head batch is simply the first of the partial ones (head = false, begin = full = 0).
template <class C>
struct ThreadBatches {
  static constexpr int kGroups = kGroupsPerBatch<C>;
  static constexpr int kWidth = kGroupWidth<C>;
  int first;  // first group of batch 0 (u = 0)
  int team;
  int stride;
  int pad;
  bool head;
  int begin;
  int full;
  int total;

  __host__ __device__ __forceinline__ ThreadBatches(int vocab, int row_pad_elements, int first_group, int end_group,
                                           int team_size, int lane)
      : first(first_group + lane), team(team_size), stride(kGroups * team_size), pad(row_pad_elements) {
    const int row_groups = (vocab + pad + kWidth - 1) / kWidth;
    const int complete_end = (vocab + pad) / kWidth;  // groups [pad > 0, complete_end) are wholly inside
    const int range_batches = end_group > first_group ? (end_group - first_group + stride - 1) / stride : 0;
    const int last_offset = first + (kGroups - 1) * team;  // last group of batch 0
    const int full_batches = complete_end > last_offset ? (complete_end - last_offset - 1) / stride + 1 : 0;
    const int any_batches = row_groups > first ? (row_groups - first - 1) / stride + 1 : 0;
    full = full_batches < range_batches ? full_batches : range_batches;
    total = any_batches < range_batches ? any_batches : range_batches;
    head = pad > 0 && first == 0 && full > 0;
    begin = head ? 1 : 0;
  }

  // Row element index of the first element of each group of batch b (negative for the head).
  __host__ __device__ __forceinline__ void first_elements(int batch, int (&out)[kGroups]) const {
#pragma unroll
    for (int u = 0; u < kGroups; ++u) out[u] = (first + batch * stride + u * team) * kWidth - pad;
  }
};

// True when row element `index` exists (the head and the tail groups reach outside the row).
__host__ __device__ __forceinline__ bool in_row(int index, int vocab) {
  return static_cast<unsigned>(index) < static_cast<unsigned>(vocab);
}

// ------------------------------------------------------------------ launch layouts (host)

// Batches each thread streams per row, about: longer rows get larger teams.
constexpr int64_t kForwardBatchesPerThread = 8;

// Threads per row: a warp for short rows, up to 512 for long ones (two 512-thread blocks per
// multiprocessor overlap one block's reduction with the other's streaming). When there are
// too few rows to give every multiprocessor two such blocks, long rows get 1024 threads.
template <class C>
int forward_team_size(int64_t vocab, int64_t rows, int multiprocessors) {
  const int64_t groups = ceil_div(vocab, kGroupWidth<C>);
  const int64_t wanted = next_power_of_two(ceil_div(groups, kForwardBatchesPerThread * kGroupsPerBatch<C>));
  const int64_t limit = rows < 2 * static_cast<int64_t>(multiprocessors) ? 1024 : 512;
  return static_cast<int>(wanted < 32 ? 32 : (wanted > limit ? limit : wanted));
}

// Few long rows in the forward pass (sm_90 and newer): each row is cut into cluster_size
// chunks of chunk_groups groups (a multiple of the block's batch stride, so that ThreadBatches
// applies; counted for the largest pad, so a row's last chunk may be short or empty), one
// kForwardClusterBlock-thread block per chunk, the blocks of a row forming one thread-block
// cluster that merges their partials through distributed shared memory. cluster_size is the
// largest power of two up to kMaxForwardCluster with rows × cluster_size blocks still in one
// wave (at most one per multiprocessor) and at least two batches per thread in every chunk; 1
// (no clusters: one block per row, kd_forward_rows_kernel) below compute capability 9, for
// short rows and when rows alone fill the multiprocessors.
constexpr int kForwardClusterBlock = 1024;
constexpr int kMaxForwardCluster = 8;  // the portable cluster size limit

struct ForwardClusters {
  int cluster_size;  // blocks per row; 1: no clusters
  int chunk_groups;  // groups per block (0 when cluster_size == 1)
};

template <class C>
ForwardClusters forward_clusters(int64_t vocab, int64_t rows, int multiprocessors, int compute_major) {
  ForwardClusters split{1, 0};
  if (compute_major < 9 || rows <= 0) return split;
  const int64_t stride = int64_t(kForwardClusterBlock) * kGroupsPerBatch<C>;
  const int64_t padded_groups = ceil_div(vocab + kGroupWidth<C> - 1, kGroupWidth<C>);
  int size = 1;
  while (size < kMaxForwardCluster && rows * (2 * size) <= multiprocessors && padded_groups >= 2 * size * 2 * stride) {
    size *= 2;
  }
  if (size == 1) return split;
  split.cluster_size = size;
  split.chunk_groups = static_cast<int>(ceil_div(ceil_div(padded_groups, size), stride) * stride);
  return split;
}

// Threads per (row, chunk) item of the backward kernel and the block size.
constexpr int kBackwardBlock = 256;
// Batches each thread handles per (row, chunk) item, at most.
constexpr int kBatchesPerChunk = 8;

// The backward kernel's split of a row: team_size threads (a power of two, 32..kBackwardBlock:
// about two batches per thread) per item of chunk_groups groups (a multiple of the team's
// batch stride), chunks_per_row items per row, counted for the largest pad (kGroupWidth - 1
// elements before the row start), so that a row's last chunk may be empty.
struct BackwardChunks {
  int team_size;
  int chunk_groups;
  int chunks_per_row;
};

template <class C>
BackwardChunks backward_chunks(int64_t vocab) {
  const int64_t groups = ceil_div(vocab, kGroupWidth<C>);
  const int64_t wanted = next_power_of_two(ceil_div(groups, 2 * kGroupsPerBatch<C>));
  BackwardChunks chunks;
  chunks.team_size = static_cast<int>(wanted < 32 ? 32 : (wanted > kBackwardBlock ? kBackwardBlock : wanted));
  chunks.chunk_groups = chunks.team_size * kGroupsPerBatch<C> * kBatchesPerChunk;
  const int64_t padded_groups = ceil_div(vocab + kGroupWidth<C> - 1, kGroupWidth<C>);
  chunks.chunks_per_row = static_cast<int>(ceil_div(padded_groups, chunks.chunk_groups));
  return chunks;
}

}  // namespace cuda
}  // namespace kdfast
