#include "cpu.h"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#define MIPSCAN_X86 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <immintrin.h>  // _xgetbv
#include <intrin.h>     // __cpuidex
#else
#include <cpuid.h>
#endif
#endif

namespace mipscan {

namespace {

constexpr SimdLevel kAllLevels[] = {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512};

Kernels g_kernels{SimdLevel::kScalar, &scan_lut16_scalar, &dot_scalar, &dots_scalar,
                  &argmax_shifted_scalar, &dot_i8_scalar, &dot_bf16_scalar,
                   &topk_columns_scalar, &dot_rows_scalar, nullptr, nullptr, &nearest_rows_scalar,
                   &scan_lut16_multi_scalar, &nth_of_64_scalar, &compact_ge_scalar, &compact_bin_scalar,
                   &collect_group_scalar};

#if MIPSCAN_X86
// regs = {eax, ebx, ecx, edx} of CPUID(leaf, subleaf); false when the leaf is not supported.
bool cpuid(uint32_t leaf, uint32_t subleaf, uint32_t regs[4]) {
#if defined(_MSC_VER) && !defined(__clang__)
  int r[4];
  __cpuid(r, 0);
  if (static_cast<uint32_t>(r[0]) < leaf) return false;
  __cpuidex(r, static_cast<int>(leaf), static_cast<int>(subleaf));
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<uint32_t>(r[i]);
  return true;
#else
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(leaf, subleaf, &a, &b, &c, &d) == 0) return false;
  regs[0] = a, regs[1] = b, regs[2] = c, regs[3] = d;
  return true;
#endif
}

// XCR0: which register states the OS saves on a context switch.
uint64_t xgetbv0() {
#if defined(_MSC_VER) && !defined(__clang__)
  return _xgetbv(0);
#else
  uint32_t lo = 0, hi = 0;
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));  // xgetbv
  return (uint64_t{hi} << 32) | lo;
#endif
}

bool detect_avx2() {
  uint32_t r[4];
  if (!cpuid(1, 0, r)) return false;
  const bool fma = (r[2] >> 12) & 1, osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
  if (!(fma && osxsave && avx)) return false;
  if ((xgetbv0() & 0x6) != 0x6) return false;  // XMM and YMM state enabled by the OS
  if (!cpuid(7, 0, r)) return false;
  return (r[1] >> 5) & 1;  // EBX bit 5: AVX2
}

bool detect_avx512() {
  if (!detect_avx2()) return false;
  // XCR0 bits 1 (SSE), 2 (AVX), 5 (opmask), 6 (ZMM0-15 upper halves), 7 (ZMM16-31).
  if ((xgetbv0() & 0xE6) != 0xE6) return false;
  uint32_t r[4];
  // POPCNT (CPUID.1:ECX bit 23): the AVX-512 files are built with it; every AVX-512 CPU has it.
  if (!cpuid(1, 0, r) || !((r[2] >> 23) & 1)) return false;
  if (!cpuid(7, 0, r)) return false;
  const bool f = (r[1] >> 16) & 1, bw = (r[1] >> 30) & 1, vl = (r[1] >> 31) & 1;  // EBX
  return f && bw && vl;
}

bool detect_gfni() {
  uint32_t r[4];
  return cpuid(7, 0, r) && ((r[2] >> 8) & 1);  // ECX bit 8: GFNI
}
#endif

// MIPSCAN_DISABLE_CPU_FEATURES, parsed once: which features to hide, or an error message.
struct FeatureMask {
  bool avx2 = false, avx512 = false, gfni = false;
  std::vector<std::string> names;
  std::string error;
};

const FeatureMask& feature_mask() {
  static const FeatureMask mask = [] {
    FeatureMask m;
    const char* env = std::getenv("MIPSCAN_DISABLE_CPU_FEATURES");
    if (env == nullptr) return m;
    const std::string value(env);
    size_t start = 0;
    while (start <= value.size()) {
      size_t end = value.find(',', start);
      if (end == std::string::npos) end = value.size();
      const std::string name = value.substr(start, end - start);
      if (name == "avx2") {
        m.avx2 = m.avx512 = true;
      } else if (name == "avx512") {
        m.avx512 = true;
      } else if (name == "gfni") {
        m.gfni = true;
      } else if (!name.empty()) {
        m.error = "MIPSCAN_DISABLE_CPU_FEATURES='" + value + "' names an unknown feature '" + name +
                  "'; allowed: a comma separated list of avx2, avx512, gfni";
        return m;
      }
      start = end + 1;
    }
    if (m.avx2) m.names.emplace_back("avx2");
    if (m.avx512) m.names.emplace_back("avx512");
    if (m.gfni) m.names.emplace_back("gfni");
    return m;
  }();
  return mask;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

bool cpu_has_avx2() {
#if MIPSCAN_X86 && MIPSCAN_HAVE_AVX2
  static const bool has = detect_avx2() && !feature_mask().avx2;
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if MIPSCAN_X86 && MIPSCAN_HAVE_AVX2 && MIPSCAN_HAVE_AVX512
  static const bool has = detect_avx512() && !feature_mask().avx512;
  return has;
#else
  return false;
#endif
}

bool cpu_has_gfni() {
#if MIPSCAN_X86 && MIPSCAN_HAVE_AVX2 && MIPSCAN_HAVE_AVX512
  static const bool has = cpu_has_avx512() && detect_gfni() && !feature_mask().gfni;
  return has;
#else
  return false;
#endif
}

std::vector<std::string> disabled_cpu_features() { return feature_mask().names; }

const Kernels& kernels() { return g_kernels; }

bool kernels_for(SimdLevel level, Kernels* out) {
  if (level == SimdLevel::kScalar) {
    *out = Kernels{SimdLevel::kScalar, &scan_lut16_scalar, &dot_scalar, &dots_scalar,
                   &argmax_shifted_scalar, &dot_i8_scalar, &dot_bf16_scalar,
                   &topk_columns_scalar, &dot_rows_scalar, nullptr, nullptr, &nearest_rows_scalar,
                   &scan_lut16_multi_scalar, &nth_of_64_scalar, &compact_ge_scalar, &compact_bin_scalar,
                   &collect_group_scalar};
    return true;
  }
#if MIPSCAN_HAVE_AVX2
  if (level == SimdLevel::kAvx2 && cpu_has_avx2()) {
    *out = Kernels{SimdLevel::kAvx2, &scan_lut16_avx2, &dot_avx2, &dots_avx2,
                   &argmax_shifted_scalar, &dot_i8_avx2, &dot_bf16_avx2, &topk_columns_avx2,
                   &dot_rows_avx2, nullptr, nullptr, &nearest_rows_avx2,
                   &scan_lut16_multi_avx2, &nth_of_64_scalar, &compact_ge_scalar, &compact_bin_scalar,
                   &collect_group_scalar};
    return true;
  }
#endif
#if MIPSCAN_HAVE_AVX2 && MIPSCAN_HAVE_AVX512
  if (level == SimdLevel::kAvx512 && cpu_has_avx512()) {
    const bool gfni = cpu_has_gfni();
    *out = Kernels{SimdLevel::kAvx512, gfni ? &scan_lut16_avx512_gfni : &scan_lut16_avx512,
                   &dot_avx512, &dots_avx512,
                   &argmax_shifted_avx512, &dot_i8_avx512, &dot_bf16_avx512,
                   &topk_columns_avx512, &dot_rows_avx2,  // dot_avx512 is dot_avx2
                   &encode2_avx512, &nearest2_avx512, &nearest_rows_avx512,
                   gfni ? &scan_lut16_multi_avx512_gfni : &scan_lut16_multi_avx512,
                   &nth_of_64_avx512, &compact_ge_avx512, &compact_bin_avx512,
                   &collect_group_avx512};
    return true;
  }
#endif
  return false;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512: return "avx512";
    default: return "scalar";
  }
}

bool parse_simd_level(const std::string& name, SimdLevel* out) {
  for (SimdLevel l : kAllLevels) {
    if (name == simd_level_name(l)) {
      *out = l;
      return true;
    }
  }
  return false;
}

std::vector<std::string> known_simd_levels() {
  std::vector<std::string> out;
  for (SimdLevel l : kAllLevels) out.emplace_back(simd_level_name(l));
  return out;
}

std::vector<std::string> runnable_simd_levels() {
  std::vector<std::string> out;
  Kernels k{};
  for (SimdLevel l : kAllLevels)
    if (kernels_for(l, &k)) out.emplace_back(simd_level_name(l));
  return out;
}

void init_kernels_from_env() {
  if (!feature_mask().error.empty()) throw std::runtime_error(feature_mask().error);
  const char* env = std::getenv("MIPSCAN_SIMD");
  if (env == nullptr || *env == '\0') {
    // The best level available: the last runnable one.
    for (SimdLevel l : kAllLevels) kernels_for(l, &g_kernels);
    return;
  }
  const std::string value(env);
  SimdLevel level{};
  if (!parse_simd_level(value, &level)) {
    throw std::runtime_error("MIPSCAN_SIMD='" + value + "' is not a SIMD level; allowed values: " +
                             join(known_simd_levels()) + " (or unset for the best one this CPU runs: " +
                             join(runnable_simd_levels()) + ")");
  }
  if (!kernels_for(level, &g_kernels)) {
    const auto off = disabled_cpu_features();
    throw std::runtime_error("MIPSCAN_SIMD='" + value + "' cannot run here: this CPU and build support " +
                             join(runnable_simd_levels()) +
                             (off.empty() ? "" : " (MIPSCAN_DISABLE_CPU_FEATURES hides " + join(off) + ")") +
                             "; unset MIPSCAN_SIMD or choose one of those");
  }
}

}  // namespace mipscan
