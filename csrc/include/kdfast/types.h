// kdfast core types: the dtype/divergence/reduction enums and the plain argument structs
// that every kernel (CPU and CUDA) receives. Torch-free and pybind11-free: the binding layer
// fills these from integers and raw pointers; kernels never see Python or torch objects.
// Integer values of the enums are part of the binding contract (python/kdfast/ops mirrors them).
#pragma once

#include <cstdint>

namespace kdfast {

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };
enum class Divergence : int32_t { ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };
enum class Reduction : int32_t { None = 0, Sum = 1, Mean = 2, BatchMean = 3 };

inline int dtype_size(DType d) {
  switch (d) {
    case DType::Float32: return 4;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::Float64: return 8;
  }
  return 0;
}

// Options shared by the forward and backward passes of the dense KD loss.
struct KDOptions {
  Divergence divergence = Divergence::ForwardKL;
  Reduction reduction = Reduction::Mean;
  double temperature = 1.0;      // T > 0
  double alpha = 0.0;            // weight of the hard-label cross-entropy, in [0, 1]
  double beta = 0.5;             // JSD mixture weight, in (0, 1)
  double label_smoothing = 0.0;  // epsilon in [0, 1)
  double divergence_scale = 1.0; // tau: T^2 when t2_scale, else 1
  int64_t ignore_index = -100;
};

// Rows are the flattened leading dimensions; the vocabulary dimension is contiguous
// (stride 1) and consecutive rows are `*_row_stride` elements apart.
struct KDForwardArgs {
  const void* student = nullptr;
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;
  DType teacher_dtype = DType::Float32;
  int64_t teacher_row_stride = 0;
  const int64_t* labels = nullptr;  // [rows] or null (every row valid, alpha must be 0)
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  // Outputs, in the compute dtype (float64 when the inputs are float64, else float32):
  void* loss = nullptr;        // [rows] when reduction == None, else a single element
  void* row_stats = nullptr;   // [rows, kRowStats]: see rowmath::RowStats, then the row loss, then 0
  void* valid_rows = nullptr;  // single element: number of rows whose label is not ignore_index
  int num_threads = 1;
};

struct KDBackwardArgs {
  const void* grad_output = nullptr;  // compute dtype; [rows] (stride 1) for None, else 1 element
  int64_t grad_output_stride = 0;     // 1 for reduction None, 0 otherwise
  const void* student = nullptr;
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  const void* teacher = nullptr;
  DType teacher_dtype = DType::Float32;
  int64_t teacher_row_stride = 0;
  const int64_t* labels = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  const void* row_stats = nullptr;   // as written by the forward pass
  const void* valid_rows = nullptr;  // as written by the forward pass (read on the device)
  void* grad_student = nullptr;     // [rows, vocab] contiguous, in the student dtype
  int num_threads = 1;
};

// Number of per-row values the forward pass writes to row_stats (see KDForwardArgs).
constexpr int kRowStats = 8;

}  // namespace kdfast
