// Public entry points of the torch-free kdfast core. The binding layer (bindings.cpp) is
// the only caller. CPU entry points run synchronously on the calling thread plus an OpenMP
// team of args.num_threads; CUDA entry points (when compiled) enqueue on the given stream
// and never synchronise or allocate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kdfast/types.h"

namespace kdfast {

// Dense KD loss on the CPU. Returns the number of rows whose label is outside [0, vocab)
// and not ignore_index (their loss and statistics are NaN); the caller turns it into an error.
int64_t kd_forward_cpu(const KDForwardArgs& args);
void kd_backward_cpu(const KDBackwardArgs& args);

// Top-k soft labels on the CPU: compression (one read of each teacher row) and the sparse
// KD loss. Inputs are validated by the caller except for data-dependent errors, which the
// forward pass counts and returns (see SparseKDForwardResult).
void topk_compress_cpu(const TopKCompressArgs& args);
SparseKDForwardResult sparse_kd_forward_cpu(const SparseKDForwardArgs& args);
void sparse_kd_backward_cpu(const SparseKDBackwardArgs& args);

// Multi-teacher KD loss on the CPU (see MultiTeacherKDArgs). The forward pass returns the
// number of rows with a label outside [0, vocab) that is not ignore_index (NaN rows).
int64_t multi_teacher_forward_cpu(const MultiTeacherKDArgs& args);
void multi_teacher_backward_cpu(const MultiTeacherKDArgs& args);

// Test hook: exp(x / T) (T = 1 / inv_t) of the CPU kernels' vector lanes (csrc/cpu/exp_lanes.h)
// over n floats, run by the named instruction-set variant in the form the kernels use (folded
// coefficients where they are normal floats); cutoff = false is its form without the cutoff
// test. Returns false when that variant is not compiled in or not
// supported by this CPU.
bool scaled_exp_cpu(const std::string& variant, const float* x, int64_t n, float inv_t, bool cutoff, float* out);

// The page policy of the CPU kernels' fresh gradients (KDFAST_HUGE_PAGES, see dispatch.cpp)
// applied to `bytes` of freshly allocated, not yet written memory at `data`, for outputs that
// are written once from start to end outside the kernels. Does nothing below 8 MiB.
void advise_fresh_output_cpu(void* data, int64_t bytes);

// Build and runtime description for kdfast.build_info().
struct BuildInfo {
  std::string compiler;
  std::vector<std::string> cpu_variants;  // instruction-set variants compiled in
  std::string cpu_variant_selected;       // the one this machine runs
  bool openmp = false;
  int openmp_max_threads = 1;
  bool cuda = false;
  std::string cuda_version;
  std::vector<std::string> cuda_architectures;
};
BuildInfo build_info();

}  // namespace kdfast
