// The AVX-512 LUT16 scans with GFNI (lut16_avx512_scan.h, kGfni = true). Built with the
// AVX-512 flags and -mgfni; only reached through cpu.cpp's dispatch table after the CPU
// was checked for AVX-512 F/BW/VL and GFNI. Same results as the scalar kernels.
#include "lut16_avx512_scan.h"

namespace mipscan {

void scan_lut16_multi_avx512_gfni(const uint8_t* packed, size_t groups, size_t num_blocks,
                                  size_t nq, const uint8_t* const* luts, const uint16_t* cuts,
                                  uint16_t* const* sums, uint64_t* const* masks) {
  scan_lut16_multi_avx512_t<true>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
}

void scan_lut16_avx512_gfni(const uint8_t* packed, size_t groups, size_t num_blocks,
                            const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  scan_lut16_avx512_t<true>(packed, groups, num_blocks, lut, cut, sums, masks);
}

}  // namespace mipscan
