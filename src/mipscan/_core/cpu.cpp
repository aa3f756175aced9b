#include "cpu.h"

#include <cstdlib>
#include <cstring>

namespace mipscan {

namespace {
Kernels g_kernels{SimdLevel::kScalar, &scan_lut16_scalar, &dot_scalar, &dots_scalar};
}

bool cpu_has_avx2() {
#if MIPSCAN_HAVE_AVX2 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const Kernels& kernels() { return g_kernels; }

bool kernels_for(SimdLevel level, Kernels* out) {
  if (level == SimdLevel::kScalar) {
    *out = Kernels{SimdLevel::kScalar, &scan_lut16_scalar, &dot_scalar, &dots_scalar};
    return true;
  }
#if MIPSCAN_HAVE_AVX2
  if (level == SimdLevel::kAvx2 && cpu_has_avx2()) {
    *out = Kernels{SimdLevel::kAvx2, &scan_lut16_avx2, &dot_avx2, &dots_avx2};
    return true;
  }
#endif
  return false;
}

bool set_simd_level(SimdLevel level) { return kernels_for(level, &g_kernels); }

void init_kernels_from_env() {
  const char* env = std::getenv("MIPSCAN_SIMD");
  if (env != nullptr && std::strcmp(env, "scalar") == 0) {
    set_simd_level(SimdLevel::kScalar);
    return;
  }
  if (!set_simd_level(SimdLevel::kAvx2)) set_simd_level(SimdLevel::kScalar);
}

const char* simd_level_name(SimdLevel level) {
  return level == SimdLevel::kAvx2 ? "avx2" : "scalar";
}

}  // namespace mipscan
