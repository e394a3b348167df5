// The dense loss's gradient of one thread's batches of one row, shared by the backward kernel
// (kd_loss_backward.cu: one (row, chunk) item per team) and the one-pass training kernel
// (kd_loss_forward.cu: the team that has just streamed the row's statistics).
// Contract: `st` is the row's row_stats as the forward pass wrote them (rowmath::RowStats in
// columns 0-5, the row loss in kRowLossColumn, float reverse_kl's s_ref in kStudentRefColumn);
// `g` is grad_output times the reduction's scale. Ignored rows get zeros, a row whose loss is
// NaN (a NaN input or a bad label) gets NaN; every other element is recomputed from the saved
// maxima and log-sums (batch_gradient, kd_loss_cuda_rows.cuh), minus (1 - eps) alpha g at the
// label, and written once per group (store_group: 16-byte stores on the vector path).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kd_loss_cuda_common.cuh"
#include "kd_loss_cuda_rows.cuh"
#include "kdfast/rowmath.h"

namespace kdfast {
namespace cuda {

// One row's gradient, student and teacher rows and their common pad (kVectorized: the rows
// share one pad on the 16-byte grid, which the host checked; else 0). The gradient is
// [rows, vocab] contiguous.
template <class SX, class TX>
struct GradientRows {
  typename SX::Raw* g;
  const typename SX::Raw* s;
  const typename TX::Raw* t;
  int pad;
};

template <class SX, class TX, class C, bool kVectorized>
__device__ __forceinline__ GradientRows<SX, TX> gradient_rows(void* grad_student, const void* student,
                                                              int64_t student_row_stride, const void* teacher,
                                                              int64_t teacher_row_stride, int64_t row, int vocab,
                                                              const rowmath::Coefficients<C>& k) {
  GradientRows<SX, TX> r;
  r.g = static_cast<typename SX::Raw*>(grad_student) + row * static_cast<int64_t>(vocab);
  r.s = static_cast<const typename SX::Raw*>(student) + row * student_row_stride;
  r.t = static_cast<const typename TX::Raw*>(teacher) + row * teacher_row_stride;
  r.pad = 0;
  if (kVectorized) {
    r.pad = row_pad<SX>(r.g);
    if (k.need_kd && row_pad<TX>(r.t) > r.pad) r.pad = row_pad<TX>(r.t);
  }
  return r;
}

// kReadOnlyCache: logits loaded through the read-only path (never when the gradient overwrites
// the student logits). `label` is read only when `step_at_label` (alpha > 0 with labels).
template <class SX, class TX, class C, bool kVectorized, bool kReadOnlyCache>
__device__ __forceinline__ void write_row_gradient(typename SX::Raw* g_row, const typename SX::Raw* s_row,
                                                   const typename TX::Raw* t_row, int vocab,
                                                   const ThreadBatches<C>& batches, const C* st, bool ignored,
                                                   int64_t label, bool has_labels, double g,
                                                   const rowmath::Coefficients<C>& k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  constexpr int kU = BatchLayout<C>::kGroups;
  constexpr int kE = BatchLayout<C>::kElements;
  // Ignored rows get zeros; a row whose loss is NaN (a NaN input, or a bad label) gets NaN.
  if (ignored || st[kRowLossColumn] != st[kRowLossColumn]) {
    C zeros[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) zeros[e] = ignored ? C(0) : quiet_nan<C>();
    for (int b = 0; b < batches.total; ++b) {  // head, full and tail batches alike
      int first[kU];
      batches.first_elements(b, first);
#pragma unroll
      for (int u = 0; u < kU; ++u) store_group<SX, C, kVectorized>(g_row, first[u], vocab, zeros);
    }
    return;
  }
  rowmath::GradRow<C> grad_row = rowmath::make_grad_row(
      g, k, rowmath::RowStats<C>{st[0], st[1], st[2], st[3], st[4], st[5]}, static_cast<int64_t>(vocab));
  constexpr bool kOffsets = kReverseKLOffsets<C>;
  use_reverse_kl_offsets<kOffsets>(grad_row, k);
  // reverse_kl's references: s_ref as the forward pass stored it (the student row may be
  // overwritten in place), t_ref from the teacher row (never written).
  const bool offsets = uses_reverse_kl_offsets<kOffsets>(k);
  const ReverseKLRefs<C> refs = reverse_kl_refs(
      offsets ? st[kStudentRefColumn] : C(0),
      offsets ? TX::to_compute(load_element<TX, kReadOnlyCache>(t_row)) : C(0), k.diff_scale);
  const C label_step = grad_row.label_step;
  const bool step_at_label = k.need_ce && has_labels;
  // One streaming loop per divergence (chosen once per row, not per batch), so that each loop
  // holds only its own divergence's values in registers.
  const auto stream = [&](auto divergence) {
    constexpr Divergence D = decltype(divergence)::value;
    stream_batches<SX, TX, C, kVectorized, kReadOnlyCache>(
        s_row, t_row, vocab, batches, k.need_kd, [&](const C* s, const C* t, const int* first, auto) {
          C out[kE];
          batch_gradient<D, kOffsets>(s, t, grad_row, k, refs, out);
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (step_at_label) {
              const int64_t offset = label - first[u];
              if (offset >= 0 && offset < kW) {
#pragma unroll
                for (int e = 0; e < kW; ++e) {
                  if (e == offset) out[u * kW + e] -= label_step;
                }
              }
            }
            store_group<SX, C, kVectorized>(g_row, first[u], vocab, out + u * kW);
          }
        });
  };
  switch (k.divergence) {
    case Divergence::ForwardKL: stream(std::integral_constant<Divergence, Divergence::ForwardKL>{}); break;
    case Divergence::ReverseKL: stream(std::integral_constant<Divergence, Divergence::ReverseKL>{}); break;
    case Divergence::JSD: stream(std::integral_constant<Divergence, Divergence::JSD>{}); break;
    default: stream(std::integral_constant<Divergence, Divergence::TVD>{}); break;
  }
}

}  // namespace cuda
}  // namespace kdfast
