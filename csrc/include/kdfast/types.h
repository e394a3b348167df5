// kdfast core types: the dtype/divergence/reduction enums, their names, the limits of the CUDA
// kernels, and the plain argument structs that every kernel (CPU and CUDA) receives.
// Torch-free and pybind11-free: the binding layer fills these from integers and raw pointers;
// kernels never see Python or torch objects. The integer values of the enums are part of the
// binding contract: kdfast._C exports each enum's name table below (dtype_codes,
// divergence_codes, ...) and the limits (limits), and python/kdfast/ops reads them from there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kdfast {

// One entry of an enum's name table: the name Python uses and the enumerator.
template <class E>
struct NamedCode {
  const char* name;
  E code;
};

// True when table[i] holds code i for every i: a table lists its enum's codes once, in order.
template <class E, std::size_t N>
constexpr bool codes_in_order(const NamedCode<E> (&table)[N]) {
  for (std::size_t i = 0; i < N; ++i)
    if (static_cast<std::size_t>(table[i].code) != i) return false;
  return true;
}

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };
inline constexpr NamedCode<DType> kDTypeNames[] = {
    {"float32", DType::Float32}, {"bfloat16", DType::BFloat16}, {"float16", DType::Float16},
    {"float64", DType::Float64}};
static_assert(codes_in_order(kDTypeNames));

enum class Divergence : int32_t { ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };
inline constexpr NamedCode<Divergence> kDivergenceNames[] = {
    {"forward_kl", Divergence::ForwardKL}, {"reverse_kl", Divergence::ReverseKL}, {"jsd", Divergence::JSD},
    {"tvd", Divergence::TVD}};
static_assert(codes_in_order(kDivergenceNames));

enum class Reduction : int32_t { None = 0, Sum = 1, Mean = 2, BatchMean = 3 };
inline constexpr NamedCode<Reduction> kReductionNames[] = {
    {"none", Reduction::None}, {"sum", Reduction::Sum}, {"mean", Reduction::Mean}, {"batchmean", Reduction::BatchMean}};
static_assert(codes_in_order(kReductionNames));

inline int dtype_size(DType d) {
  switch (d) {
    case DType::Float32: return 4;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::Float64: return 8;
  }
  return 0;
}

// ---- limits of the CUDA kernels (here so that the binding layer sees them with or without CUDA) ----

// Most teachers the multi-teacher CUDA kernels take: their addresses and row strides travel by
// value in the kernel parameters (csrc/cuda/multi_teacher.cu).
constexpr int kCudaMaxTeachers = 16;
// Largest k of the CUDA top-k compression: its candidate buffers live in shared memory
// (csrc/cuda/topk_compress.cu).
constexpr int64_t kCudaMaxTopK = 4096;
// Largest vocabulary of the CUDA sparse-loss forward kernel: a per-row bitmap of the kept
// tokens lives in shared memory, 128 KiB at 2^20 (csrc/cuda/sparse_kd_loss.cu); on a device
// with less shared memory per block the kernel marks and streams the row window by window.
constexpr int64_t kCudaMaxSparseVocab = int64_t(1) << 20;

// Options shared by the forward and backward passes of every loss (dense, sparse, multi-teacher).
struct KDOptions {
  Divergence divergence = Divergence::ForwardKL;
  Reduction reduction = Reduction::Mean;
  double temperature = 1.0;      // T > 0
  double alpha = 0.0;            // weight of the hard-label cross-entropy, in [0, 1]
  double beta = 0.5;             // JSD mixture weight, in (0, 1)
  double label_smoothing = 0.0;  // epsilon in [0, 1)
  double divergence_scale = 1.0; // tau: T^2 when t2_scale, else 1
  int64_t ignore_index = -100;
  // forward_kl only: D is the soft-target cross-entropy -sum p log q = KL(p || q) + H(p)
  // instead of the KL (same gradient); the dense kernels only.
  bool teacher_entropy = false;
};

// What the forward and backward passes of every loss receive alike: the student logits, the
// hard labels, the sizes, the options and the thread count. Rows are the flattened leading
// dimensions; the vocabulary dimension is contiguous (stride 1) and consecutive rows are
// `*_row_stride` elements apart.
struct LossInputs {
  const void* student = nullptr;
  DType student_dtype = DType::Float32;
  int64_t student_row_stride = 0;
  const int64_t* labels = nullptr;  // [rows] or null (every row valid, alpha must be 0)
  int64_t rows = 0;
  int64_t vocab = 0;
  KDOptions options;
  int num_threads = 1;
};

// ---- dense KD loss ----

// Inputs of both passes of the dense KD loss: LossInputs plus one teacher's logits.
struct KDInputs : LossInputs {
  const void* teacher = nullptr;
  DType teacher_dtype = DType::Float32;
  int64_t teacher_row_stride = 0;
};

struct KDForwardArgs : KDInputs {
  // Outputs, in the compute dtype (float64 when the inputs are float64, else float32):
  void* loss = nullptr;        // [rows] when reduction == None, else a single element
  void* row_stats = nullptr;   // [rows, kRowStats]: rowmath::RowStats, the row loss, then 0 (CUDA float reverse_kl: aux and column 7 as docs/design.md says)
  void* valid_rows = nullptr;  // single element: number of rows whose label is not ignore_index
  // One-pass training (CPU kernels only; the CUDA kernels ignore it): when set, the forward pass
  // also writes the student gradient for grad_output = 1 with the reduction's scale folded in,
  // [rows, vocab] contiguous in the student dtype, each row while it is cache-resident. It may
  // be the student's own storage (rows contiguous): a row's gradient is written after the
  // row was read.
  void* grad_student = nullptr;
};

struct KDBackwardArgs : KDInputs {
  const void* grad_output = nullptr;  // compute dtype; [rows] (stride 1) for None, else 1 element
  int64_t grad_output_stride = 0;     // 1 for reduction None, 0 otherwise
  const void* row_stats = nullptr;    // as written by the forward pass
  const void* valid_rows = nullptr;   // as written by the forward pass (read on the device)
  void* grad_student = nullptr;       // [rows, vocab] contiguous, in the student dtype
  // CUDA, after the one-pass forward (grad_student already holds the gradient for
  // grad_output = 1): rows whose grad_output is 1 are not written again. The CPU kernels
  // ignore it (the CPU backward pass decides on the host).
  bool skip_unit_rows = false;
};

// Number of per-row values the forward pass writes to row_stats (see KDForwardArgs).
constexpr int kRowStats = 8;

// ---- top-k soft labels (compression and the sparse KD loss) ----

// Integer dtypes of soft-label indices. Values are part of the binding contract.
enum class IndexType : int32_t { Int64 = 0, Int32 = 1, Int16 = 2, UInt16 = 3 };
inline constexpr NamedCode<IndexType> kIndexTypeNames[] = {
    {"int64", IndexType::Int64}, {"int32", IndexType::Int32}, {"int16", IndexType::Int16},
    {"uint16", IndexType::UInt16}};
static_assert(codes_in_order(kIndexTypeNames));

// How the sparse loss treats the mass outside the kept tokens.
enum class SparseTail : int32_t { Bucket = 0, Renormalize = 1 };
inline constexpr NamedCode<SparseTail> kSparseTailNames[] = {{"bucket", SparseTail::Bucket},
                                                             {"renormalize", SparseTail::Renormalize}};
static_assert(codes_in_order(kSparseTailNames));

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
// few, and the backward pass needs log-sum-exps of logits as large as 3e38), in order:
//   0 tail_max        max of the non-kept student logits s (-inf if none, or not streamed)
//   1 tail_log_sum_T  log sum_{non-kept} exp((s - tail_max)/T)
//   2 student_norm    log-sum-exp of (s - M)/T over the row ("bucket") or over the kept tokens
//                     ("renormalize"): log Q_j = (s_j - M)/T - student_norm, with M the largest
//                     logit it covers (sparse::reference_logit, which the backward pass
//                     recomputes from the kept logits and tail_max)
//   3 lse_1           log-sum-exp of s - M1 over the row (cross-entropy), M1 the row's largest logit
//   4 teacher_norm    log-sum-exp of the teacher's bucket log-probabilities (renormalisation)
//   5 g_bar           G = sum_j Q_j dD/dQ_j
//   6 tail_coeff      w_tail - G Q_tail (gradient of D w.r.t. a tail logit, per unit share)
//   7 row loss
constexpr int kSparseRowStats = 8;

// Inputs of both passes of the sparse KD loss: LossInputs plus the soft labels and the tail mode.
struct SparseKDInputs : LossInputs {
  SoftLabelView soft_labels;
  SparseTail tail = SparseTail::Bucket;
};

struct SparseKDForwardArgs : SparseKDInputs {
  // Outputs: loss in the compute dtype (float64 for a float64 student, else float32),
  // [rows] when reduction == None, else a single element; row_stats [rows, kSparseRowStats]
  // and valid_rows (one element: rows whose label is not ignore_index) in float64.
  void* loss = nullptr;
  double* row_stats = nullptr;
  double* valid_rows = nullptr;
  // One-pass training: when set, the forward pass also writes the student gradient for
  // grad_output = 1 with the reduction's scale folded in, [rows, vocab] contiguous in the
  // student dtype, each row right after its statistics. On the CPU it may be the student's own
  // storage (rows contiguous); on CUDA it must not alias the student.
  void* grad_student = nullptr;
};

// Error counts of a sparse forward call; the rows concerned have NaN loss and statistics.
struct SparseKDForwardResult {
  int64_t bad_labels = 0;       // labels outside [0, vocab) that are not ignore_index
  int64_t bad_index_rows = 0;   // rows with an index outside [0, vocab) or a repeated index
};

struct SparseKDBackwardArgs : SparseKDInputs {
  const void* grad_output = nullptr;  // compute dtype; [rows] (stride 1) for None, else 1 element
  int64_t grad_output_stride = 0;
  const double* row_stats = nullptr;   // as written by the forward pass
  const double* valid_rows = nullptr;  // as written by the forward pass
  void* grad_student = nullptr;        // [rows, vocab] contiguous, in the student dtype
  // CUDA, after the one-pass forward: rows whose grad_output is 1 are not written again (as
  // KDBackwardArgs::skip_unit_rows). The CPU kernels ignore it.
  bool skip_unit_rows = false;
};


// ---- multi-teacher KD loss ----

// How the M teachers combine: Sum is sum_m w_m D(p_m, q); Mixture is D(sum_m w_m p_m, q).
enum class Combine : int32_t { Sum = 0, Mixture = 1 };
inline constexpr NamedCode<Combine> kCombineNames[] = {{"sum", Combine::Sum}, {"mixture", Combine::Mixture}};
static_assert(codes_in_order(kCombineNames));

// Per-row values of the multi-teacher forward pass, in the compute dtype: row_stats has
// kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * M columns:
//   0 student_max, 1 student_log_sum_T, 2 student_log_sum_1, 3 mixture aux (see
//   rowmath::RowStats::aux, for the mixture distribution), 4 row loss, 5 zero, then per
//   teacher m: teacher_max, teacher_log_sum, aux of D(p_m, q) (combine Sum).
constexpr int kMultiTeacherRowStatsBase = 6;
constexpr int kMultiTeacherStatsPerTeacher = 3;

// One struct for the forward and the backward pass: LossInputs plus the teachers and their
// weights, then the outputs of both passes. Teachers are M separate tensors [rows, vocab]
// (vocabulary contiguous), all of one dtype, each with its own row stride. Weights are
// already normalised (sum 1 over the teachers for every valid row), in the compute dtype:
// teacher m of row r has weight weights[m * weight_teacher_stride + r * weight_row_stride]
// (weight_row_stride 0 for per-teacher weights).
struct MultiTeacherKDArgs : LossInputs {
  const void* const* teachers = nullptr;        // [num_teachers] row-major [rows, vocab] blocks
  const int64_t* teacher_row_strides = nullptr;  // [num_teachers]
  DType teacher_dtype = DType::Float32;
  int64_t num_teachers = 0;
  const void* weights = nullptr;
  int64_t weight_teacher_stride = 0;
  int64_t weight_row_stride = 0;
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
};

}  // namespace kdfast
