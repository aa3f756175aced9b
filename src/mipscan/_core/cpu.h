// Run-time choice of SIMD kernels, fixed when the module loads.
//
// init_kernels_from_env() runs once, in the module's init, before any search: it reads
// MIPSCAN_SIMD ("scalar", "avx2" or "avx512"; unset or empty = the best level this CPU
// and build can run) and fills the table that kernels() returns.
//
// MIPSCAN_DISABLE_CPU_FEATURES (like faiss's FAISS_DISABLE_CPU_FEATURES): a comma
// separated list of features ("avx2", "avx512", "gfni") that detection pretends this CPU
// lacks, read once, at the first detection. Disabling avx2 disables avx512 too (the
// AVX-512 level uses AVX2 kernels for its tails). GFNI is not a level: the AVX-512 level
// uses it, where the CPU has it, for the LUT16 scans (same results either way). An unknown name is an error at import, as for
// MIPSCAN_SIMD. Tests use it to see how a CPU without a level behaves. Nothing changes it afterwards, so
// searches read it without synchronisation. An unknown value, or a level this CPU or build
// cannot run, is an error (the module then fails to import, naming the variable).
// Other levels stay reachable without global state through kernels_for(level), which is
// how tests compare the levels (and Index.search_batch(..., level=...) runs a whole search
// at a given level).
#pragma once
#include <string>
#include <vector>

#include "assign.h"
#include "encode.h"
#include "lut16.h"
#include "reorder.h"
#include "topk.h"

namespace mipscan {

enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Kernels {
  SimdLevel level;
  ScanLut16Fn scan_lut16;
  DotFn dot;
  DotsFn dots;
  ArgmaxShiftedFn argmax_shifted;
  DotI8Fn dot_i8;      // reorder.h: float32 x int8 (scales folded into the query)
  DotBf16Fn dot_bf16;  // reorder.h: float32 x bfloat16
  TopkColumnsFn topk_columns;  // topk.h: the best k of each column of a small block
  DotRowsFn dot_rows;  // lut16.h: dot against scattered rows (the float32 reorder)
  Encode2Fn encode2;    // encode.h: null = encode.cpp's SSE2 / portable loops
  Nearest2Fn nearest2;  // encode.h: likewise
  NearestRowsFn nearest_rows;  // assign.h: the tree's k-means assignment
  ScanLut16MultiFn scan_lut16_multi;  // lut16.h: several queries over the same codes
  // topk.h: TopKBuffer's and kth_largest's passes (always the module's level: kernels()).
  NthOf64Fn nth_of_64;
  CompactGeFn compact_ge;
  CompactBinFn compact_bin;
  CollectGroupFn collect_group;  // topk.h: a LUT16 group's flagged points as candidates
};

// The kernels chosen at module load.
const Kernels& kernels();
// True when the CPU has AVX2 and FMA and the OS saves the AVX (YMM) state; false on
// non-x86 targets and in builds without the AVX2 kernels.
bool cpu_has_avx2();
// True when the CPU has AVX-512 F, BW and VL (and AVX2) and the OS saves the opmask and
// ZMM state (XCR0 bits 1, 2, 5, 6, 7); false on other targets and builds.
bool cpu_has_avx512();
// True when the CPU has GFNI (and the AVX-512 level), unless disabled (see above).
bool cpu_has_gfni();
// What MIPSCAN_DISABLE_CPU_FEATURES removed, e.g. "avx512" (empty when unset).
std::vector<std::string> disabled_cpu_features();
// The kernels of one level, in *out; false (and *out unchanged) when this CPU or build
// cannot run that level.
bool kernels_for(SimdLevel level, Kernels* out);
// Level names, lowest first: every level this module knows, and those this CPU and build
// can run.
std::vector<std::string> known_simd_levels();
std::vector<std::string> runnable_simd_levels();
// The level named `name`; false when the name is unknown.
bool parse_simd_level(const std::string& name, SimdLevel* out);
// Reads MIPSCAN_SIMD and fixes the kernels. Throws std::runtime_error naming the variable,
// its value and the allowed values when the value is unknown or cannot run here.
void init_kernels_from_env();
const char* simd_level_name(SimdLevel level);

}  // namespace mipscan
