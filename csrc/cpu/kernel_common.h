// Small helpers every CPU kernel file shares: the -inf constant, the rule for how many
// OpenMP threads a call uses, and the ignore_index test. Like convert.h, they live in the
// instruction-set variant's namespace so that no variant ever calls another's copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#ifndef KDFAST_CPU_VARIANT
#error "kernel_common.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

template <class C>
constexpr C kNegInf = -std::numeric_limits<C>::infinity();

// Below this many elements of work per call, one thread is faster than waking a team.
constexpr int64_t kParallelThreshold = 1 << 15;

// Threads for a call over `rows` rows of `work_per_row` elements each: at most `requested`
// (torch.get_num_threads()) and at most one per row; one for small calls.
inline int threads_for(int requested, int64_t rows, int64_t work_per_row) {
  if (rows * work_per_row < kParallelThreshold) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, rows)));
}

// A row takes part in the loss unless its label equals ignore_index (no labels: every row).
inline bool label_valid(const int64_t* labels, int64_t row, int64_t ignore_index) {
  return labels == nullptr || labels[row] != ignore_index;
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
