// Small helpers every CPU kernel file shares: the -inf and NaN constants, the rule for how many
// OpenMP threads a call uses, and the ignore_index test. Like convert.h, they live in the
// instruction-set variant's namespace so that no variant ever calls another's copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kdfast/types.h"

// GCC before 13 reports a stack buffer that one vectorised loop fills and another reads as
// "may be used uninitialized" (it does not follow the first loop's trip count). Code between
// these brackets reads only buffers a loop over the same n elements has filled.
#if defined(__GNUC__) && !defined(__clang__)
#define KDFAST_FILLED_BUFFERS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define KDFAST_FILLED_BUFFERS_END _Pragma("GCC diagnostic pop")
#else
#define KDFAST_FILLED_BUFFERS_BEGIN
#define KDFAST_FILLED_BUFFERS_END
#endif

#ifndef KDFAST_CPU_VARIANT
#error "kernel_common.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

template <class C>
constexpr C kNegInf = -std::numeric_limits<C>::infinity();
template <class C>
constexpr C kNaN = std::numeric_limits<C>::quiet_NaN();

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

// Reduces the per-row losses kept in column `loss_column` of row_stats (row width
// `stats_width`) as options.reduction asks, in a fixed order with a double accumulator
// (deterministic for any thread count): per-row copies for None, else one value (mean over
// valid rows and 0 when none, sum, or sum / rows). Writes the valid-row count too.
template <class C, class Stat, class Count>
void reduce_row_losses(const Stat* row_stats, int64_t stats_width, int64_t loss_column, int64_t rows,
                       const int64_t* labels, const KDOptions& options, C* loss, Count* valid_rows) {
  double total = 0.0;
  int64_t valid = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const Stat row_loss = row_stats[row * stats_width + loss_column];
    if (options.reduction == Reduction::None) loss[row] = static_cast<C>(row_loss);
    total += static_cast<double>(row_loss);
    valid += label_valid(labels, row, options.ignore_index) ? 1 : 0;
  }
  if (options.reduction != Reduction::None) {
    double value = total;
    if (options.reduction == Reduction::Mean) value = valid > 0 ? total / static_cast<double>(valid) : 0.0;
    if (options.reduction == Reduction::BatchMean) value = rows > 0 ? total / static_cast<double>(rows) : 0.0;
    *loss = static_cast<C>(value);
  }
  *valid_rows = static_cast<Count>(valid);
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
