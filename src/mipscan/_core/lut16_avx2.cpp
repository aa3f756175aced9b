// AVX2 LUT16 scan. Built with -mavx2 -mfma; only reached through cpu.cpp's dispatch
// table after the CPU was checked for AVX2 and FMA.
#include <immintrin.h>

#include "lut16.h"

namespace mipscan {

void scan_lut16_avx2(const uint8_t* packed, size_t num_groups, size_t nbp,
                     const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m128i cutv = _mm_set1_epi16(static_cast<short>(cut));
  for (size_t g = 0; g < num_groups; ++g) {
    const uint8_t* grp = packed + g * nbp * 16;
    // Shuffle results are 32 bytes; read as 16 uint16 lanes, lane t holds point 2t in its
    // low byte and point 2t + 1 in its high byte. acc_*_all sums whole lanes and acc_*_odd
    // sums the high bytes, so even = all - 256 * odd. Every true sum is < 65536 (see the
    // header), so this modular arithmetic is exact.
    __m256i lo_all = _mm256_setzero_si256(), lo_odd = _mm256_setzero_si256();
    __m256i hi_all = _mm256_setzero_si256(), hi_odd = _mm256_setzero_si256();
    for (size_t b = 0; b < nbp; b += 2) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + b * 16));
      const __m256i table = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + b * 16));
      const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, low4));
      const __m256i hi =
          _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4));
      lo_all = _mm256_add_epi16(lo_all, lo);
      lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16(lo, 8));
      hi_all = _mm256_add_epi16(hi_all, hi);
      hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16(hi, 8));
    }
    const __m256i lo_even = _mm256_sub_epi16(lo_all, _mm256_slli_epi16(lo_odd, 8));
    const __m256i hi_even = _mm256_sub_epi16(hi_all, _mm256_slli_epi16(hi_odd, 8));
    // Lane 0 holds even blocks, lane 1 odd blocks: add the two 128-bit halves.
    const __m128i le = _mm_add_epi16(_mm256_castsi256_si128(lo_even), _mm256_extracti128_si256(lo_even, 1));
    const __m128i lo_ = _mm_add_epi16(_mm256_castsi256_si128(lo_odd), _mm256_extracti128_si256(lo_odd, 1));
    const __m128i he = _mm_add_epi16(_mm256_castsi256_si128(hi_even), _mm256_extracti128_si256(hi_even, 1));
    const __m128i ho = _mm_add_epi16(_mm256_castsi256_si128(hi_odd), _mm256_extracti128_si256(hi_odd, 1));
    // Interleave even/odd lanes back into point order.
    const __m128i p0 = _mm_unpacklo_epi16(le, lo_), p1 = _mm_unpackhi_epi16(le, lo_);
    const __m128i p2 = _mm_unpacklo_epi16(he, ho), p3 = _mm_unpackhi_epi16(he, ho);
    __m128i* out = reinterpret_cast<__m128i*>(sums + g * 32);
    _mm_storeu_si128(out + 0, p0);
    _mm_storeu_si128(out + 1, p1);
    _mm_storeu_si128(out + 2, p2);
    _mm_storeu_si128(out + 3, p3);
    // Unsigned a >= cut  <=>  max(a, cut) == a. Packing the 0/-1 words to bytes keeps
    // the point order, so movemask yields one bit per point.
    auto ge = [&](__m128i v) { return _mm_cmpeq_epi16(_mm_max_epu16(v, cutv), v); };
    const uint32_t lo_mask = static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(ge(p0), ge(p1))));
    const uint32_t hi_mask = static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(ge(p2), ge(p3))));
    masks[g] = lo_mask | (hi_mask << 16);
  }
}

}  // namespace mipscan
