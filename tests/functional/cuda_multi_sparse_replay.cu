// Host replay of the multi-teacher and sparse CUDA kernels' row split and of the shared-memory
// plans of the top-k, sparse and multi-teacher kernels, built with nvcc as host code only and
// run without a GPU by test_cuda_multi_split.py and test_cuda_sparse_windows.py (argument
// "multi", "sparse", "plans" or "math"). It calls the kernels' own host-callable code:
// ThreadBatches, rows_share_pad, host_row_pad (kd_loss_cuda_layout.cuh), batch_is_partial and
// row_window (row_split.cuh), kept_bits (sparse_bitmap.cuh), the plan functions
// (shared_memory_plan.cuh) and the multi-teacher forward's runs (multi_teacher_runs.cuh; with
// exp2f where the device uses ex2.approx).
//   multi: for a student row, M teacher rows and a gradient row at given element offsets and
//   row strides, every thread of blocks of 32..256 threads walks its batches as the kernels
//   do (pad = the largest row pad when the host picks the vector path, else 0): every row
//   element once, nothing outside the row, vector batches wholly inside the row with every
//   tensor's address 16-byte aligned, element-wise batches only at the head or the tail.
//   sparse: for the windows the plan gives at 48 KiB, 99 KiB and 227 KiB, and for the cluster
//   path's windows shared out over 2 to 8 blocks, every row element lies in exactly one window,
//   every kept index is marked in exactly one window and within its bitmap, and kept_bits at
//   first - lo reads each group's kept flags; the cluster sizes chosen for few and many rows.
//   plans: the plans fit the limit, keep the kernels' invariants (newcomer buffer >= tile and
//   >= the sort's power of two), pick the double-buffered layout whenever it fits, and the
//   in-place compaction of a single kept buffer (the top-k cut, round by round) gives the same
//   survivors in the same order as compaction into a second buffer.
//   math: the multi-teacher forward's per-thread runs and merge (multi_teacher_runs.cuh) on
//   float32 rows, D against float64 and reverse_kl's gradient bracket u_i - mean_u per element.
// Prints one line per failure and "checked N cases, F failures"; exit status 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kd_loss_cuda_layout.cuh"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"
#include "multi_teacher_runs.cuh"
#include "row_split.cuh"
#include "shared_memory_plan.cuh"
#include "sparse_bitmap.cuh"

using kdfast::cuda::RowTensor;
using kdfast::cuda::ThreadBatches;

namespace {

int failures = 0;
long cases = 0;

void fail(const char* what, long a, long b, long c) {
  if (++failures <= 30) std::printf("FAIL %s %ld %ld %ld\n", what, a, b, c);
}

// ------------------------------------------------------------------ multi-teacher split

// One row of `count` tensors (element sizes, addresses); the kernels' walk for a block of
// `threads` threads with vector loads when `vectorized`.
template <class C>
void walk_multi_row(int vocab, const RowTensor* tensors, int count, int64_t row, bool vectorized, int threads) {
  constexpr int kW = kdfast::cuda::kGroupWidth<C>;
  int pad = 0;
  if (vectorized) {
    for (int i = 0; i < count; ++i) {
      const int own = kdfast::cuda::host_row_pad(tensors[i], row);
      pad = own > pad ? own : pad;
    }
  }
  const int groups = (vocab + pad + kW - 1) / kW;
  std::vector<int> hits(static_cast<size_t>(vocab), 0);
  for (int tid = 0; tid < threads; ++tid) {
    const ThreadBatches<C> batches(vocab, pad, 0, groups, threads, tid);
    for (int b = 0; b < batches.total; ++b) {
      int first[1];
      batches.first_elements(b, first);
      const bool partial = kdfast::cuda::batch_is_partial(batches, b);
      const bool inside = first[0] >= 0 && first[0] + kW <= vocab;
      if (!partial && !inside) fail("multi: vector batch outside the row", vocab, first[0], tid);
      if (partial && inside && vectorized && !(b == 0 && batches.head)) {
        fail("multi: element-wise batch inside the row", vocab, first[0], tid);
      }
      if (!partial && vectorized) {
        for (int i = 0; i < count; ++i) {
          const uint64_t address = reinterpret_cast<uintptr_t>(tensors[i].base) +
                                   static_cast<uint64_t>(row * tensors[i].row_stride + first[0]) *
                                       static_cast<uint64_t>(tensors[i].element_size);
          if (address % 16 != 0) fail("multi: unaligned vector load", vocab, first[0], i);
        }
      }
      for (int e = 0; e < kW; ++e) {
        const int index = first[0] + e;
        if (kdfast::cuda::in_row(index, vocab)) ++hits[static_cast<size_t>(index)];
      }
    }
  }
  for (int i = 0; i < vocab; ++i) {
    if (hits[static_cast<size_t>(i)] != 1) fail("multi: element not visited once", vocab, i, hits[static_cast<size_t>(i)]);
  }
  ++cases;
}

// Student (student_size bytes per element), `teachers` teachers and the gradient row, at the
// given element offsets and row strides; rows 0..3 of every block size.
template <class C>
void replay_multi(int vocab, int student_size, int teacher_size, int teachers, const int* offsets, int stride_extra,
                  bool expect_vector) {
  RowTensor tensors[kdfast::kCudaMaxTeachers + 2];
  int count = 0;
  const uintptr_t base = uintptr_t(1) << 20;  // a 16-byte aligned fake address
  tensors[count++] = {reinterpret_cast<const void*>(base + offsets[0] * student_size), vocab + stride_extra,
                      student_size};
  tensors[count++] = {reinterpret_cast<const void*>(base + offsets[1] * student_size), vocab, student_size};
  for (int m = 0; m < teachers; ++m) {
    tensors[count++] = {reinterpret_cast<const void*>(base + offsets[2 + m] * teacher_size), vocab + stride_extra,
                        teacher_size};
  }
  const bool vectorized = kdfast::cuda::rows_share_pad(tensors, count, 4, kdfast::cuda::kGroupWidth<C>);
  if (expect_vector && !vectorized) fail("multi: vector path refused", vocab, offsets[0], teachers);
  for (int threads = 32; threads <= 256; threads *= 2) {
    for (int64_t row = 0; row < 4; ++row) walk_multi_row<C>(vocab, tensors, count, row, vectorized, threads);
  }
}

void replay_multi_all() {
  const int vocabs[] = {1, 7, 8, 9, 33, 1000, 4099, 30522, 50257, 131077};
  int offsets[kdfast::kCudaMaxTeachers + 2];
  for (const int vocab : vocabs) {
    for (int offset = 0; offset < 8; ++offset) {
      for (int teachers : {1, 3, 16}) {
        // Contiguous rows at one element offset (gradient: its own buffer at the same offset).
        for (int i = 0; i < teachers + 2; ++i) offsets[i] = offset;
        replay_multi<float>(vocab, 2, 2, teachers, offsets, 0, vocab % 8 == 0);
        replay_multi<float>(vocab, 4, 2, teachers, offsets, 0, vocab % 8 == 0 && offset % 4 == offset);
        for (int i = 0; i < teachers + 2; ++i) offsets[i] = offset % 2;
        replay_multi<double>(vocab, 8, 8, teachers, offsets, 0, vocab % 2 == 0);
        // One teacher elsewhere on the grid, padded strides: whatever the host picks must be safe.
        for (int i = 0; i < teachers + 2; ++i) offsets[i] = offset;
        offsets[teachers + 1] = (offset + 3) % 8;
        replay_multi<float>(vocab, 2, 2, teachers, offsets, 8, false);
        replay_multi<float>(vocab, 2, 4, teachers, offsets, 5, false);
      }
    }
  }
}

// ------------------------------------------------------------------ multi-teacher arithmetic

// exp(d scale) as the kernels' ScaledExp<float> forms it (exp2 of d scale log2 e).
struct HostExp {
  float scale_log2;
  __host__ __device__ explicit HostExp(float scale) : scale_log2(scale * 1.44269504088896341f) {}
  __host__ __device__ float operator()(float d) const { return exp2f(d * scale_log2); }
};

double worst_divergence_error = 0.0, worst_gradient_error = 0.0;

// One row: student s and `teachers` teacher rows (float32 values), the forward kernel's runs
// for a block of `threads` threads (element-by-element split, pad 0), merged as the kernel
// merges them; D of every teacher against float64, and for reverse_kl the gradient's
// q κ (u_i - mean_u) against q (log q - log p - D).
void replay_math_row(const std::vector<float>& s, const std::vector<std::vector<float>>& t, double temperature,
                     kdfast::Divergence divergence, int threads, const char* label) {
  using kdfast::cuda::RunWeight;
  constexpr int kE = kdfast::cuda::kGroupWidth<float>;
  const int vocab = static_cast<int>(s.size());
  const int teachers = static_cast<int>(t.size());
  kdfast::KDOptions options;
  options.divergence = divergence;
  options.temperature = temperature;
  options.alpha = 0.0;
  const kdfast::rowmath::Coefficients<float> k = kdfast::rowmath::make_coefficients<float>(options, vocab);
  const RunWeight weight = divergence == kdfast::Divergence::ForwardKL ? RunWeight::Forward : RunWeight::Reverse;
  const HostExp exp_over_t(k.inv_scaled_t), exp_plain(k.inv_diff_scale);
  const int groups = (vocab + kE - 1) / kE;
  std::vector<kdfast::cuda::StudentRun<float>> student(static_cast<size_t>(threads));
  std::vector<kdfast::cuda::TeacherRun<float>> runs(static_cast<size_t>(threads * teachers));
  for (int tid = 0; tid < threads; ++tid) {
    student[static_cast<size_t>(tid)] = kdfast::cuda::empty_student_run<float>();
    for (int m = 0; m < teachers; ++m) runs[static_cast<size_t>(tid * teachers + m)] = kdfast::cuda::empty_teacher_run<float>();
    const ThreadBatches<float> batches(vocab, 0, 0, groups, threads, tid);
    for (int b = 0; b < batches.total; ++b) {
      int first[1];
      batches.first_elements(b, first);
      const bool partial = kdfast::cuda::batch_is_partial(batches, b);
      float x[kE], es[kE];
      for (int e = 0; e < kE; ++e) x[e] = first[0] + e < vocab ? s[static_cast<size_t>(first[0] + e)] : -INFINITY;
      const float factor = kdfast::cuda::add_student_batch<kE>(student[static_cast<size_t>(tid)], x, first[0], vocab,
                                                                partial, false, k, exp_over_t, exp_plain, es);
      for (int m = 0; m < teachers; ++m) {
        float y[kE];
        for (int e = 0; e < kE; ++e) {
          y[e] = first[0] + e < vocab ? t[static_cast<size_t>(m)][static_cast<size_t>(first[0] + e)] : -INFINITY;
        }
        kdfast::cuda::add_teacher_batch<kE>(runs[static_cast<size_t>(tid * teachers + m)], y, x, es, factor, weight, k,
                                            exp_over_t);
      }
    }
  }
  // The kernel's merge: maxima, each thread's runs moved onto them, sums.
  float row_max = -INFINITY;
  for (const auto& run : student) row_max = kdfast::cuda::run_max(row_max, run.max);
  float student_sum = 0.0f;
  std::vector<float> factors(static_cast<size_t>(threads));
  for (int tid = 0; tid < threads; ++tid) {
    factors[static_cast<size_t>(tid)] = kdfast::cuda::rebase_student(student[static_cast<size_t>(tid)], row_max, k);
    student_sum += student[static_cast<size_t>(tid)].sum_t;
  }
  const float log_sum_q = kdfast::rowmath::log_of_sum(student_sum);
  // float64 log-softmax of the float inputs.
  auto log_softmax = [&](const std::vector<float>& x) {
    double top = -INFINITY;
    for (const float v : x) top = std::fmax(top, static_cast<double>(v));
    double sum = 0.0;
    for (const float v : x) sum += std::exp((static_cast<double>(v) - top) / temperature);
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = (static_cast<double>(x[i]) - top) / temperature - std::log(sum);
    return out;
  };
  const std::vector<double> log_q = log_softmax(s);
  for (int m = 0; m < teachers; ++m) {
    float teacher_max = -INFINITY;
    for (int tid = 0; tid < threads; ++tid) {
      teacher_max = kdfast::cuda::run_max(teacher_max, runs[static_cast<size_t>(tid * teachers + m)].max);
    }
    float teacher_sum = 0.0f, weighted = 0.0f;
    for (int tid = 0; tid < threads; ++tid) {
      auto& run = runs[static_cast<size_t>(tid * teachers + m)];
      kdfast::cuda::move_teacher_run(run, teacher_max, factors[static_cast<size_t>(tid)], weight, k);
      teacher_sum += run.sum;
      weighted += run.weighted;
    }
    const float log_sum_p = kdfast::rowmath::log_of_sum(teacher_sum);
    float aux = 0.0f;
    const double d = kdfast::cuda::one_pass_divergence(weight, weighted, teacher_sum, student_sum, row_max, teacher_max,
                                                       log_sum_q, log_sum_p, k, aux);
    const std::vector<double> log_p = log_softmax(t[static_cast<size_t>(m)]);
    double expected = 0.0;
    for (int i = 0; i < vocab; ++i) {
      const double p = std::exp(log_p[static_cast<size_t>(i)]), q = std::exp(log_q[static_cast<size_t>(i)]);
      expected += weight == RunWeight::Forward ? p * (log_p[static_cast<size_t>(i)] - log_q[static_cast<size_t>(i)])
                                               : q * (log_q[static_cast<size_t>(i)] - log_p[static_cast<size_t>(i)]);
    }
    // Allowed: float32 sums (2e-5 relative) plus a few roundings of u_i = h s_i - h t_i at the
    // inputs' magnitude (R / T: the float32 resolution of the logits, which PyTorch's float32
    // log_softmax shares).
    double magnitude = 0.0;
    for (int i = 0; i < vocab; ++i) {
      magnitude = std::fmax(magnitude, std::fabs(static_cast<double>(s[static_cast<size_t>(i)])) +
                                           std::fabs(static_cast<double>(t[static_cast<size_t>(m)][static_cast<size_t>(i)])));
    }
    const double allowed = 2e-5 * std::fmax(1.0, std::fabs(expected)) + 4.0 * 0x1p-24 * magnitude / temperature;
    const double error = std::fabs(d - expected);
    worst_divergence_error = std::fmax(worst_divergence_error, error / allowed);
    if (!(error <= allowed)) {
      std::printf("  %s teacher %d: D %.9g expected %.9g\n", label, m, d, expected);
      fail("math: divergence", vocab, m, static_cast<long>(error * 1e9));
    }
    if (weight != RunWeight::Reverse) continue;
    float hi = 0.0f, lo = 0.0f;
    kdfast::cuda::reverse_kl_mean_u(aux, row_max, teacher_max, log_sum_p, log_sum_q, k, hi, lo);
    const float h = k.diff_scale, kappa = k.inv_scaled_t;
    double largest = 0.0;
    for (int i = 0; i < vocab; ++i) {
      const double qd = std::exp(log_q[static_cast<size_t>(i)]);
      largest = std::fmax(largest, std::fabs(qd * (log_q[static_cast<size_t>(i)] - log_p[static_cast<size_t>(i)] - expected)));
    }
    double worst = 0.0;
    for (int i = 0; i < vocab; ++i) {
      const float si = s[static_cast<size_t>(i)], ti = t[static_cast<size_t>(m)][static_cast<size_t>(i)];
      const float q = kdfast::rowmath::exp_c(kdfast::rowmath::scaled_difference(si, h, row_max * h) * kappa - log_sum_q);
      const float gradient = kdfast::rowmath::reverse_kl_grad(si * h - ti * h, hi, q, kappa, 1.0f, -lo);
      const double qd = std::exp(log_q[static_cast<size_t>(i)]);
      const double reference = qd * (log_q[static_cast<size_t>(i)] - log_p[static_cast<size_t>(i)] - expected);
      // Allowed: 1e-5 of the row's largest entry plus a few float32 roundings of the terms the
      // entry cancels, q (|log q| + |log p| + D + |s - t| / T): where q is near 1 and the teacher
      // near the student these are small, so an error at the scale of the logits (rounding at a
      // running maximum of logits spread over ±1e4) does not pass.
      const double terms = qd * (std::fabs(log_q[static_cast<size_t>(i)]) + std::fabs(log_p[static_cast<size_t>(i)]) +
                                 std::fabs(expected) + std::fabs(static_cast<double>(si) - ti) / temperature);
      const double allowed = 1e-5 * std::fmax(1e-3, largest) + 8.0 * 0x1p-24 * terms;
      const double error = std::fabs(static_cast<double>(gradient) - reference);
      worst = std::fmax(worst, error / allowed);
      if (!(error <= allowed)) {
        if (failures < 30) std::printf("  %s teacher %d: gradient[%d] %.9g expected %.9g\n", label, m, i, gradient, reference);
        fail("math: reverse_kl gradient", vocab, m, i);
      }
    }
    worst_gradient_error = std::fmax(worst_gradient_error, worst);
  }
  ++cases;
}

void replay_math_all() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int vocab : {37, 4099, 50257}) {
    for (const double scale : {1.0, 30.0, 1.0e4 / 3.0}) {
      for (const double temperature : {1.0, 2.0}) {
        for (const kdfast::Divergence divergence : {kdfast::Divergence::ForwardKL, kdfast::Divergence::ReverseKL}) {
          for (const int layout : {0, 1}) {  // spread around 0; student shifted by +scale, teachers by -scale
            std::vector<float> s(static_cast<size_t>(vocab));
            std::vector<std::vector<float>> t(2, std::vector<float>(static_cast<size_t>(vocab)));
            for (auto& v : s) v = static_cast<float>(normal(rng) * scale + (layout ? scale : 0.0));
            for (auto& row : t) {
              for (size_t i = 0; i < row.size(); ++i) {
                // The first teacher close to the student (q near p), the second independent.
                const float own = static_cast<float>(normal(rng) * scale - (layout ? scale : 0.0));
                row[i] = &row == &t[0] ? s[i] + static_cast<float>(0.3 * normal(rng) * std::sqrt(scale)) : own;
              }
            }
            char label[96];
            std::snprintf(label, sizeof(label), "V=%d scale=%g T=%g %s layout=%d", vocab, scale, temperature,
                          divergence == kdfast::Divergence::ForwardKL ? "forward_kl" : "reverse_kl", layout);
            for (const int threads : {32, 256}) replay_math_row(s, t, temperature, divergence, threads, label);
          }
        }
      }
    }
  }
  std::printf("worst error / allowed: divergence %.3g, reverse_kl gradient %.3g\n", worst_divergence_error,
              worst_gradient_error);
}

// ------------------------------------------------------------------ sparse windows

// One row of the sparse forward kernel: `cluster` blocks (1: no cluster), block r taking
// windows r, r + cluster, ... of the plan.
template <class C>
void replay_sparse(int vocab, int block, size_t limit, int pad, int cluster, std::mt19937& rng) {
  constexpr int kW = kdfast::cuda::kGroupWidth<C>;
  const kdfast::cuda::SparseBitmapPlan plan =
      cluster > 1 ? kdfast::cuda::plan_sparse_cluster(vocab, block, kW, 4096, limit, cluster)
                  : kdfast::cuda::plan_sparse_bitmap(vocab, block, kW, 4096, limit);
  if (!plan.fits) {
    fail("sparse: no plan", vocab, block, static_cast<long>(limit));
    return;
  }
  if (plan.dynamic_bytes + 4096 > limit) fail("sparse: plan over the limit", vocab, block, static_cast<long>(limit));
  // A kept set: about 1 in 50 elements, always the first and the last.
  std::vector<char> kept(static_cast<size_t>(vocab), 0);
  std::vector<int> indices;
  for (int i = 0; i < vocab; ++i) {
    if (i == 0 || i == vocab - 1 || rng() % 50 == 0) {
      kept[static_cast<size_t>(i)] = 1;
      indices.push_back(i);
    }
  }
  const int groups = (vocab + pad + kW - 1) / kW;
  std::vector<int> hits(static_cast<size_t>(vocab), 0), marked(static_cast<size_t>(vocab), 0);
  std::vector<unsigned> bitmap(static_cast<size_t>(plan.bitmap_words), 0u);
  if (plan.windows > 1 && plan.window_groups % block != 0) fail("sparse: window not whole block strides", vocab, block, 0);
  int windows = 0;
  for (int rank = 0; rank < cluster; ++rank) {
    for (int g_lo = rank * plan.window_groups; g_lo < groups || g_lo == 0; g_lo += cluster * plan.window_groups) {
      ++windows;
      const kdfast::cuda::RowWindow w = kdfast::cuda::row_window(g_lo, groups, plan.window_groups, pad, vocab, kW);
      std::fill(bitmap.begin(), bitmap.end(), 0u);
      for (const int index : indices) {  // mark_kept's rule
        if (index < w.lo || index >= w.hi) continue;
        const int offset = index - w.lo;
        if ((offset >> 5) >= plan.bitmap_words) {
          fail("sparse: kept index past the bitmap", vocab, index, plan.bitmap_words);
          continue;
        }
        bitmap[static_cast<size_t>(offset >> 5)] |= 1u << (offset & 31);
        ++marked[static_cast<size_t>(index)];
      }
      for (int tid = 0; tid < block; ++tid) {
        const ThreadBatches<C> batches(vocab, pad, g_lo, w.g_hi, block, tid);
        for (int b = 0; b < batches.total; ++b) {
          int first[1];
          batches.first_elements(b, first);
          const unsigned bits = kdfast::cuda::kept_bits(bitmap.data(), plan.bitmap_words, first[0] - w.lo);
          for (int e = 0; e < kW; ++e) {
            const int index = first[0] + e;
            if (!kdfast::cuda::in_row(index, vocab)) continue;
            ++hits[static_cast<size_t>(index)];
            if (index < w.lo || index >= w.hi) fail("sparse: element outside its window", vocab, index, g_lo);
            if (((bits >> e) & 1u) != static_cast<unsigned>(kept[static_cast<size_t>(index)])) {
              fail("sparse: kept bit wrong", vocab, index, g_lo);
            }
          }
        }
      }
    }
  }
  if (windows != plan.windows && !(groups < plan.window_groups && windows == 1)) {
    // plan.windows is counted for the largest pad; a smaller pad may need one window less.
    if (windows > plan.windows || windows < plan.windows - 1) fail("sparse: window count", vocab, windows, plan.windows);
  }
  for (int i = 0; i < vocab; ++i) {
    if (hits[static_cast<size_t>(i)] != 1) fail("sparse: element not visited once", vocab, i, hits[static_cast<size_t>(i)]);
    if (marked[static_cast<size_t>(i)] != kept[static_cast<size_t>(i)]) fail("sparse: index not marked once", vocab, i, 0);
  }
  ++cases;
}

void replay_sparse_all() {
  std::mt19937 rng(7);
  const size_t limits[] = {48 * 1024, 99 * 1024, 227 * 1024};
  for (const size_t limit : limits) {
    for (const int vocab : {1, 9, 4099, 50257, 400000, 800001, 1048576}) {
      for (const int block : {128, 256, 512}) {
        for (int pad = 0; pad < 8; ++pad) replay_sparse<float>(vocab, block, limit, pad, 1, rng);
        for (int pad = 0; pad < 2; ++pad) replay_sparse<double>(vocab, block, limit, pad, 1, rng);
      }
    }
  }
  // The cluster path (sm_90, few long rows): 2 to 8 blocks per row share the windows out.
  for (const int vocab : {16384, 50257, 256000, 1048576}) {
    for (const int cluster : {2, 3, 8}) {
      for (int pad = 0; pad < 8; pad += 3) replay_sparse<float>(vocab, 512, 227 * 1024, pad, cluster, rng);
      replay_sparse<double>(vocab, 512, 227 * 1024, 1, cluster, rng);
      replay_sparse<float>(vocab, 512, 99 * 1024, 5, cluster, rng);
    }
  }
  // Cluster sizes: none with as many rows as multiprocessors, 8 for 3 rows of 256000 on 132.
  if (kdfast::cuda::sparse_cluster_size(132, 256000, 512, 8, 132) != 1) fail("sparse: cluster for 132 rows", 0, 0, 0);
  if (kdfast::cuda::sparse_cluster_size(3, 256000, 512, 8, 132) != 8) fail("sparse: no cluster for 3 rows", 0, 0, 0);
  if (kdfast::cuda::sparse_cluster_size(3, 2000, 512, 8, 132) != 1) fail("sparse: cluster for a short row", 0, 0, 0);
  const kdfast::cuda::SparseBitmapPlan split = kdfast::cuda::plan_sparse_cluster(256000, 512, 8, 4096, 227 * 1024, 8);
  if (split.windows != 8 || split.bitmap_words * 4 > 4096 * 4) fail("sparse: 256000 over 8 blocks", split.windows, 0, 0);
  cases += 4;
  // The whole row in one bitmap wherever it fits (the unchanged fast path).
  const kdfast::cuda::SparseBitmapPlan small = kdfast::cuda::plan_sparse_bitmap(128256, 512, 8, 4096, 99 * 1024);
  if (small.windows != 1 || small.bitmap_words != (128256 + 31) / 32) fail("sparse: 128256 not one window", 0, 0, 0);
  const kdfast::cuda::SparseBitmapPlan large = kdfast::cuda::plan_sparse_bitmap(1048576, 512, 8, 4096, 99 * 1024);
  if (large.windows != 2) fail("sparse: 2^20 at 99 KiB not two windows", large.windows, 0, 0);
  const kdfast::cuda::SparseBitmapPlan h100 = kdfast::cuda::plan_sparse_bitmap(1048576, 512, 8, 4096, 227 * 1024);
  if (h100.windows != 1) fail("sparse: 2^20 at 227 KiB not one window", h100.windows, 0, 0);
  cases += 3;
}

// ------------------------------------------------------------------ plans

// The top-k cut's compaction, round by round as the kernel does (reads of a round before
// its writes, rounds in order), into `out` (the same vector as `in` for the in-place layout).
void compact(std::vector<int>& in_kept, const std::vector<int>& fresh, int m, const std::vector<char>& keep, int block,
             std::vector<int>& out) {
  const int total = m + static_cast<int>(fresh.size());
  int written = 0;
  std::vector<int> values(static_cast<size_t>(block));
  std::vector<char> flags(static_cast<size_t>(block));
  for (int base = 0; base < total; base += block) {
    for (int t = 0; t < block; ++t) {  // reads
      const int e = base + t;
      flags[static_cast<size_t>(t)] = e < total && keep[static_cast<size_t>(e)];
      if (e < total) values[static_cast<size_t>(t)] = e < m ? in_kept[static_cast<size_t>(e)] : fresh[static_cast<size_t>(e - m)];
    }
    int position = 0;
    for (int t = 0; t < block; ++t) {  // writes, at the scan's positions
      if (flags[static_cast<size_t>(t)]) out[static_cast<size_t>(written + position++)] = values[static_cast<size_t>(t)];
    }
    written += position;
  }
}

void replay_compaction(int k, int fresh_count, int block, std::mt19937& rng) {
  std::vector<int> kept(static_cast<size_t>(k)), fresh(static_cast<size_t>(fresh_count));
  for (int i = 0; i < k; ++i) kept[static_cast<size_t>(i)] = 1000000 + i;
  for (int i = 0; i < fresh_count; ++i) fresh[static_cast<size_t>(i)] = 2000000 + i;
  const int total = k + fresh_count;
  std::vector<char> keep(static_cast<size_t>(total), 0);
  // k survivors anywhere among kept and fresh entries.
  std::vector<int> order(static_cast<size_t>(total));
  for (int i = 0; i < total; ++i) order[static_cast<size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (int i = 0; i < k; ++i) keep[static_cast<size_t>(order[static_cast<size_t>(i)])] = 1;
  std::vector<int> separate(static_cast<size_t>(k), -1), in_place = kept;
  compact(kept, fresh, k, keep, block, separate);
  compact(in_place, fresh, k, keep, block, in_place);
  if (separate != in_place) fail("plans: in-place compaction differs", k, fresh_count, block);
  ++cases;
}

void replay_plans() {
  const size_t limits[] = {48 * 1024, 99 * 1024, 163 * 1024, 227 * 1024};
  const int ks[] = {1, 100, 1000, 1024, 2048, 3000, 4096};
  struct Dtype {
    int width;
    size_t entry;
    size_t static_bytes;
  };
  const Dtype dtypes[] = {{8, 8, 1552}, {2, 12, 1616}};  // float (4-byte keys), double (8-byte keys)
  for (const size_t limit : limits) {
    for (const Dtype& d : dtypes) {
      for (const int k : ks) {
        for (const int preferred : {128, 512}) {
          const kdfast::cuda::TopKSharedPlan plan =
              kdfast::cuda::plan_topk_shared(k, preferred, d.width, d.entry, d.static_bytes, limit);
          ++cases;
          const int64_t tile = static_cast<int64_t>(plan.block) * d.width;
          const int64_t sort = kdfast::cuda::plan_power_of_two_at_least(k);
          if (plan.buffer_capacity < tile || plan.buffer_capacity < sort || plan.buffer_capacity < plan.block) {
            fail("plans: top-k buffer too small", k, plan.buffer_capacity, plan.block);
          }
          const size_t copies = plan.double_kept ? 2 : 1;
          if (plan.dynamic_bytes != (copies * k + plan.buffer_capacity) * d.entry) fail("plans: top-k bytes", k, 0, 0);
          if (plan.fits && plan.dynamic_bytes + d.static_bytes > limit) fail("plans: top-k over the limit", k, 0, 0);
          const int64_t capacity = (static_cast<int64_t>(preferred) * d.width > sort) ? preferred * d.width : sort;
          const bool double_fits = (2 * k + capacity) * d.entry + d.static_bytes <= limit;
          if (double_fits && !(plan.block == preferred && plan.double_kept)) {
            fail("plans: top-k fastest layout not chosen", k, plan.block, static_cast<long>(limit));
          }
          const bool single_fits = (k + sort) * d.entry + d.static_bytes <= limit;  // the smallest layout
          if (single_fits != plan.fits && preferred >= 128) fail("plans: top-k fits wrong", k, plan.fits, static_cast<long>(limit));
        }
      }
    }
  }
  // The cases named for 99 KiB devices: k = 4096 fits in float32 (two kept buffers) and in
  // float64 (one kept buffer).
  const kdfast::cuda::TopKSharedPlan f32 = kdfast::cuda::plan_topk_shared(4096, 512, 8, 8, 1552, 99 * 1024);
  const kdfast::cuda::TopKSharedPlan f64 = kdfast::cuda::plan_topk_shared(4096, 512, 2, 12, 1616, 99 * 1024);
  if (!f32.fits || !f64.fits || f64.double_kept) fail("plans: k=4096 at 99 KiB", f32.fits, f64.fits, f64.double_kept);
  cases += 1;
  std::mt19937 rng(11);
  for (const int k : {1, 7, 100, 1000, 4096}) {
    for (const int fresh : {1, 255, 256, 4096}) {
      for (const int block : {128, 512}) replay_compaction(k, fresh, block, rng);
    }
  }
  // Multi-teacher forward: 256 threads whenever 3 M values per thread fit; halved otherwise.
  for (const size_t limit : limits) {
    for (int m = 0; m <= 16; ++m) {
      for (const size_t bytes : {sizeof(float), sizeof(double)}) {
        const int threads = kdfast::cuda::plan_multi_teacher_threads(m, 3, bytes, 256, 2048, limit);
        ++cases;
        if (threads < 32 || (threads & (threads - 1)) != 0) {
          fail("plans: multi-teacher block", m, threads, static_cast<long>(limit));
          continue;
        }
        if (static_cast<size_t>(m) * 3 * bytes * threads + 2048 > limit) fail("plans: multi-teacher over", m, threads, 0);
        if (threads < 256 && static_cast<size_t>(m) * 3 * bytes * threads * 2 + 2048 <= limit) {
          fail("plans: multi-teacher block not the largest", m, threads, static_cast<long>(limit));
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "all";
  const bool all = std::strcmp(mode, "all") == 0;
  if (all || std::strcmp(mode, "multi") == 0) replay_multi_all();
  if (all || std::strcmp(mode, "sparse") == 0) replay_sparse_all();
  if (all || std::strcmp(mode, "plans") == 0) replay_plans();
  if (all || std::strcmp(mode, "math") == 0) replay_math_all();
  std::printf("checked %ld cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
