// How the CPU kernels' row streams use the cache hierarchy, for rows that come from memory
// rather than from cache: a core's L2 size (which decides whether the one-pass kernel writes a
// row's gradient right after its statistics or while it streams the next row), software
// prefetch one chunk ahead of a sweep (a hardware prefetcher stops at each 4 KiB page, and a
// sweep busy with its exponentials leaves it behind), and streaming (non-temporal) stores for a
// large gradient written into memory of its own, which then needs no read for ownership.
// None of this changes a value: only where bytes travel. The thresholds and the measurements
// behind them are in docs/design.md ("CPU memory policy"). Like kernel_common.h, this lives in
// the instruction-set variant's namespace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__unix__)
#include <unistd.h>
#endif

#ifndef KDFAST_CPU_VARIANT
#error "memory_policy.h belongs to a CPU kernel variant: KDFAST_CPU_VARIANT must be defined"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {
namespace {

// A core's L2 cache in bytes as the system reports it; 1 MiB where it does not.
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long reported = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t(1) << 20;
  }();
  return bytes;
}

// Above this many bytes of logits in a call, the statistics sweep prefetches ahead: smaller
// calls are mostly served from the last-level cache, where the prefetches measured slower.
constexpr int64_t kPrefetchCallBytes = int64_t(64) << 20;

// Above this many bytes, a gradient written into memory of its own takes streaming stores:
// it does not fit a core's caches anyway, and each line is then written without being read.
constexpr int64_t kStreamingStoreBytes = int64_t(4) << 20;

// Asks for the cache lines of [p, p + bytes) into L2 (a hint: never faults, changes no value).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* at = static_cast<const char*>(p);
  const char* end = at + bytes;
  for (; at < end; at += 64) __builtin_prefetch(at, 0, 2);
}

// Asks for the chunk after the one at `start` of a row of `vocab` elements (what lies of it in
// the row), while the caller works on this one.
template <class T>
inline void prefetch_next_chunk(const T* row, int64_t start, int64_t chunk, int64_t vocab) {
  const int64_t next = start + chunk;
  if (next < vocab) prefetch_lines(row + next, std::min(chunk, vocab - next) * static_cast<int64_t>(sizeof(T)));
}

// dst[0, n) = src[0, n), the 64-byte-aligned body of dst with streaming stores (the head
// before it and the tail after it with plain ones). Call streaming_fence() before another
// thread, or the caller, reads dst.
template <class T>
inline void copy_streaming(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if defined(__SSE2__)
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d) % 64);
  const int64_t head = std::min<int64_t>(bytes, misalign == 0 ? 0 : 64 - misalign);
  std::memcpy(d, s, static_cast<size_t>(head));
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#elif defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32)));
#else
    for (int part = 0; part < 64; part += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + part), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + part)));
    }
#endif
  }
#endif
  std::memcpy(d, s, static_cast<size_t>(bytes));
}

// Orders this thread's streaming stores before its later stores (and the end of a parallel
// region): without it another thread could read a line before it reaches memory.
inline void streaming_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
