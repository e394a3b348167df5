// Host replay of the dense CUDA kernels' float32 arithmetic (csrc/cuda/kd_loss_cuda_rows.cuh),
// built with nvcc as host code only and run without a GPU by test_cuda_rows_replay.py.
// For each row it does what kd_forward_rows_kernel and kd_backward_kernel do, with their own
// functions: every thread of the row's team (forward_team_size for 132 multiprocessors) folds
// its batches (ThreadBatches: head, full, tail, on the row's 16-byte grid of a contiguous
// tensor) into a running partial (accumulate_batch), the team moves the partials onto the row's
// maxima (rebase_row_partial) and adds them in the order of team_all_reduce (a butterfly over
// each warp, then the warps in order), finish_row_stats and rowmath give the row loss and the
// statistics, rounded to float as row_stats stores them; the backward pass builds the row's
// factors (make_grad_row, use_reverse_kl_offsets) and each element's gradient (batch_gradient,
// then the label step). The hardware exp2 (ex2.approx) is replaced by exp2f, and the host
// does not contract a·b + c into FMAs as the device may; the rest is the same float math.
// `offsets` = 1 replays the kernels (reverse_kl's weighted sum over u = h s − h t), 0 the
// formulation before it (rowmath's weighted sum relative to the running maxima).
//
// CLUSTERS = 1 replays the forward pass of few long rows on sm_90 (kd_forward_cluster_kernel:
// forward_clusters' chunks, one 1024-thread block each, merged in rank order with
// merge_row_partials), for 132 multiprocessors.
//
// Usage: cuda_rows_replay INPUT OUTPUT OFFSETS [CLUSTERS]. INPUT (native byte order): int64 rows, vocab;
// int32 divergence code; float64 temperature, alpha, label_smoothing, divergence_scale;
// int64 labels[rows] (-100: ignored); float64 grad_scale[rows] (each row's grad_output times
// the reduction's scale); float32 student[rows][vocab], teacher[rows][vocab]. OUTPUT: float64
// row losses[rows], float32 gradient[rows][vocab]. Only forward_kl and reverse_kl (the
// one-pass divergences).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "kd_loss_cuda_rows.cuh"

namespace {

using kdfast::Divergence;
using kdfast::cuda::ThreadBatches;
namespace rowmath = kdfast::rowmath;

constexpr int kMultiprocessors = 132;
constexpr int kW = kdfast::cuda::kGroupWidth<float>;
constexpr int kU = kdfast::cuda::kGroupsPerBatch<float>;
constexpr int kE = kW * kU;

// ScaledExp of the kernels, with exp2f for the hardware exp2.
template <class C>
struct HostScaledExp {
  C scale_log2;
  __host__ __device__ explicit HostScaledExp(C scale) : scale_log2(scale * C(1.44269504088896341)) {}
  __host__ __device__ C operator()(C d) const { return exp2f(d * scale_log2); }
};

struct Input {
  int64_t rows = 0, vocab = 0;
  int32_t divergence = 0;
  double temperature = 1, alpha = 0, label_smoothing = 0, divergence_scale = 1;
  std::vector<int64_t> labels;
  std::vector<double> grad_scale;
  std::vector<float> student, teacher;
};

bool read_input(const char* path, Input& in) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return false;
  bool ok = std::fread(&in.rows, 8, 1, f) == 1 && std::fread(&in.vocab, 8, 1, f) == 1 &&
            std::fread(&in.divergence, 4, 1, f) == 1 && std::fread(&in.temperature, 8, 1, f) == 1 &&
            std::fread(&in.alpha, 8, 1, f) == 1 && std::fread(&in.label_smoothing, 8, 1, f) == 1 &&
            std::fread(&in.divergence_scale, 8, 1, f) == 1;
  if (ok) {
    const size_t n = static_cast<size_t>(in.rows * in.vocab);
    in.labels.resize(static_cast<size_t>(in.rows));
    in.grad_scale.resize(static_cast<size_t>(in.rows));
    in.student.resize(n);
    in.teacher.resize(n);
    ok = std::fread(in.labels.data(), 8, in.labels.size(), f) == in.labels.size() &&
         std::fread(in.grad_scale.data(), 8, in.grad_scale.size(), f) == in.grad_scale.size() &&
         std::fread(in.student.data(), 4, n, f) == n && std::fread(in.teacher.data(), 4, n, f) == n;
  }
  std::fclose(f);
  return ok;
}

// team_all_reduce's order of a sum over the team: butterfly per warp, then warps in order.
float team_sum(const std::vector<float>& values) {
  const size_t team = values.size();
  std::vector<float> v = values;
  for (size_t warp = 0; warp < team; warp += 32) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      std::vector<float> next(v);
      for (size_t lane = 0; lane < 32; ++lane) next[warp + lane] = v[warp + lane] + v[warp + (lane ^ offset)];
      v = next;
    }
  }
  float total = v[0];
  for (size_t warp = 32; warp < team; warp += 32) total = total + v[warp];
  return total;
}

// The partial of one team over groups [first_group, end_group) of a row: every thread's
// batches folded (accumulate_batch), then team_row_partial's merge.
template <bool kOffsets>
rowmath::RowPartial<float> team_partial(const float* s_row, const float* t_row, int vocab, int pad, int first_group,
                                        int end_group, int team, const rowmath::Coefficients<float>& k,
                                        const kdfast::cuda::ReverseKLRefs<float>& refs) {
  std::vector<rowmath::RowPartial<float>> parts(static_cast<size_t>(team));
  for (int lane = 0; lane < team; ++lane) {
    rowmath::RowPartial<float> part = rowmath::empty_partial<float>();
    const ThreadBatches<float> batches(vocab, pad, first_group, end_group, team, lane);
    const auto visit = [&](int b, auto partial) {
      int first[kU];
      batches.first_elements(b, first);
      float s[kE], t[kE];
      for (int u = 0; u < kU; ++u) {
        for (int e = 0; e < kW; ++e) {
          const int index = first[u] + e;
          const bool inside = kdfast::cuda::in_row(index, vocab);
          s[u * kW + e] = inside ? s_row[index] : -std::numeric_limits<float>::infinity();
          t[u * kW + e] = inside ? t_row[index] : -std::numeric_limits<float>::infinity();
        }
      }
      kdfast::cuda::accumulate_batch<HostScaledExp, kOffsets, decltype(partial)::value>(part, s, t, first, vocab, k,
                                                                                              refs);
    };
    if (batches.head) visit(0, std::true_type{});
    for (int b = batches.begin; b < batches.full; ++b) visit(b, std::false_type{});
    for (int b = batches.full; b < batches.total; ++b) visit(b, std::true_type{});
    parts[static_cast<size_t>(lane)] = part;
  }
  float teacher_max = parts[0].teacher_max, student_max = parts[0].student_max;
  for (const auto& part : parts) {
    teacher_max = kdfast::cuda::max_ignoring_nan(teacher_max, part.teacher_max);
    student_max = kdfast::cuda::max_ignoring_nan(student_max, part.student_max);
  }
  std::vector<float> sums[6];
  for (auto& part : parts) {
    kdfast::cuda::rebase_row_partial<kOffsets>(part, teacher_max, student_max, k);
    const float values[6] = {part.teacher_sum, part.student_sum_T, part.student_sum_1,
                             part.weighted,    part.student_centered_total, part.count};
    for (int i = 0; i < 6; ++i) sums[i].push_back(values[i]);
  }
  rowmath::RowPartial<float> result;
  result.teacher_max = teacher_max;
  result.student_max = student_max;
  result.teacher_sum = team_sum(sums[0]);
  result.student_sum_T = team_sum(sums[1]);
  result.student_sum_1 = team_sum(sums[2]);
  result.weighted = team_sum(sums[3]);
  result.student_centered_total = team_sum(sums[4]);
  result.count = team_sum(sums[5]);
  return result;
}

template <bool kOffsets>
void replay_row(const Input& in, const rowmath::Coefficients<float>& k, int64_t row, bool clusters, double* loss_out,
                float* grad) {
  const int vocab = static_cast<int>(in.vocab);
  const float* s_row = in.student.data() + row * in.vocab;
  const float* t_row = in.teacher.data() + row * in.vocab;
  const int64_t label = in.labels[static_cast<size_t>(row)];
  if (label == -100) {
    *loss_out = 0.0;
    for (int i = 0; i < vocab; ++i) grad[i] = 0.0f;
    return;
  }
  // Forward: a contiguous float32 tensor on a 16-byte boundary; one team per row, or (with
  // clusters, on sm_90) one 1024-thread block per chunk, merged in rank order.
  const int pad = static_cast<int>((row * in.vocab) % 4);
  const int groups = (vocab + pad + kW - 1) / kW;
  const float h = k.diff_scale;
  const bool offsets = kdfast::cuda::uses_reverse_kl_offsets<kOffsets>(k);
  const float student_ref = offsets ? kdfast::cuda::finite_or_zero(s_row[0]) : 0.0f;  // row_stats column 7
  const auto refs = kdfast::cuda::reverse_kl_refs(offsets ? s_row[0] : 0.0f, offsets ? t_row[0] : 0.0f, h);
  const kdfast::cuda::ForwardClusters split =
      clusters ? kdfast::cuda::forward_clusters<float>(in.vocab, in.rows, kMultiprocessors, 9)
               : kdfast::cuda::ForwardClusters{1, 0};
  rowmath::RowPartial<float> row_part;
  if (split.cluster_size == 1) {
    const int team = kdfast::cuda::forward_team_size<float>(in.vocab, in.rows, kMultiprocessors);
    row_part = team_partial<kOffsets>(s_row, t_row, vocab, pad, 0, groups, team, k, refs);
  } else {
    for (int rank = 0; rank < split.cluster_size; ++rank) {
      const int first_group = rank * split.chunk_groups;
      const int end_group = first_group + split.chunk_groups < groups ? first_group + split.chunk_groups : groups;
      const rowmath::RowPartial<float> block = team_partial<kOffsets>(
          s_row, t_row, vocab, pad, first_group, end_group, kdfast::cuda::kForwardClusterBlock, k, refs);
      if (rank == 0) {
        row_part = block;
      } else {
        kdfast::cuda::merge_row_partials<kOffsets>(row_part, block, k);
      }
    }
  }
  double divergence = 0.0;
  const rowmath::RowStats<float> stats = kdfast::cuda::finish_row_stats<kOffsets>(row_part, k, refs, &divergence);
  double ce = 0.0;
  if (k.need_ce) {
    const double label_logit = static_cast<double>(s_row[label]) - static_cast<double>(stats.student_max);
    const double centered = static_cast<double>(row_part.student_centered_total) / static_cast<double>(k.diff_scale);
    ce = rowmath::cross_entropy(label_logit, static_cast<double>(stats.student_log_sum_1), centered, in.vocab,
                                k.label_smoothing_d);
  }
  const float row_loss = rowmath::row_sums_defined(row_part, k) ? static_cast<float>(rowmath::combine_loss(ce, divergence, k))
                                                                : std::numeric_limits<float>::quiet_NaN();
  *loss_out = row_loss;
  if (row_loss != row_loss) {
    for (int i = 0; i < vocab; ++i) grad[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  // Backward: the row's factors from the stored (float) statistics, then each element.
  rowmath::GradRow<float> grad_row = rowmath::make_grad_row(in.grad_scale[static_cast<size_t>(row)], k, stats, in.vocab);
  kdfast::cuda::use_reverse_kl_offsets<kOffsets>(grad_row, k);
  const auto grad_refs = kdfast::cuda::reverse_kl_refs(student_ref, offsets ? t_row[0] : 0.0f, h);
  for (int first = 0; first < vocab; first += kE) {
    float s[kE], t[kE], out[kE];
    for (int e = 0; e < kE; ++e) {
      const int index = first + e < vocab ? first + e : vocab - 1;
      s[e] = s_row[index];
      t[e] = t_row[index];
    }
    if (k.divergence == Divergence::ReverseKL) {
      kdfast::cuda::batch_gradient<Divergence::ReverseKL, kOffsets>(s, t, grad_row, k, grad_refs, out);
    } else {
      kdfast::cuda::batch_gradient<Divergence::ForwardKL, kOffsets>(s, t, grad_row, k, grad_refs, out);
    }
    for (int e = 0; e < kE && first + e < vocab; ++e) grad[first + e] = out[e];
  }
  if (k.need_ce) grad[label] -= grad_row.label_step;
}

}  // namespace

int main(int argc, char** argv) {
  Input in;
  if (argc < 4 || argc > 5 || !read_input(argv[1], in)) {
    std::fprintf(stderr, "usage: cuda_rows_replay INPUT OUTPUT OFFSETS [CLUSTERS] (bad arguments or input)\n");
    return 2;
  }
  if (in.divergence < 0 || in.divergence > 2) {
    std::fprintf(stderr, "only forward_kl (0), reverse_kl (1) and forward_kl with teacher_entropy (2) are replayed\n");
    return 2;
  }
  kdfast::KDOptions options;
  options.divergence = in.divergence == 2 ? Divergence::ForwardKL : static_cast<Divergence>(in.divergence);
  options.teacher_entropy = in.divergence == 2;
  options.reduction = kdfast::Reduction::Sum;
  options.temperature = in.temperature;
  options.alpha = in.alpha;
  options.label_smoothing = in.label_smoothing;
  options.divergence_scale = in.divergence_scale;
  const rowmath::Coefficients<float> k = rowmath::make_coefficients<float>(options, in.vocab);
  const bool offsets = std::atoi(argv[3]) != 0;
  const bool clusters = argc == 5 && std::atoi(argv[4]) != 0;
  std::vector<double> losses(static_cast<size_t>(in.rows));
  std::vector<float> grad(static_cast<size_t>(in.rows * in.vocab));
  for (int64_t row = 0; row < in.rows; ++row) {
    double* loss = losses.data() + row;
    float* grad_row = grad.data() + row * in.vocab;
    if (offsets) {
      replay_row<true>(in, k, row, clusters, loss, grad_row);
    } else {
      replay_row<false>(in, k, row, clusters, loss, grad_row);
    }
  }
  FILE* f = std::fopen(argv[2], "wb");
  if (f == nullptr) return 2;
  std::fwrite(losses.data(), 8, losses.size(), f);
  std::fwrite(grad.data(), 4, grad.size(), f);
  std::fclose(f);
  return 0;
}
