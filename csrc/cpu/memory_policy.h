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

// A row sweep that reads one stream can also ask for the row its thread handles next, as
// kAheadStreams concurrent streams (that row's eighths, each advancing an eighth as fast as the
// sweep), so that the row is in L2 when its turn comes: a core keeps more misses in flight for
// several streams than for one (compress_topk on a 2-core Xeon, topk_split.h). Rows up to
// kNextRowBytes: at any time the current row's unread part and the next row's fetched part add
// up to about one row, which then fits a core's L2 (2 MiB on the Xeon, 1 MiB on Zen 4) beside
// the rest.
constexpr int64_t kAheadStreams = 8;
constexpr int64_t kNextRowBytes = int64_t(1) << 20;

// Where a sweep asks for the next row: its first byte (null: not at all), the bytes of each of
// its kAheadStreams parts, and the byte offset in the current row at which this sweep starts.
struct AheadPlan {
  const char* next_row = nullptr;
  int64_t part_bytes = 0;
  int64_t offset_bytes = 0;
};

// The plan for a row of `row_bytes` bytes whose successor starts at `next_row` (null for none).
inline AheadPlan next_row_plan(const void* next_row, int64_t row_bytes) {
  AheadPlan plan;
  if (next_row != nullptr && row_bytes <= kNextRowBytes) {
    plan.next_row = static_cast<const char*>(next_row);
    plan.part_bytes = row_bytes / kAheadStreams;
  }
  return plan;
}

// Asks for one line of each stream per 64 * kAheadStreams bytes that the sweep has read, for a
// step that reads STEP bytes starting at byte `at` of the sweep (at + offset_bytes of the row).
// A hint: changes no value.
template <int64_t STEP>
inline void prefetch_next_row(const AheadPlan& plan, int64_t at) {
  constexpr int64_t kRowBytesPerLine = 64 * kAheadStreams;
  static_assert(STEP <= kRowBytesPerLine, "one line per stream per step at most");
  const int64_t done = plan.offset_bytes + at;
  if (STEP == kRowBytesPerLine || done % kRowBytesPerLine < STEP) {
    const char* line = plan.next_row + done / kAheadStreams;
    for (int64_t stream = 0; stream < kAheadStreams; ++stream)
      __builtin_prefetch(line + stream * plan.part_bytes, 0, 2);
  }
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
