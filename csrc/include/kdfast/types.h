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

// ---- top-k soft labels (compression and the sparse KD loss) ----

// Integer dtypes of soft-label indices. Values are part of the binding contract.
enum class IndexType : int32_t { Int64 = 0, Int32 = 1, Int16 = 2, UInt16 = 3 };
// How the sparse loss treats the mass outside the kept tokens.
enum class SparseTail : int32_t { Bucket = 0, Renormalize = 1 };

// compress_topk: per row, the k largest teacher logits (ties: lower index first), their
// log softmax(t/T) over the full row, and the log of the mass outside them (-inf if none).
struct TopKCompressArgs {
  const void* teacher = nullptr;  // [rows, vocab], vocabulary dimension contiguous
  DType teacher_dtype = DType::Float32;
  int64_t teacher_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;  // < 2^31
  int64_t k = 0;      // 1 <= k <= vocab
  double temperature = 1.0;
  // Outputs, contiguous: indices [rows, k] (int64 when indices_int64, else int32), sorted by
  // descending logit; logprobs [rows, k] and tail_logprob [rows] in the compute dtype
  // (float64 for a float64 teacher, else float32).
  void* indices = nullptr;
  bool indices_int64 = false;
  void* logprobs = nullptr;
  void* tail_logprob = nullptr;
  int num_threads = 1;
};

// Soft labels as the sparse loss reads them: [rows, k] indices and teacher log-probabilities
// and [rows] tail log-masses, all contiguous, in any of the storage dtypes.
struct SoftLabelView {
  const void* indices = nullptr;
  IndexType index_type = IndexType::Int32;
  const void* logprobs = nullptr;
  DType logprob_dtype = DType::Float32;
  const void* tail_logprob = nullptr;
  DType tail_dtype = DType::Float32;
  int64_t k = 0;
};

// Per-row values the sparse forward pass writes to row_stats, always in float64 (they are
// few, and the backward pass needs absolute log-sum-exps of logits as large as 1e4), in order:
//   0 tail_max        max of the non-kept student logits s (-inf if none, or not streamed)
//   1 tail_log_sum_T  log sum_{non-kept} exp((s - tail_max)/T)
//   2 student_norm    log-sum-exp of s/T over the row ("bucket") or over the kept tokens
//                     ("renormalize"): log Q_j = s_j/T - student_norm
//   3 lse_1           log-sum-exp of s over the row (cross-entropy)
//   4 teacher_norm    log-sum-exp of the teacher's bucket log-probabilities (renormalisation)
//   5 g_bar           G = sum_j Q_j dD/dQ_j
//   6 tail_coeff      w_tail - G Q_tail (gradient of D w.r.t. a tail logit, per unit share)
//   7 row loss
constexpr int kSparseRowStats = 8;

struct SparseKDForwardArgs {
  const void* student = nullptr;  // [rows, vocab], vocabulary dimension contiguous
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  SoftLabelView soft_labels;
  const int64_t* labels = nullptr;  // [rows] or null (every row valid, alpha must be 0)
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  SparseTail tail = SparseTail::Bucket;
  // Outputs: loss in the compute dtype (float64 for a float64 student, else float32),
  // [rows] when reduction == None, else a single element; row_stats [rows, kSparseRowStats]
  // and valid_rows (one element: rows whose label is not ignore_index) in float64.
  void* loss = nullptr;
  double* row_stats = nullptr;
  double* valid_rows = nullptr;
  int num_threads = 1;
};

// Error counts of a sparse forward call; the rows concerned have NaN loss and statistics.
struct SparseKDForwardResult {
  int64_t bad_labels = 0;       // labels outside [0, vocab) that are not ignore_index
  int64_t bad_index_rows = 0;   // rows with an index outside [0, vocab) or a repeated index
};

struct SparseKDBackwardArgs {
  const void* grad_output = nullptr;  // compute dtype; [rows] (stride 1) for None, else 1 element
  int64_t grad_output_stride = 0;
  const void* student = nullptr;
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  SoftLabelView soft_labels;
  const int64_t* labels = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  SparseTail tail = SparseTail::Bucket;
  const double* row_stats = nullptr;   // as written by the forward pass
  const double* valid_rows = nullptr;  // as written by the forward pass
  void* grad_student = nullptr;        // [rows, vocab] contiguous, in the student dtype
  int num_threads = 1;
};


// ---- multi-teacher KD loss ----

// How the M teachers combine: Sum is sum_m w_m D(p_m, q); Mixture is D(sum_m w_m p_m, q).
enum class Combine : int32_t { Sum = 0, Mixture = 1 };

// Per-row values of the multi-teacher forward pass, in the compute dtype: row_stats has
// kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * M columns:
//   0 student_max, 1 student_log_sum_T, 2 student_log_sum_1, 3 mixture aux (see
//   rowmath::RowStats::aux, for the mixture distribution), 4 row loss, 5 zero, then per
//   teacher m: teacher_max, teacher_log_sum, aux of D(p_m, q) (combine Sum).
constexpr int kMultiTeacherRowStatsBase = 6;
constexpr int kMultiTeacherStatsPerTeacher = 3;

// One struct for the forward and the backward pass. Teachers are M separate tensors
// [rows, vocab] (vocabulary contiguous), all of one dtype, each with its own row stride.
// Weights are already normalised (sum 1 over the teachers for every valid row), in the
// compute dtype: teacher m of row r has weight weights[m * weight_teacher_stride +
// r * weight_row_stride] (weight_row_stride 0 for per-teacher weights).
struct MultiTeacherKDArgs {
  const void* student = nullptr;
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  const void* const* teachers = nullptr;        // [num_teachers] row-major [rows, vocab] blocks
  const int64_t* teacher_row_strides = nullptr;  // [num_teachers]
  DType teacher_dtype = DType::Float32;
  int64_t num_teachers = 0;
  const void* weights = nullptr;
  int64_t weight_teacher_stride = 0;
  int64_t weight_row_stride = 0;
  const int64_t* labels = nullptr;  // [rows] or null (every row valid, alpha must be 0)
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  Combine combine = Combine::Sum;
  // Forward outputs (compute dtype): loss ([rows] for Reduction::None, else one element),
  // row_stats (see above), valid_rows (one element). The backward pass reads the last two.
  void* loss = nullptr;
  void* row_stats = nullptr;
  void* valid_rows = nullptr;
  // Backward: grad_output in the compute dtype ([rows], stride 1, for None, else one element,
  // stride 0); grad_student [rows, vocab] contiguous in the student dtype. The forward pass
  // with divergence ForwardKL also fills grad_student when it is set, then in the compute
  // dtype and for grad_output = 1 (the caller scales it).
  const void* grad_output = nullptr;
  int64_t grad_output_stride = 0;
  void* grad_student = nullptr;
  int num_threads = 1;
};

}  // namespace kdfast
