// How the top-k compression kernel (topk_compress.cu) and the sparse-loss forward kernel
// (sparse_kd_loss.cu) size their dynamic shared memory to the device's per-block opt-in limit
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 48 KiB without opt-in, 99 KiB on sm_86 / sm_89,
// 163 KiB on sm_80, 227 KiB on sm_90). Plain host code (no CUDA runtime call), so that
// tests/functional/cuda_indexing_replay.cu checks the plans for any limit without a GPU.
// Contract: a plan with fits == true never asks for more than limit − static_bytes bytes of
// dynamic shared memory; the largest layout that fits is chosen (the kernels' fastest one
// first), and fits == false only when not even the smallest layout fits.
//   Top-k: 2k kept entries (two buffers, the cut writes one while reading the other) plus a
//   newcomer buffer of max(tile, next power of two of k) entries (tile = block x group width);
//   fallbacks, in order: one kept buffer (the cut compacts in place), then halved blocks (a
//   smaller tile; never below 128 threads).
//   Sparse: a bitmap of the whole row's vocabulary (one bit per element); else a window of
//   the row, a whole number of block strides of groups, marked and streamed window by window.
//   With few long rows on sm_90, a cluster of blocks per row shares the windows out.
//   Multi-teacher forward: every thread keeps three running values per teacher (maximum, sum,
//   weighted sum) in shared memory; the block is halved (down to one warp) until they fit.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kdfast {
namespace cuda {

inline int64_t plan_power_of_two_at_least(int64_t value) {
  int64_t result = 1;
  while (result < value) result <<= 1;
  return result;
}

// ------------------------------------------------------------------ top-k compression

struct TopKSharedPlan {
  int block;            // threads per block (a power of two, >= 128 unless the preferred block is smaller)
  int buffer_capacity;  // newcomer buffer entries: >= tile and >= next power of two of k
  bool double_kept;     // two kept buffers of k entries; false: one, cut in place
  size_t dynamic_bytes;
  bool fits;
};

// entry_bytes: one candidate (its key and its int index); group_width: elements per thread and
// tile; static_bytes: the kernel's static shared memory; limit: the device's opt-in limit.
inline TopKSharedPlan plan_topk_shared(int64_t k, int preferred_block, int group_width, size_t entry_bytes,
                                       size_t static_bytes, size_t limit) {
  const int64_t sort_entries = plan_power_of_two_at_least(k);
  TopKSharedPlan plan{preferred_block, 0, true, 0, false};
  const int smallest = preferred_block < 128 ? preferred_block : 128;
  for (int block = preferred_block; block >= smallest; block /= 2) {
    const int64_t tile = static_cast<int64_t>(block) * group_width;
    const int64_t capacity = tile > sort_entries ? tile : sort_entries;
    for (int copies = 2; copies >= 1; --copies) {
      const size_t bytes = static_cast<size_t>(copies * k + capacity) * entry_bytes;
      plan = TopKSharedPlan{block, static_cast<int>(capacity), copies == 2, bytes, bytes + static_bytes <= limit};
      if (plan.fits) return plan;
    }
  }
  return plan;  // the smallest layout, fits == false
}

// ------------------------------------------------------------------ sparse-loss bitmap

struct SparseBitmapPlan {
  int bitmap_words;   // 32-bit words of the bitmap in shared memory
  int window_groups;  // groups of the row per window (a multiple of the block size unless one window)
  int windows;        // windows per row (counted for the largest pad, group_width - 1)
  size_t dynamic_bytes;
  bool fits;
};

inline SparseBitmapPlan plan_sparse_bitmap(int64_t vocab, int block, int group_width, size_t static_bytes,
                                           size_t limit) {
  const int64_t max_groups = (vocab + 2 * (group_width - 1)) / group_width;  // groups of a row with pad W - 1
  const int64_t full_words = (vocab + 31) / 32;
  SparseBitmapPlan plan{0, 0, 0, 0, false};
  if (static_cast<size_t>(full_words) * 4 + static_bytes <= limit) {
    plan.bitmap_words = static_cast<int>(full_words);
    plan.window_groups = static_cast<int>(max_groups > 0 ? max_groups : 1);
    plan.windows = 1;
    plan.dynamic_bytes = static_cast<size_t>(full_words) * 4;
    plan.fits = true;
    return plan;
  }
  if (limit <= static_bytes) return plan;
  // A window of n block strides holds n * block * group_width elements: their bits in words.
  const int64_t available_bits = static_cast<int64_t>((limit - static_bytes) / 4) * 32;
  const int64_t stride_bits = static_cast<int64_t>(block) * group_width;
  const int64_t strides = available_bits / stride_bits;
  if (strides < 1) return plan;
  const int64_t window_groups = strides * block;
  plan.window_groups = static_cast<int>(window_groups);
  plan.bitmap_words = static_cast<int>((window_groups * group_width + 31) / 32);
  plan.windows = static_cast<int>((max_groups + window_groups - 1) / window_groups);
  plan.dynamic_bytes = static_cast<size_t>(plan.bitmap_words) * 4;
  plan.fits = plan.dynamic_bytes + static_bytes <= limit;
  return plan;
}

// Blocks per row of the sparse forward kernel's cluster path (sm_90): 1 (one block per row)
// unless the rows leave multiprocessors idle; then up to 8 (the portable cluster size), as many
// as the multiprocessors per row allow, each block getting at least two block strides of groups.
inline int sparse_cluster_size(int64_t rows, int64_t vocab, int block, int group_width, int multiprocessors) {
  if (rows <= 0 || rows >= multiprocessors) return 1;
  const int64_t max_groups = (vocab + 2 * (group_width - 1)) / group_width;
  int64_t size = multiprocessors / rows;
  if (size > 8) size = 8;
  const int64_t by_work = max_groups / (2 * static_cast<int64_t>(block));
  if (size > by_work) size = by_work;
  return size >= 2 ? static_cast<int>(size) : 1;
}

// The bitmap windows of the cluster path: the row cut into windows of about 1/cluster of it
// (a whole number of block strides), no larger than plan_sparse_bitmap's window, block r of
// the cluster taking windows r, r + cluster, ... A one-window result means no split.
inline SparseBitmapPlan plan_sparse_cluster(int64_t vocab, int block, int group_width, size_t static_bytes,
                                            size_t limit, int cluster) {
  SparseBitmapPlan plan = plan_sparse_bitmap(vocab, block, group_width, static_bytes, limit);
  if (!plan.fits || cluster <= 1) return plan;
  const int64_t max_groups = (vocab + 2 * (group_width - 1)) / group_width;
  const int64_t share = (max_groups + cluster - 1) / cluster;
  int64_t window_groups = (share + block - 1) / block * block;
  if (plan.windows > 1 && window_groups > plan.window_groups) window_groups = plan.window_groups;
  if (window_groups >= max_groups) return plan;
  plan.window_groups = static_cast<int>(window_groups);
  plan.bitmap_words = static_cast<int>((window_groups * group_width + 31) / 32);
  plan.windows = static_cast<int>((max_groups + window_groups - 1) / window_groups);
  plan.dynamic_bytes = static_cast<size_t>(plan.bitmap_words) * 4;
  plan.fits = plan.dynamic_bytes + static_bytes <= limit;
  return plan;
}

// ------------------------------------------------------------------ multi-teacher forward

// Threads per block of the multi-teacher forward kernel (a power of two from 32 to
// preferred_block) whose per-thread teacher state, values_per_teacher values of value_bytes for
// each of `teachers`, fits beside static_bytes; 0 when not even one warp's fits.
inline int plan_multi_teacher_threads(int64_t teachers, int values_per_teacher, size_t value_bytes,
                                      int preferred_block, size_t static_bytes, size_t limit) {
  for (int block = preferred_block; block >= 32; block /= 2) {
    const size_t bytes = static_cast<size_t>(teachers) * static_cast<size_t>(values_per_teacher) * value_bytes *
                         static_cast<size_t>(block);
    if (bytes + static_bytes <= limit) return block;
  }
  return 0;
}

}  // namespace cuda
}  // namespace kdfast
