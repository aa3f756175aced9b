// The end of one group's LUT16 scan, shared by the AVX2 and AVX-512 kernels (included by
// those two files only: it needs AVX2, which both are built with).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace mipscan {

// Internal linkage: the AVX2 and AVX-512 files are built with different flags, and one
// inline symbol would be a single copy for both (topk_columns.h).
namespace {

// The group's 64 sums in point order, from its four accumulators (uint16 lanes; lo covers
// points 0-15 (lane 0) and 32-47 (lane 1), hi 16-31 and 48-63; lane t of a 16-point run
// holds point 2t in its low byte and 2t + 1 in its high byte; *_all sums whole lanes and
// *_odd the high bytes): even = all - 256 * odd, exact modulo 2^16 because every true
// sum is < 65536 (lut16.h). Stores them to sums[0, 64) and returns them as p[0..3]
// (points 0-15, 16-31, 32-47, 48-63) for the caller's masks.
struct GroupSums {
  __m256i p[4];
};

inline GroupSums finish_group(__m256i lo_all, __m256i lo_odd, __m256i hi_all, __m256i hi_odd,
                              uint16_t* sums) {
  const __m256i lo_even = _mm256_sub_epi16(lo_all, _mm256_slli_epi16(lo_odd, 8));
  const __m256i hi_even = _mm256_sub_epi16(hi_all, _mm256_slli_epi16(hi_odd, 8));
  // Interleave even/odd back into point order within each lane, then gather lanes:
  // a: points 0-7 | 32-39, b: 8-15 | 40-47 (lo); 16-23 | 48-55, 24-31 | 56-63 (hi).
  const __m256i la = _mm256_unpacklo_epi16(lo_even, lo_odd), lb = _mm256_unpackhi_epi16(lo_even, lo_odd);
  const __m256i ha = _mm256_unpacklo_epi16(hi_even, hi_odd), hb = _mm256_unpackhi_epi16(hi_even, hi_odd);
  GroupSums g;
  g.p[0] = _mm256_permute2x128_si256(la, lb, 0x20);  // points 0-15
  g.p[1] = _mm256_permute2x128_si256(ha, hb, 0x20);  // points 16-31
  g.p[2] = _mm256_permute2x128_si256(la, lb, 0x31);  // points 32-47
  g.p[3] = _mm256_permute2x128_si256(ha, hb, 0x31);  // points 48-63
  __m256i* out = reinterpret_cast<__m256i*>(sums);
  for (int i = 0; i < 4; ++i) _mm256_storeu_si256(out + i, g.p[i]);
  return g;
}

}  // namespace
}  // namespace mipscan
