// Host replay of the dense CUDA kernels' element split (csrc/cuda/kd_loss_cuda_layout.cuh),
// built with nvcc as host code only and run without a GPU by test_cuda_indexing.py. It uses
// the kernels' own ThreadBatches, forward_team_size, backward_chunks and rows_share_pad, and
// walks every thread of a row in the order stream_batches visits its batches (head batch,
// full batches, tail batches; the backward pass's zero/NaN path visits batches [0, total)).
// Checks, per case: every row element is visited exactly once and nothing outside the row;
// full batches lie wholly inside the row and start on the 16-byte grid (pad + first is a
// multiple of the group width); only the head (first < 0) and the tail (reaching past the
// row end) are partial; the host alignment test gives the vector path for rows that share a
// pad and every tensor's full groups are then 16-byte aligned in memory; the sparse kernels'
// kept_bits (sparse_bitmap.cuh) gives each group's bits of the kept-token bitmap, head and
// word-straddling groups included; the forward split of few long rows over thread-block
// clusters (forward_clusters: chunks of whole batch strides covering the row, none below
// sm_90) and that the backward chunks of 64 rows of 256000 fill 132 multiprocessors.
// Prints one line per failure and "checked N cases"; exit status 1 on any failure.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kd_loss_cuda_layout.cuh"
#include "sparse_bitmap.cuh"

using kdfast::cuda::BackwardChunks;
using kdfast::cuda::RowTensor;
using kdfast::cuda::ThreadBatches;

namespace {

int failures = 0;
long cases = 0;
long cluster_cases = 0;  // forward cases split over clusters

void fail(const char* what, int vocab, int pad, int team, int detail) {
  if (++failures <= 20) std::printf("FAIL %s vocab=%d pad=%d team=%d detail=%d\n", what, vocab, pad, team, detail);
}

// Visits the batches of lanes [0, team) over groups [first_group, end_group) as the kernels
// do; counts hits per element. `all_partial`: the backward zero/NaN path (every batch stored
// element-wise through store_group, in the order 0..total).
template <class C>
void visit_range(int vocab, int pad, int first_group, int end_group, int team, bool all_partial,
                 std::vector<int>& hits) {
  constexpr int kW = kdfast::cuda::kGroupWidth<C>;
  constexpr int kU = kdfast::cuda::kGroupsPerBatch<C>;
  for (int lane = 0; lane < team; ++lane) {
    const ThreadBatches<C> batches(vocab, pad, first_group, end_group, team, lane);
    const auto mark = [&](int batch, bool full) {
      int first[kU];
      batches.first_elements(batch, first);
      for (int u = 0; u < kU; ++u) {
        const int group = (first[u] + pad) / kW;
        if ((first[u] + pad) % kW != 0) fail("group off the grid", vocab, pad, team, first[u]);
        if (group < first_group || group >= end_group) fail("group outside the range", vocab, pad, team, group);
        if (full && !all_partial) {
          if (first[u] < 0 || first[u] + kW > vocab) fail("full batch not inside the row", vocab, pad, team, first[u]);
        }
        for (int e = 0; e < kW; ++e) {
          const int index = first[u] + e;
          if (kdfast::cuda::in_row(index, vocab)) ++hits[static_cast<size_t>(index)];
        }
      }
    };
    if (all_partial) {
      for (int b = 0; b < batches.total; ++b) mark(b, false);
      continue;
    }
    if (batches.head) {
      int first[kU];
      batches.first_elements(0, first);
      if (first[0] >= 0) fail("head batch starts inside the row", vocab, pad, team, first[0]);
      mark(0, false);
    }
    if (batches.begin != (batches.head ? 1 : 0)) fail("begin", vocab, pad, team, batches.begin);
    for (int b = batches.begin; b < batches.full; ++b) mark(b, true);
    for (int b = batches.full; b < batches.total; ++b) {
      int first[kU];
      batches.first_elements(b, first);
      bool outside = false;
      for (int u = 0; u < kU; ++u) outside = outside || first[u] < 0 || first[u] + kW > vocab;
      if (!outside) fail("tail batch wholly inside the row", vocab, pad, team, b);
      mark(b, false);
    }
  }
}

void check_hits(const std::vector<int>& hits, int vocab, int pad, int team, const char* pass) {
  ++cases;
  for (int i = 0; i < vocab; ++i) {
    if (hits[static_cast<size_t>(i)] != 1) {
      fail(pass, vocab, pad, team, i);
      return;
    }
  }
}

template <class C>
void replay_row(int vocab, int pad) {
  constexpr int kW = kdfast::cuda::kGroupWidth<C>;
  // Forward: one team per row, for few and many rows on 132 multiprocessors.
  for (const int64_t rows : {int64_t(8), int64_t(100000)}) {
    const int team = kdfast::cuda::forward_team_size<C>(vocab, rows, 132);
    std::vector<int> hits(static_cast<size_t>(vocab), 0);
    visit_range<C>(vocab, pad, 0, (vocab + pad + kW - 1) / kW, team, false, hits);
    check_hits(hits, vocab, pad, team, "forward: element not visited exactly once");
  }
  // Forward, few long rows on sm_90: the row's chunks, one block (team) each.
  for (const int64_t rows : {int64_t(1), int64_t(8), int64_t(64), int64_t(100)}) {
    const kdfast::cuda::ForwardClusters split = kdfast::cuda::forward_clusters<C>(vocab, rows, 132, 9);
    if (kdfast::cuda::forward_clusters<C>(vocab, rows, 132, 8).cluster_size != 1) {
      fail("forward: clusters below sm_90", vocab, pad, 0, static_cast<int>(rows));
    }
    if (split.cluster_size == 1) continue;
    ++cluster_cases;
    const int team = kdfast::cuda::kForwardClusterBlock;
    const int row_groups = (vocab + pad + kW - 1) / kW;
    if (split.cluster_size > kdfast::cuda::kMaxForwardCluster || rows * split.cluster_size > 132 ||
        split.chunk_groups % (team * kdfast::cuda::kGroupsPerBatch<C>) != 0 ||
        static_cast<int64_t>(split.chunk_groups) * split.cluster_size < row_groups) {
      fail("forward: bad cluster split", vocab, pad, split.cluster_size, split.chunk_groups);
    }
    std::vector<int> hits(static_cast<size_t>(vocab), 0);
    for (int rank = 0; rank < split.cluster_size; ++rank) {
      const int first_group = rank * split.chunk_groups;
      const int end_group = first_group + split.chunk_groups < row_groups ? first_group + split.chunk_groups
                                                                           : row_groups;
      visit_range<C>(vocab, pad, first_group, end_group, team, false, hits);
    }
    check_hits(hits, vocab, pad, team, "forward clusters: element not visited exactly once");
  }
  // Backward: (row, chunk) items; both the gradient path and the zero/NaN path.
  const BackwardChunks chunks = kdfast::cuda::backward_chunks<C>(vocab);
  const int row_groups = (vocab + pad + kW - 1) / kW;
  if (static_cast<int64_t>(chunks.chunks_per_row) * chunks.chunk_groups < row_groups) {
    fail("backward: chunks do not cover the row", vocab, pad, chunks.team_size, chunks.chunks_per_row);
  }
  for (const bool all_partial : {false, true}) {
    std::vector<int> hits(static_cast<size_t>(vocab), 0);
    for (int chunk = 0; chunk < chunks.chunks_per_row; ++chunk) {
      const int first_group = chunk * chunks.chunk_groups;
      const int end_group = first_group + chunks.chunk_groups < row_groups ? first_group + chunks.chunk_groups
                                                                             : row_groups;
      visit_range<C>(vocab, pad, first_group, end_group, chunks.team_size, all_partial, hits);
    }
    check_hits(hits, vocab, pad, chunks.team_size,
               all_partial ? "backward zero path: element not visited exactly once"
                           : "backward: element not visited exactly once");
  }
}

// Offset views: `offset_*` elements past a 16-byte-aligned allocation, row stride `stride`.
// When rows_share_pad accepts, every tensor's full groups must be 16-byte aligned in every row.
void replay_alignment(int vocab, int64_t stride_a, int size_a, int offset_a, int64_t stride_b, int size_b,
                      int offset_b, int group_width, bool expect_vector) {
  ++cases;
  const uintptr_t base = 1 << 20;
  const RowTensor tensors[2] = {{reinterpret_cast<const void*>(base + static_cast<uintptr_t>(offset_a * size_a)),
                                 stride_a, size_a},
                                {reinterpret_cast<const void*>(base * 4 + static_cast<uintptr_t>(offset_b * size_b)),
                                 stride_b, size_b}};
  const bool vector = kdfast::cuda::rows_share_pad(tensors, 2, 40, group_width);
  if (expect_vector && !vector) fail("vector path refused", vocab, offset_a, offset_b, static_cast<int>(stride_a));
  if (!vector) return;
  for (int64_t row = 0; row < 40; ++row) {
    int pad = 0;
    for (const RowTensor& x : tensors) {
      const int own = kdfast::cuda::host_row_pad(x, row);
      pad = own > pad ? own : pad;
    }
    for (const RowTensor& x : tensors) {
      const uintptr_t row_start = reinterpret_cast<uintptr_t>(x.base) +
                                  static_cast<uintptr_t>(row * x.row_stride * x.element_size);
      const uintptr_t grid = row_start - static_cast<uintptr_t>(pad * x.element_size);  // group 0
      if (grid % 16 != 0 || (group_width * x.element_size) % 16 != 0) {
        fail("full groups off the 16-byte grid", vocab, pad, x.element_size, static_cast<int>(row));
      }
    }
  }
}

// kept_bits against a bit-by-bit lookup, for every group start of every pad of a row whose
// bitmap holds a pseudo-random pattern.
void replay_kept_bits(int vocab) {
  ++cases;
  const int words = (vocab + 31) / 32;
  std::vector<unsigned> bitmap(static_cast<size_t>(words), 0u);
  uint32_t state = 12345u + static_cast<uint32_t>(vocab);
  for (int i = 0; i < vocab; ++i) {
    state = state * 1664525u + 1013904223u;
    if ((state >> 28) < 5) bitmap[static_cast<size_t>(i >> 5)] |= 1u << (i & 31);
  }
  for (int pad = 0; pad < 8; ++pad) {
    for (int first = -pad; first < vocab; first += 8) {
      const unsigned bits = kdfast::cuda::kept_bits(bitmap.data(), words, first);
      for (int e = 0; e < 8; ++e) {
        const int index = first + e;
        const bool expected = index >= 0 && index < vocab && ((bitmap[static_cast<size_t>(index >> 5)] >> (index & 31)) & 1u);
        if (((bits >> e) & 1u) != (expected ? 1u : 0u)) {
          fail("kept_bits", vocab, pad, 0, index);
          return;
        }
      }
    }
  }
}

}  // namespace

int main() {
  const int vocabs[] = {1, 7, 8, 9, 33, 1000, 1271, 4099, 30522, 50257, 131072, 131077, 256000};
  for (const int vocab : vocabs) {
    for (int pad = 0; pad < kdfast::cuda::kGroupWidth<float>; ++pad) replay_row<float>(vocab, pad);
    for (int pad = 0; pad < kdfast::cuda::kGroupWidth<double>; ++pad) replay_row<double>(vocab, pad);
  }
  for (const int vocab : {1, 7, 33, 1000, 4099, 50257}) replay_kept_bits(vocab);
  for (const int vocab : {30522, 50257, 131077}) {
    for (int offset = 0; offset < 8; ++offset) {
      // Same dtype, contiguous, same offset: always the vector path (2-byte and 4-byte dtypes).
      replay_alignment(vocab, vocab, 2, offset, vocab, 2, offset, 8, true);
      replay_alignment(vocab, vocab, 4, offset % 4, vocab, 4, offset % 4, 8, true);
      replay_alignment(vocab, vocab, 8, offset % 2, vocab, 8, offset % 2, 2, true);
      // Mixed: float32 student, bfloat16 teacher, both contiguous at the same element offset.
      replay_alignment(vocab, vocab, 4, offset, vocab, 2, offset, 8, true);
      // Different offsets or strides: whatever the test decides must be safe.
      replay_alignment(vocab, vocab + 3, 2, offset, vocab, 2, (offset + 5) % 8, 8, false);
      replay_alignment(vocab, vocab + 8, 2, offset, vocab + 16, 2, offset, 8, true);
    }
  }
  // Few long rows: the backward pass's (row, chunk) items fill 132 multiprocessors' two
  // 256-thread blocks each (kBackwardMinBlocks) for N = 64, V = 256000.
  const BackwardChunks long_rows = kdfast::cuda::backward_chunks<float>(256000);
  if (64 * long_rows.chunks_per_row < 2 * 132) fail("backward: few long rows do not fill the GPU", 256000, 0, 0, 0);
  if (cluster_cases == 0) fail("no forward case used clusters", 0, 0, 0, 0);
  std::printf("checked %ld cases (%ld split over clusters), %d failures\n", cases, cluster_cases, failures);
  return failures == 0 ? 0 : 1;
}
