// Run-time choice among the CPU kernel variants compiled from kd_loss_cpu.cpp, topk_cpu.cpp,
// sparse_kd_cpu.cpp, multi_teacher_cpu.cpp and multi_teacher_forward_kl_cpu.cpp, and the build
// description. The variant list comes from the build (KDFAST_CPU_HAS_AVX2/AVX512); the choice
// is made once, from the CPU's feature flags, the first time a kernel runs.
// KDFAST_CPU_VARIANT=baseline|avx2|avx512 in the environment forces a (supported) variant.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kdfast/kdfast.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfast {
namespace cpu {
#define KDFAST_DECLARE_VARIANT(name)                                     \
  namespace name {                                                       \
  int64_t kd_forward(const KDForwardArgs& args);                         \
  void kd_backward(const KDBackwardArgs& args);                          \
  void topk_compress(const TopKCompressArgs& args);                      \
  SparseKDForwardResult sparse_kd_forward(const SparseKDForwardArgs& args); \
  void sparse_kd_backward(const SparseKDBackwardArgs& args);             \
  int64_t multi_teacher_forward(const MultiTeacherKDArgs& args);         \
  void multi_teacher_backward(const MultiTeacherKDArgs& args);           \
  void scaled_exp(const float* x, int64_t n, float inv_t, bool cutoff, float* out); \
  }
KDFAST_DECLARE_VARIANT(baseline)
#if defined(KDFAST_CPU_HAS_AVX2)
KDFAST_DECLARE_VARIANT(avx2)
#endif
#if defined(KDFAST_CPU_HAS_AVX512)
KDFAST_DECLARE_VARIANT(avx512)
#endif
#undef KDFAST_DECLARE_VARIANT

namespace {

struct Variant {
  const char* name;
  int64_t (*forward)(const KDForwardArgs&);
  void (*backward)(const KDBackwardArgs&);
  void (*topk_compress)(const TopKCompressArgs&);
  SparseKDForwardResult (*sparse_forward)(const SparseKDForwardArgs&);
  void (*sparse_backward)(const SparseKDBackwardArgs&);
  int64_t (*multi_teacher_forward)(const MultiTeacherKDArgs&);
  void (*multi_teacher_backward)(const MultiTeacherKDArgs&);
  void (*scaled_exp)(const float*, int64_t, float, bool, float*);
};

bool cpu_supports(const char* name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && cpu_supports("avx2");
#endif
  return std::strcmp(name, "baseline") == 0;
}

std::vector<Variant> compiled_variants() {
  std::vector<Variant> variants;
#if defined(KDFAST_CPU_HAS_AVX512)
  variants.push_back({"avx512", avx512::kd_forward, avx512::kd_backward, avx512::topk_compress,
                      avx512::sparse_kd_forward, avx512::sparse_kd_backward, avx512::multi_teacher_forward,
                      avx512::multi_teacher_backward, avx512::scaled_exp});
#endif
#if defined(KDFAST_CPU_HAS_AVX2)
  variants.push_back({"avx2", avx2::kd_forward, avx2::kd_backward, avx2::topk_compress, avx2::sparse_kd_forward,
                      avx2::sparse_kd_backward, avx2::multi_teacher_forward, avx2::multi_teacher_backward,
                      avx2::scaled_exp});
#endif
  variants.push_back({"baseline", baseline::kd_forward, baseline::kd_backward, baseline::topk_compress,
                      baseline::sparse_kd_forward, baseline::sparse_kd_backward, baseline::multi_teacher_forward,
                      baseline::multi_teacher_backward, baseline::scaled_exp});
  return variants;  // best first
}

Variant choose_variant() {
  const std::vector<Variant> variants = compiled_variants();
  const char* forced = std::getenv("KDFAST_CPU_VARIANT");
  if (forced && *forced) {
    for (const Variant& v : variants)
      if (std::strcmp(v.name, forced) == 0 && cpu_supports(v.name)) return v;
  }
  for (const Variant& v : variants)
    if (cpu_supports(v.name)) return v;
  return variants.back();
}

const Variant& selected() {
  static const Variant variant = choose_variant();
  return variant;
}

// The page policy of freshly allocated multi-megabyte outputs that a kernel is about to write
// once from start to end (the gradients). KDFAST_HUGE_PAGES=always|never|auto (default auto)
// in the environment, read once:
// - always: ask for transparent huge pages (madvise MADV_HUGEPAGE) on the 2 MiB-aligned
//   interior: first-touch faults then cost 512x fewer kernel entries. Where the THP defrag
//   setting compacts memory synchronously for madvised regions ("always", "madvise",
//   "defer+madvise"), the first calls can stall in that compaction while free memory is
//   fragmented; once huge pages are free again, every later call gets them at once.
// - never: plain pages.
// - auto (the default): huge pages wherever THP is available ("madvise" or "always" in
//   .../enabled). Measured on a 2-core EPYC with enabled=madvise, defrag=madvise, idle, fp32
//   N=256, V=128256 fwd+bwd with a fresh gradient: 276 ms for the first call, then 51 ms,
//   against 101-104 ms for every call with plain pages, so huge pages are ahead from the
//   third call on and about 2x faster in steady state.
bool huge_pages_wanted() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const char* policy = std::getenv("KDFAST_HUGE_PAGES");
  if (policy && std::strcmp(policy, "always") == 0) return true;
  if (policy && std::strcmp(policy, "never") == 0) return false;
  auto selected_word = [](const char* path) {
    std::string word;
    if (FILE* f = std::fopen(path, "r")) {
      char line[256] = {0};
      if (std::fgets(line, sizeof(line), f)) {
        const char* open = std::strchr(line, '[');
        const char* close = open ? std::strchr(open, ']') : nullptr;
        if (open && close) word.assign(open + 1, close);
      }
      std::fclose(f);
    }
    return word;
  };
  const std::string enabled = selected_word("/sys/kernel/mm/transparent_hugepage/enabled");
  return enabled == "madvise" || enabled == "always";
#else
  return false;
#endif
}

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool wanted = huge_pages_wanted();
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!wanted || bytes < int64_t(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace
}  // namespace cpu

int64_t kd_forward_cpu(const KDForwardArgs& args) {
  if (args.grad_student != nullptr && args.grad_student != args.student)  // a fresh gradient (not in place)
    cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * dtype_size(args.student_dtype));
  return cpu::selected().forward(args);
}

void kd_backward_cpu(const KDBackwardArgs& args) {
  cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * dtype_size(args.student_dtype));
  cpu::selected().backward(args);
}

void advise_fresh_output_cpu(void* data, int64_t bytes) { cpu::advise_huge_pages(data, bytes); }

void topk_compress_cpu(const TopKCompressArgs& args) { cpu::selected().topk_compress(args); }

SparseKDForwardResult sparse_kd_forward_cpu(const SparseKDForwardArgs& args) {
  if (args.grad_student != nullptr && args.grad_student != args.student)  // a fresh gradient (not in place)
    cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * dtype_size(args.student_dtype));
  return cpu::selected().sparse_forward(args);
}

void sparse_kd_backward_cpu(const SparseKDBackwardArgs& args) {
  cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * dtype_size(args.student_dtype));
  cpu::selected().sparse_backward(args);
}

int64_t multi_teacher_forward_cpu(const MultiTeacherKDArgs& args) {
  if (args.grad_student != nullptr)  // forward_kl writes the gradient here, in the compute dtype
    cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * (args.student_dtype == DType::Float64 ? 8 : 4));
  return cpu::selected().multi_teacher_forward(args);
}

void multi_teacher_backward_cpu(const MultiTeacherKDArgs& args) {
  cpu::advise_huge_pages(args.grad_student, args.rows * args.vocab * dtype_size(args.student_dtype));
  cpu::selected().multi_teacher_backward(args);
}

bool scaled_exp_cpu(const std::string& variant, const float* x, int64_t n, float inv_t, bool cutoff, float* out) {
  for (const auto& v : cpu::compiled_variants()) {
    if (variant == v.name && cpu::cpu_supports(v.name)) {
      v.scaled_exp(x, n, inv_t, cutoff, out);
      return true;
    }
  }
  return false;
}

#if defined(KDFAST_WITH_CUDA)
void fill_cuda_build_info(BuildInfo& info);
#endif

BuildInfo build_info() {
  BuildInfo info;
#if defined(__clang__)
  info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("gcc ") + __VERSION__;
#else
  info.compiler = "unknown";
#endif
  for (const auto& v : cpu::compiled_variants()) info.cpu_variants.push_back(v.name);
  info.cpu_variant_selected = cpu::selected().name;
#if defined(_OPENMP)
  info.openmp = true;
  info.openmp_max_threads = omp_get_max_threads();
#endif
#if defined(KDFAST_WITH_CUDA)
  fill_cuda_build_info(info);
#endif
  return info;
}

}  // namespace kdfast
