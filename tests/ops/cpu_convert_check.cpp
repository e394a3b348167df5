// Host check of the CPU kernels' vector conversions and streaming copy, built by
// test_cpu_vector_paths.py once per instruction-set variant (KDFAST_CPU_VARIANT and its flags):
// store_chunk float -> bfloat16 and load_chunk bfloat16 -> float against the scalar
// float_to_bf16 / bf16_to_float, bit for bit, over random bit patterns with many zeros,
// denormals, infinities and NaNs (and rounds with one denormal among normal values, so that
// the hardware conversion's blocks run too), at every start offset 0-7 and lengths around the
// vector widths; on AVX-512 also the integer 16-lane conversion alone; and copy_streaming (memory_policy.h) against memcpy for every destination alignment
// 0-63 bytes and lengths 0-300 elements of 2 and 4 bytes, nothing written outside the range.
// Prints "checked N cases, M failures".
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "convert.h"
#include "memory_policy.h"

using namespace kdfast::cpu::KDFAST_CPU_VARIANT;

namespace {

// Every 7th value is zero or denormal, except with `few_denormals`, where they are normal.
float random_float(std::mt19937& g, int i, bool few_denormals) {
  uint32_t bits = g();
  switch (i % 7) {
    case 0: bits = few_denormals ? (bits | 0x00800000u) : (bits & 0x807fffffu); break;
    case 1: bits = (bits & 0x807fffffu) | 0x7f800000u; break;  // inf or NaN
    case 2: bits = (bits & 0xffff0000u) | 0x8000u; break;      // exactly halfway
    default: break;
  }
  return kdfast::rowmath::bits_to_float(static_cast<int32_t>(bits));
}

template <class T>
long check_copy_streaming(long& cases) {
  long failures = 0;
  alignas(64) unsigned char dst[64 + 300 * sizeof(T) + 64];
  std::vector<T> src(300);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<T>(i * 2654435761u);
  for (int offset = 0; offset < 64; offset += static_cast<int>(sizeof(T))) {
    for (int n = 0; n <= 300; ++n) {
      std::memset(dst, 0xab, sizeof(dst));
      copy_streaming(reinterpret_cast<T*>(dst + offset), src.data(), n);
      streaming_fence();
      bool ok = std::memcmp(dst + offset, src.data(), n * sizeof(T)) == 0;
      for (size_t b = 0; b < sizeof(dst); ++b) {
        if (b < static_cast<size_t>(offset) || b >= offset + n * sizeof(T)) ok = ok && dst[b] == 0xab;
      }
      failures += ok ? 0 : 1;
      ++cases;
    }
  }
  return failures;
}

}  // namespace

int main() {
  std::mt19937 g(7);
  long cases = 0, failures = 0;
  std::vector<float> src(4096 + 8);
  std::vector<uint16_t> packed(4096 + 8);
  std::vector<float> widened(4096 + 8);
  for (int round = 0; round < 128; ++round) {
    const bool few_denormals = round % 2 == 1;
    for (size_t i = 0; i < src.size(); ++i) src[i] = random_float(g, static_cast<int>(i + round), few_denormals);
    if (few_denormals) src[g() % src.size()] = kdfast::rowmath::bits_to_float(static_cast<int32_t>(g() % 0x007fffffu + 1u));
    for (int offset = 0; offset < 8; ++offset) {
      for (int64_t n : {int64_t(1), int64_t(7), int64_t(15), int64_t(16), int64_t(17), int64_t(33), int64_t(512),
                        int64_t(4096)}) {
        store_chunk(src.data() + offset, n, reinterpret_cast<bf16_t*>(packed.data() + offset));
        for (int64_t i = 0; i < n; ++i) failures += packed[offset + i] == float_to_bf16(src[offset + i]) ? 0 : 1;
        const float* w = load_chunk(reinterpret_cast<const bf16_t*>(packed.data() + offset), n, widened.data());
        for (int64_t i = 0; i < n; ++i) {
          const float expected = bf16_to_float(packed[offset + i]);
          failures += std::memcmp(&expected, &w[i], sizeof(float)) == 0 ? 0 : 1;
        }
        cases += 2 * n;
      }
    }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    for (size_t i = 0; i + 16 <= src.size(); i += 16) {  // the integer path, used without AVX512_BF16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed.data()), bf16_16(_mm512_loadu_ps(src.data() + i)));
      for (size_t j = 0; j < 16; ++j) failures += packed[j] == float_to_bf16(src[i + j]) ? 0 : 1;
      cases += 16;
    }
#endif
  }
  failures += check_copy_streaming<uint16_t>(cases);
  failures += check_copy_streaming<uint32_t>(cases);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
  std::printf("bfloat16 store in hardware: %s\n", cpu_has_bf16_convert() ? "yes" : "no");
#endif
  std::printf("checked %ld cases, %ld failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
