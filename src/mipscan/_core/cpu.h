// Run-time choice of SIMD kernels. The table is filled once when the module loads, from
// the CPU's features and the MIPSCAN_SIMD environment variable ("scalar" or "avx2";
// asking for a level the CPU lacks falls back to the best available one).
#pragma once
#include "lut16.h"

namespace mipscan {

enum class SimdLevel { kScalar = 0, kAvx2 = 1 };

struct Kernels {
  SimdLevel level;
  ScanLut16Fn scan_lut16;
  DotFn dot;
  DotsFn dots;
};

// The kernels in use. Set at module init; set_simd_level() changes it (tests only: it is
// not synchronised with searches running in other threads).
const Kernels& kernels();
bool cpu_has_avx2();
// The kernels of one level, in *out; false (and *out unchanged) when this CPU or build
// cannot run that level.
bool kernels_for(SimdLevel level, Kernels* out);
// Returns false (and changes nothing) when the CPU cannot run that level.
bool set_simd_level(SimdLevel level);
void init_kernels_from_env();
const char* simd_level_name(SimdLevel level);

}  // namespace mipscan
