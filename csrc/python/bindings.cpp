// The only pybind11 file: exposes the torch-free core as kdfast._C. Every tensor arrives
// as a raw address (int) plus dtype code, sizes and strides, already validated by the
// Python layer (python/kdfast/ops); the GIL is released for every kernel call.
// device_index < 0 means CPU; otherwise the CUDA kernels run on `stream` (cudaStream_t as int).
// Besides the kernels the module exports, as attributes, the integer codes of the core's enums
// (dtype_codes, divergence_codes, reduction_codes, tail_codes, combine_codes,
// index_dtype_codes: name -> code, from the tables in types.h), the row_stats widths, the
// CUDA kernels' limits (limits) and whether they are compiled in (has_cuda, has_cuda_topk).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kdfast/kdfast.h"
#include "kdfast/rowmath.h"

namespace py = pybind11;

namespace kdfast {
#if defined(KDFAST_WITH_CUDA)
int64_t kd_forward_cuda(const KDForwardArgs& args, int device_index, uintptr_t stream);
void kd_backward_cuda(const KDBackwardArgs& args, int device_index, uintptr_t stream);
// ---- top-k soft labels on CUDA (csrc/cuda/topk_compress.cu, csrc/cuda/sparse_kd_loss.cu) ----
void topk_compress_cuda(const TopKCompressArgs& args, int device_index, uintptr_t stream);
SparseKDForwardResult sparse_kd_forward_cuda(const SparseKDForwardArgs& args, int device_index, uintptr_t stream);
void sparse_kd_backward_cuda(const SparseKDBackwardArgs& args, int device_index, uintptr_t stream);
// multi-teacher (csrc/cuda/multi_teacher.cu)
int64_t multi_teacher_forward_cuda(const MultiTeacherKDArgs& args, int device_index, uintptr_t stream);
void multi_teacher_backward_cuda(const MultiTeacherKDArgs& args, int device_index, uintptr_t stream);
#endif
}  // namespace kdfast

namespace {

using kdfast::DType;
using kdfast::KDOptions;

KDOptions make_options(int divergence, int reduction, double temperature, double alpha, double beta,
                       double label_smoothing, double divergence_scale, int64_t ignore_index) {
  KDOptions o;
  o.divergence = static_cast<kdfast::Divergence>(divergence);
  o.reduction = static_cast<kdfast::Reduction>(reduction);
  o.temperature = temperature;
  o.alpha = alpha;
  o.beta = beta;
  o.label_smoothing = label_smoothing;
  o.divergence_scale = divergence_scale;
  o.ignore_index = ignore_index;
  return o;
}

template <class T>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

// The LossInputs part of every loss's arguments: student, labels, sizes, options, threads.
void fill_loss_inputs(kdfast::LossInputs& a, uintptr_t student, int student_dtype, int64_t student_row_stride,
                      uintptr_t labels, int64_t rows, int64_t vocab, const KDOptions& options, int num_threads) {
  a.student = as_ptr<const void>(student);
  a.student_dtype = static_cast<DType>(student_dtype);
  a.student_row_stride = student_row_stride;
  a.labels = as_ptr<const int64_t>(labels);
  a.rows = rows;
  a.vocab = vocab;
  a.options = options;
  a.num_threads = num_threads;
}

// The inputs kd_forward and kd_backward share.
void fill_dense_inputs(kdfast::KDInputs& a, uintptr_t student, int student_dtype, int64_t student_row_stride,
                       uintptr_t teacher, int teacher_dtype, int64_t teacher_row_stride, uintptr_t labels, int64_t rows,
                       int64_t vocab, const KDOptions& options, int num_threads) {
  fill_loss_inputs(a, student, student_dtype, student_row_stride, labels, rows, vocab, options, num_threads);
  a.teacher = as_ptr<const void>(teacher);
  a.teacher_dtype = static_cast<DType>(teacher_dtype);
  a.teacher_row_stride = teacher_row_stride;
}

#if !defined(KDFAST_WITH_CUDA)
[[noreturn]] void no_cuda() {
  throw std::runtime_error("kdfast was built without CUDA kernels; reinstall with a CUDA toolkit (KDFAST_CUDA=ON)");
}
#endif

// The CUDA one-pass kernels read the student row again after writing gradient elements: the
// gradient written over the student (in place) is CPU-only.
void refuse_cuda_inplace(uintptr_t grad_student, uintptr_t student, const char* function) {
  if (grad_student != 0 && grad_student == student) {
    throw std::invalid_argument(std::string(function) + ": the in-place gradient (grad_student == student) is CPU-only");
  }
}

int64_t kd_forward(uintptr_t student, int student_dtype, int64_t student_row_stride, uintptr_t teacher,
                   int teacher_dtype, int64_t teacher_row_stride, uintptr_t labels, int64_t rows, int64_t vocab,
                   int divergence, int reduction, double temperature, double alpha, double beta,
                   double label_smoothing, double divergence_scale, int64_t ignore_index, uintptr_t loss,
                   uintptr_t row_stats, uintptr_t valid_rows, int num_threads, int device_index, uintptr_t stream,
                   uintptr_t grad_student, bool teacher_entropy) {
  kdfast::KDForwardArgs a;
  KDOptions options =
      make_options(divergence, reduction, temperature, alpha, beta, label_smoothing, divergence_scale, ignore_index);
  options.teacher_entropy = teacher_entropy;
  fill_dense_inputs(a, student, student_dtype, student_row_stride, teacher, teacher_dtype, teacher_row_stride, labels,
                    rows, vocab, options, num_threads);
  a.loss = as_ptr<void>(loss);
  a.row_stats = as_ptr<void>(row_stats);
  a.valid_rows = as_ptr<void>(valid_rows);
  a.grad_student = as_ptr<void>(grad_student);
  if (device_index < 0) return kdfast::kd_forward_cpu(a);
  refuse_cuda_inplace(grad_student, student, "kd_forward");
#if defined(KDFAST_WITH_CUDA)
  return kdfast::kd_forward_cuda(a, device_index, stream);
#else
  (void)stream;
  no_cuda();
#endif
}

void kd_backward(uintptr_t grad_output, int64_t grad_output_stride, uintptr_t student, int student_dtype,
                 int64_t student_row_stride, uintptr_t teacher, int teacher_dtype, int64_t teacher_row_stride,
                 uintptr_t labels, int64_t rows, int64_t vocab, int divergence, int reduction, double temperature,
                 double alpha, double beta, double label_smoothing, double divergence_scale, int64_t ignore_index,
                 uintptr_t row_stats, uintptr_t valid_rows, uintptr_t grad_student, int num_threads, int device_index,
                 uintptr_t stream, bool skip_unit_rows) {
  kdfast::KDBackwardArgs a;
  fill_dense_inputs(a, student, student_dtype, student_row_stride, teacher, teacher_dtype, teacher_row_stride, labels,
                    rows, vocab,
                    make_options(divergence, reduction, temperature, alpha, beta, label_smoothing, divergence_scale,
                                 ignore_index),
                    num_threads);
  a.grad_output = as_ptr<const void>(grad_output);
  a.grad_output_stride = grad_output_stride;
  a.row_stats = as_ptr<const void>(row_stats);
  a.valid_rows = as_ptr<const void>(valid_rows);
  a.grad_student = as_ptr<void>(grad_student);
  a.skip_unit_rows = skip_unit_rows;
  if (device_index < 0) return kdfast::kd_backward_cpu(a);
#if defined(KDFAST_WITH_CUDA)
  kdfast::kd_backward_cuda(a, device_index, stream);
#else
  (void)stream;
  no_cuda();
#endif
}

void topk_compress(uintptr_t teacher, int teacher_dtype, int64_t teacher_row_stride, int64_t rows, int64_t vocab,
                   int64_t k, double temperature, uintptr_t indices, bool indices_int64, uintptr_t logprobs,
                   uintptr_t tail_logprob, int num_threads, int device_index, uintptr_t stream) {
  if (vocab >= (int64_t(1) << 31))
    throw std::invalid_argument("compress_topk: vocab sizes of 2^31 or more are not supported");
  kdfast::TopKCompressArgs a;
  a.teacher = as_ptr<const void>(teacher);
  a.teacher_dtype = static_cast<DType>(teacher_dtype);
  a.teacher_row_stride = teacher_row_stride;
  a.rows = rows;
  a.vocab = vocab;
  a.k = k;
  a.temperature = temperature;
  a.indices = as_ptr<void>(indices);
  a.indices_int64 = indices_int64;
  a.logprobs = as_ptr<void>(logprobs);
  a.tail_logprob = as_ptr<void>(tail_logprob);
  a.num_threads = num_threads;
  if (device_index < 0) return kdfast::topk_compress_cpu(a);
#if defined(KDFAST_WITH_CUDA)
  kdfast::topk_compress_cuda(a, device_index, stream);
#else
  (void)stream;
  throw std::runtime_error(
      "kdfast: compress_topk has no CUDA kernel in this build; kdfast.reference.compress_topk runs on any device");
#endif
}

kdfast::SoftLabelView make_soft_labels(uintptr_t indices, int index_type, uintptr_t logprobs, int logprob_dtype,
                                       uintptr_t tail_logprob, int tail_dtype, int64_t k) {
  kdfast::SoftLabelView v;
  v.indices = as_ptr<const void>(indices);
  v.index_type = static_cast<kdfast::IndexType>(index_type);
  v.logprobs = as_ptr<const void>(logprobs);
  v.logprob_dtype = static_cast<DType>(logprob_dtype);
  v.tail_logprob = as_ptr<const void>(tail_logprob);
  v.tail_dtype = static_cast<DType>(tail_dtype);
  v.k = k;
  return v;
}

// The inputs sparse_kd_forward and sparse_kd_backward share.
void fill_sparse_inputs(kdfast::SparseKDInputs& a, uintptr_t student, int student_dtype, int64_t student_row_stride,
                        uintptr_t indices, int index_type, uintptr_t logprobs, int logprob_dtype,
                        uintptr_t tail_logprob, int tail_dtype, uintptr_t labels, int64_t rows, int64_t vocab,
                        int64_t k, int tail_mode, const KDOptions& options, int num_threads) {
  fill_loss_inputs(a, student, student_dtype, student_row_stride, labels, rows, vocab, options, num_threads);
  a.soft_labels = make_soft_labels(indices, index_type, logprobs, logprob_dtype, tail_logprob, tail_dtype, k);
  a.tail = static_cast<kdfast::SparseTail>(tail_mode);
}

#if !defined(KDFAST_WITH_CUDA)
[[noreturn]] void no_sparse_cuda() {
  throw std::runtime_error(
      "kdfast: sparse_kd_loss has no CUDA kernel in this build; kdfast.reference.sparse_kd_loss runs on any device");
}
#endif

std::pair<int64_t, int64_t> sparse_kd_forward(uintptr_t student, int student_dtype, int64_t student_row_stride,
                                              uintptr_t indices, int index_type, uintptr_t logprobs, int logprob_dtype,
                                              uintptr_t tail_logprob, int tail_dtype, uintptr_t labels, int64_t rows,
                                              int64_t vocab, int64_t k, int divergence, int tail_mode, int reduction,
                                              double temperature, double alpha, double beta, double label_smoothing,
                                              double divergence_scale, int64_t ignore_index, uintptr_t loss,
                                              uintptr_t row_stats, uintptr_t valid_rows, int num_threads,
                                              int device_index, uintptr_t stream, uintptr_t grad_student) {
  kdfast::SparseKDForwardArgs a;
  fill_sparse_inputs(a, student, student_dtype, student_row_stride, indices, index_type, logprobs, logprob_dtype,
                     tail_logprob, tail_dtype, labels, rows, vocab, k, tail_mode,
                     make_options(divergence, reduction, temperature, alpha, beta, label_smoothing, divergence_scale,
                                  ignore_index),
                     num_threads);
  a.loss = as_ptr<void>(loss);
  a.row_stats = as_ptr<double>(row_stats);
  a.valid_rows = as_ptr<double>(valid_rows);
  a.grad_student = as_ptr<void>(grad_student);
  if (device_index >= 0) {
    refuse_cuda_inplace(grad_student, student, "sparse_kd_forward");
#if defined(KDFAST_WITH_CUDA)
    const kdfast::SparseKDForwardResult result = kdfast::sparse_kd_forward_cuda(a, device_index, stream);
    return {result.bad_labels, result.bad_index_rows};
#else
    no_sparse_cuda();
#endif
  }
  (void)stream;
  const kdfast::SparseKDForwardResult result = kdfast::sparse_kd_forward_cpu(a);
  return {result.bad_labels, result.bad_index_rows};
}

void sparse_kd_backward(uintptr_t grad_output, int64_t grad_output_stride, uintptr_t student, int student_dtype,
                        int64_t student_row_stride, uintptr_t indices, int index_type, uintptr_t logprobs,
                        int logprob_dtype, uintptr_t tail_logprob, int tail_dtype, uintptr_t labels, int64_t rows,
                        int64_t vocab, int64_t k, int divergence, int tail_mode, int reduction, double temperature,
                        double alpha, double beta, double label_smoothing, double divergence_scale,
                        int64_t ignore_index, uintptr_t row_stats, uintptr_t valid_rows, uintptr_t grad_student,
                        int num_threads, int device_index, uintptr_t stream, bool skip_unit_rows) {
  kdfast::SparseKDBackwardArgs a;
  fill_sparse_inputs(a, student, student_dtype, student_row_stride, indices, index_type, logprobs, logprob_dtype,
                     tail_logprob, tail_dtype, labels, rows, vocab, k, tail_mode,
                     make_options(divergence, reduction, temperature, alpha, beta, label_smoothing, divergence_scale,
                                  ignore_index),
                     num_threads);
  a.grad_output = as_ptr<const void>(grad_output);
  a.grad_output_stride = grad_output_stride;
  a.row_stats = as_ptr<const double>(row_stats);
  a.valid_rows = as_ptr<const double>(valid_rows);
  a.grad_student = as_ptr<void>(grad_student);
  a.skip_unit_rows = skip_unit_rows;
  if (device_index >= 0) {
#if defined(KDFAST_WITH_CUDA)
    return kdfast::sparse_kd_backward_cuda(a, device_index, stream);
#else
    no_sparse_cuda();
#endif
  }
  (void)stream;
  kdfast::sparse_kd_backward_cpu(a);
}

// Multi-teacher KD loss: the M teachers arrive as lists of addresses and row strides (one
// dtype for all). device_index >= 0 runs the CUDA kernels (when built) on `stream`.
kdfast::MultiTeacherKDArgs make_multi_teacher_args(
    uintptr_t student, int student_dtype, int64_t student_row_stride, const std::vector<uintptr_t>& teachers,
    const std::vector<int64_t>& teacher_row_strides, int teacher_dtype, uintptr_t weights,
    int64_t weight_teacher_stride, int64_t weight_row_stride, uintptr_t labels, int64_t rows, int64_t vocab,
    int combine, int divergence, int reduction, double temperature, double alpha, double beta, double label_smoothing,
    double divergence_scale, int64_t ignore_index, uintptr_t row_stats, uintptr_t valid_rows, int num_threads,
    int device_index) {
  if (teachers.empty() || teachers.size() != teacher_row_strides.size())
    throw std::invalid_argument("multi_teacher_kd: need one row stride per teacher and at least one teacher");
#if defined(KDFAST_WITH_CUDA)
  (void)device_index;
#else
  if (device_index >= 0) no_cuda();
#endif
  kdfast::MultiTeacherKDArgs a;
  fill_loss_inputs(a, student, student_dtype, student_row_stride, labels, rows, vocab,
                   make_options(divergence, reduction, temperature, alpha, beta, label_smoothing, divergence_scale,
                                ignore_index),
                   num_threads);
  a.teachers = reinterpret_cast<const void* const*>(teachers.data());
  a.teacher_row_strides = teacher_row_strides.data();
  a.teacher_dtype = static_cast<DType>(teacher_dtype);
  a.num_teachers = static_cast<int64_t>(teachers.size());
  a.weights = as_ptr<const void>(weights);
  a.weight_teacher_stride = weight_teacher_stride;
  a.weight_row_stride = weight_row_stride;
  a.combine = static_cast<kdfast::Combine>(combine);
  a.row_stats = as_ptr<void>(row_stats);
  a.valid_rows = as_ptr<void>(valid_rows);
  return a;
}

int64_t multi_teacher_forward(uintptr_t student, int student_dtype, int64_t student_row_stride,
                              const std::vector<uintptr_t>& teachers, const std::vector<int64_t>& teacher_row_strides,
                              int teacher_dtype, uintptr_t weights, int64_t weight_teacher_stride,
                              int64_t weight_row_stride, uintptr_t labels, int64_t rows, int64_t vocab, int combine,
                              int divergence, int reduction, double temperature, double alpha, double beta,
                              double label_smoothing, double divergence_scale, int64_t ignore_index, uintptr_t loss,
                              uintptr_t row_stats, uintptr_t valid_rows, int num_threads, int device_index,
                              uintptr_t grad_student, uintptr_t stream) {
  kdfast::MultiTeacherKDArgs a = make_multi_teacher_args(
      student, student_dtype, student_row_stride, teachers, teacher_row_strides, teacher_dtype, weights,
      weight_teacher_stride, weight_row_stride, labels, rows, vocab, combine, divergence, reduction, temperature, alpha,
      beta, label_smoothing, divergence_scale, ignore_index, row_stats, valid_rows, num_threads, device_index);
  a.loss = as_ptr<void>(loss);
  // forward_kl only: also the gradient for grad_output = 1, in the compute dtype (0: not wanted).
  a.grad_student = as_ptr<void>(grad_student);
#if defined(KDFAST_WITH_CUDA)
  if (device_index >= 0) {
    if (grad_student != 0) throw std::invalid_argument("multi_teacher_forward: grad_student is CPU only");
    return kdfast::multi_teacher_forward_cuda(a, device_index, stream);
  }
#else
  (void)stream;
#endif
  return kdfast::multi_teacher_forward_cpu(a);
}

void multi_teacher_backward(uintptr_t grad_output, int64_t grad_output_stride, uintptr_t student, int student_dtype,
                            int64_t student_row_stride, const std::vector<uintptr_t>& teachers,
                            const std::vector<int64_t>& teacher_row_strides, int teacher_dtype, uintptr_t weights,
                            int64_t weight_teacher_stride, int64_t weight_row_stride, uintptr_t labels, int64_t rows,
                            int64_t vocab, int combine, int divergence, int reduction, double temperature, double alpha,
                            double beta, double label_smoothing, double divergence_scale, int64_t ignore_index,
                            uintptr_t row_stats, uintptr_t valid_rows, uintptr_t grad_student, int num_threads,
                            int device_index, uintptr_t stream) {
  kdfast::MultiTeacherKDArgs a = make_multi_teacher_args(
      student, student_dtype, student_row_stride, teachers, teacher_row_strides, teacher_dtype, weights,
      weight_teacher_stride, weight_row_stride, labels, rows, vocab, combine, divergence, reduction, temperature, alpha,
      beta, label_smoothing, divergence_scale, ignore_index, row_stats, valid_rows, num_threads, device_index);
  a.grad_output = as_ptr<const void>(grad_output);
  a.grad_output_stride = grad_output_stride;
  a.grad_student = as_ptr<void>(grad_student);
#if defined(KDFAST_WITH_CUDA)
  if (device_index >= 0) return kdfast::multi_teacher_backward_cuda(a, device_index, stream);
#else
  (void)stream;
#endif
  kdfast::multi_teacher_backward_cpu(a);
}

// exp_f32 / log_f32 of rowmath.h applied to n floats, so the tests can hold the kernels'
// elementary functions to their stated accuracy against float64.
void rowmath_exp_log(uintptr_t input, int64_t n, uintptr_t exp_out, uintptr_t log_out) {
  const float* x = as_ptr<const float>(input);
  float* e = as_ptr<float>(exp_out);
  float* l = as_ptr<float>(log_out);
  for (int64_t i = 0; i < n; ++i) {
    e[i] = kdfast::rowmath::exp_f32(x[i]);
    l[i] = kdfast::rowmath::log_f32(x[i]);
  }
}

// exp(x / T) of the CPU kernels' lanes on one instruction-set variant (see kdfast.h).
bool cpu_scaled_exp(const std::string& variant, uintptr_t input, int64_t n, float inv_t, bool cutoff,
                    uintptr_t out) {
  return kdfast::scaled_exp_cpu(variant, as_ptr<const float>(input), n, inv_t, cutoff, as_ptr<float>(out));
}

void advise_fresh_output(uintptr_t data, int64_t bytes) { kdfast::advise_fresh_output_cpu(as_ptr<void>(data), bytes); }

#if defined(KDFAST_WITH_CUDA)
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif
// The CUDA kernels of top-k soft labels (compress_topk, sparse_kd_loss) come with every CUDA
// build: kdfast.ops.sparse sends CUDA tensors to them when true, else to kdfast.reference.
constexpr bool kHasCudaTopK = kHasCuda;

// An enum's name table (types.h) as a Python dict name -> integer code.
template <class E, std::size_t N>
py::dict code_dict(const kdfast::NamedCode<E> (&table)[N]) {
  py::dict codes;
  for (const kdfast::NamedCode<E>& entry : table) codes[entry.name] = static_cast<int>(entry.code);
  return codes;
}

py::dict build_info() {
  const kdfast::BuildInfo info = kdfast::build_info();
  py::dict d;
  d["compiler"] = info.compiler;
  d["cpu_variants"] = info.cpu_variants;
  d["cpu_variant_selected"] = info.cpu_variant_selected;
  d["openmp"] = info.openmp;
  d["openmp_max_threads"] = info.openmp_max_threads;
  d["cuda"] = info.cuda;
  d["cuda_version"] = info.cuda_version;
  d["cuda_architectures"] = info.cuda_architectures;
  d["cuda_topk"] = kHasCudaTopK;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kdfast compiled core (torch-free); called only from kdfast.ops";
  m.def("kd_forward", &kd_forward, py::call_guard<py::gil_scoped_release>(), py::arg("student"),
        py::arg("student_dtype"), py::arg("student_row_stride"), py::arg("teacher"), py::arg("teacher_dtype"),
        py::arg("teacher_row_stride"), py::arg("labels"), py::arg("rows"), py::arg("vocab"), py::arg("divergence"),
        py::arg("reduction"), py::arg("temperature"), py::arg("alpha"), py::arg("beta"), py::arg("label_smoothing"),
        py::arg("divergence_scale"), py::arg("ignore_index"), py::arg("loss"), py::arg("row_stats"),
        py::arg("valid_rows"), py::arg("num_threads"), py::arg("device_index"), py::arg("stream"),
        py::arg("grad_student") = 0, py::arg("teacher_entropy") = false);
  m.def("kd_backward", &kd_backward, py::call_guard<py::gil_scoped_release>(), py::arg("grad_output"),
        py::arg("grad_output_stride"), py::arg("student"), py::arg("student_dtype"), py::arg("student_row_stride"),
        py::arg("teacher"), py::arg("teacher_dtype"), py::arg("teacher_row_stride"), py::arg("labels"),
        py::arg("rows"), py::arg("vocab"), py::arg("divergence"), py::arg("reduction"), py::arg("temperature"),
        py::arg("alpha"), py::arg("beta"), py::arg("label_smoothing"), py::arg("divergence_scale"),
        py::arg("ignore_index"), py::arg("row_stats"), py::arg("valid_rows"), py::arg("grad_student"),
        py::arg("num_threads"), py::arg("device_index"), py::arg("stream"), py::arg("skip_unit_rows") = false);
  m.def("topk_compress", &topk_compress, py::call_guard<py::gil_scoped_release>(), py::arg("teacher"),
        py::arg("teacher_dtype"), py::arg("teacher_row_stride"), py::arg("rows"), py::arg("vocab"), py::arg("k"),
        py::arg("temperature"), py::arg("indices"), py::arg("indices_int64"), py::arg("logprobs"),
        py::arg("tail_logprob"), py::arg("num_threads"), py::arg("device_index"), py::arg("stream"));
  m.def("sparse_kd_forward", &sparse_kd_forward, py::call_guard<py::gil_scoped_release>(), py::arg("student"),
        py::arg("student_dtype"), py::arg("student_row_stride"), py::arg("indices"), py::arg("index_type"),
        py::arg("logprobs"), py::arg("logprob_dtype"), py::arg("tail_logprob"), py::arg("tail_dtype"),
        py::arg("labels"), py::arg("rows"), py::arg("vocab"), py::arg("k"), py::arg("divergence"),
        py::arg("tail_mode"), py::arg("reduction"), py::arg("temperature"), py::arg("alpha"), py::arg("beta"),
        py::arg("label_smoothing"), py::arg("divergence_scale"), py::arg("ignore_index"), py::arg("loss"),
        py::arg("row_stats"), py::arg("valid_rows"), py::arg("num_threads"), py::arg("device_index"),
        py::arg("stream"), py::arg("grad_student") = 0);
  m.def("sparse_kd_backward", &sparse_kd_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("grad_output"), py::arg("grad_output_stride"), py::arg("student"), py::arg("student_dtype"),
        py::arg("student_row_stride"), py::arg("indices"), py::arg("index_type"), py::arg("logprobs"),
        py::arg("logprob_dtype"), py::arg("tail_logprob"), py::arg("tail_dtype"), py::arg("labels"),
        py::arg("rows"), py::arg("vocab"), py::arg("k"), py::arg("divergence"), py::arg("tail_mode"),
        py::arg("reduction"), py::arg("temperature"), py::arg("alpha"), py::arg("beta"),
        py::arg("label_smoothing"), py::arg("divergence_scale"), py::arg("ignore_index"), py::arg("row_stats"),
        py::arg("valid_rows"), py::arg("grad_student"), py::arg("num_threads"), py::arg("device_index"),
        py::arg("stream"), py::arg("skip_unit_rows") = false);
  m.def("multi_teacher_forward", &multi_teacher_forward, py::call_guard<py::gil_scoped_release>(),
        py::arg("student"), py::arg("student_dtype"), py::arg("student_row_stride"), py::arg("teachers"),
        py::arg("teacher_row_strides"), py::arg("teacher_dtype"), py::arg("weights"),
        py::arg("weight_teacher_stride"), py::arg("weight_row_stride"), py::arg("labels"), py::arg("rows"),
        py::arg("vocab"), py::arg("combine"), py::arg("divergence"), py::arg("reduction"), py::arg("temperature"),
        py::arg("alpha"), py::arg("beta"), py::arg("label_smoothing"), py::arg("divergence_scale"),
        py::arg("ignore_index"), py::arg("loss"), py::arg("row_stats"), py::arg("valid_rows"),
        py::arg("num_threads"), py::arg("device_index"), py::arg("grad_student") = 0, py::arg("stream") = 0);
  m.def("multi_teacher_backward", &multi_teacher_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("grad_output"), py::arg("grad_output_stride"), py::arg("student"), py::arg("student_dtype"),
        py::arg("student_row_stride"), py::arg("teachers"), py::arg("teacher_row_strides"),
        py::arg("teacher_dtype"), py::arg("weights"), py::arg("weight_teacher_stride"),
        py::arg("weight_row_stride"), py::arg("labels"), py::arg("rows"), py::arg("vocab"), py::arg("combine"),
        py::arg("divergence"), py::arg("reduction"), py::arg("temperature"), py::arg("alpha"), py::arg("beta"),
        py::arg("label_smoothing"), py::arg("divergence_scale"), py::arg("ignore_index"), py::arg("row_stats"),
        py::arg("valid_rows"), py::arg("grad_student"), py::arg("num_threads"), py::arg("device_index"),
        py::arg("stream") = 0);
  m.def("build_info", &build_info);
  m.def("advise_fresh_output", &advise_fresh_output, py::arg("data"), py::arg("bytes"));
  m.def("cpu_scaled_exp", &cpu_scaled_exp, py::call_guard<py::gil_scoped_release>(), py::arg("variant"),
        py::arg("input"), py::arg("n"), py::arg("inv_t"), py::arg("cutoff"), py::arg("out"));
  m.def("rowmath_exp_log", &rowmath_exp_log, py::call_guard<py::gil_scoped_release>(), py::arg("input"),
        py::arg("n"), py::arg("exp_out"), py::arg("log_out"));

  m.attr("dtype_codes") = code_dict(kdfast::kDTypeNames);
  m.attr("divergence_codes") = code_dict(kdfast::kDivergenceNames);
  m.attr("reduction_codes") = code_dict(kdfast::kReductionNames);
  m.attr("tail_codes") = code_dict(kdfast::kSparseTailNames);
  m.attr("combine_codes") = code_dict(kdfast::kCombineNames);
  m.attr("index_dtype_codes") = code_dict(kdfast::kIndexTypeNames);
  m.attr("kd_row_stats") = py::int_(kdfast::kRowStats);
  m.attr("sparse_row_stats") = py::int_(kdfast::kSparseRowStats);
  m.attr("multi_teacher_row_stats_base") = py::int_(kdfast::kMultiTeacherRowStatsBase);
  m.attr("multi_teacher_stats_per_teacher") = py::int_(kdfast::kMultiTeacherStatsPerTeacher);
  py::dict limits;
  limits["cuda_max_teachers"] = py::int_(kdfast::kCudaMaxTeachers);
  limits["cuda_max_topk"] = py::int_(kdfast::kCudaMaxTopK);
  limits["cuda_max_sparse_vocab"] = py::int_(kdfast::kCudaMaxSparseVocab);
  m.attr("limits") = limits;
  m.attr("has_cuda") = py::bool_(kHasCuda);
  m.attr("has_cuda_topk") = py::bool_(kHasCudaTopK);
}
