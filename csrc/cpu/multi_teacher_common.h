// What the two CPU kernel files of the multi-teacher KD loss share: multi_teacher_cpu.cpp
// (the entry points and the chunked kernel behind every divergence) and
// multi_teacher_forward_kl_cpu.cpp (the one-pass forward of divergence forward_kl). Contract
// at this boundary: multi_teacher_forward_kl takes any MultiTeacherKDArgs whose divergence is
// ForwardKL (either combine mode, any supported dtypes) and returns the number of rows with a
// label outside [0, vocab) that is not ignore_index, as multi_teacher_forward does. Like
// kernel_common.h, everything here lives in the instruction-set variant's namespace.
#pragma once

#include <cstdint>

#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "multi_teacher_common.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

// Elements per chunk: the chunked kernel streams each row in chunks of kChunk elements; the
// forward_kl pass writes its gradient through a buffer of kChunk elements.
constexpr int64_t kChunk = 512;

// Normalised weight of teacher m for row `row`, in the compute type C (see MultiTeacherKDArgs).
template <class C>
C weight_of(const MultiTeacherKDArgs& args, int64_t m, int64_t row) {
  return static_cast<const C*>(args.weights)[m * args.weight_teacher_stride + row * args.weight_row_stride];
}

// The forward pass of divergence forward_kl (multi_teacher_forward_kl_cpu.cpp).
int64_t multi_teacher_forward_kl(const MultiTeacherKDArgs& args);

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
