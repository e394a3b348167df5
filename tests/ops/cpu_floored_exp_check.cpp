// Host check of FlooredExp (csrc/cpu/exp_scalar.h, exp_lanes.h), the AVX-512 variant's
// exp(max(x, floor) / T) on 16 lanes that compress_topk's float split sums, built by
// test_cpu_vector_paths.py with the variant's flags. For temperatures from 1e-30 to 1e30
// (folded and unfolded coefficients): x / T over [-86, 0] densely, relative error below 2e-7
// against float64; below the floor, -inf included, bitwise the floor's own value, a normal
// float; exp(0) = 1 exactly; NaN stays NaN. Prints "checked N cases, M failures", or "not
// built in this variant".
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "exp_lanes.h"

using namespace kdfast::cpu::KDFAST_CPU_VARIANT;

#if defined(KDFAST_LANES_WIDE)
namespace {

template <bool FOLD>
void apply_all(const FlooredExp& exps, const float* x, float* out, int n) {
  const FlooredExpFW e(exps);
  for (int i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, e.template apply<FOLD>(FW{_mm512_loadu_ps(x + i)}).v);
}

void apply_all(const FlooredExp& exps, const float* x, float* out, int n) {
  if (exps.foldable) apply_all<true>(exps, x, out, n);
  else apply_all<false>(exps, x, out, n);
}

}  // namespace

int main() {
  long cases = 0, failures = 0;
  double worst = 0.0;
  const int n = 1 << 20;
  std::vector<float> x(n), out(n);
  for (double temperature : {1e-30, 1e-12, 0.05, 0.7, 1.0, 2.0, 3.0, 20.0, 1e12, 1e30}) {
    const FlooredExp exps(1.0 / temperature);
    for (int i = 0; i < n; ++i) x[i] = static_cast<float>(-86.0 * temperature * i / (n - 1));
    apply_all(exps, x.data(), out.data(), n);
    for (int i = 0; i < n; ++i) {
      if (x[i] < exps.floor) continue;
      const double exact = std::exp(static_cast<double>(x[i]) / temperature);
      const double relative = std::fabs(static_cast<double>(out[i]) - exact) / exact;
      worst = relative > worst ? relative : worst;
      failures += relative < 2e-7 ? 0 : 1;
      ++cases;
    }
    // Below the floor (and -inf): the floor's value, bitwise, a normal float; 0 -> 1; NaN -> NaN.
    const float at_floor_input[16] = {exps.floor};
    float at_floor[16];
    apply_all(exps, at_floor_input, at_floor, 16);
    float special[16] = {0.0f, -0.0f, std::nextafter(exps.floor, -std::numeric_limits<float>::infinity()),
                         exps.floor * 2.0f, -std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::max(), std::numeric_limits<float>::quiet_NaN()};
    float result[16];
    apply_all(exps, special, result, 16);
    failures += (result[0] == 1.0f && result[1] == 1.0f) ? 0 : 1;
    failures += std::fpclassify(at_floor[0]) == FP_NORMAL && at_floor[0] > 0.0f ? 0 : 1;
    for (int i = 2; i < 6; ++i) failures += std::memcmp(&result[i], &at_floor[0], sizeof(float)) == 0 ? 0 : 1;
    failures += std::isnan(result[6]) ? 0 : 1;
    cases += 8;
  }
  std::printf("worst relative error %.3g\n", worst);
  std::printf("checked %ld cases, %ld failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
#else
int main() {
  std::printf("not built in this variant\n");
  return 0;
}
#endif
