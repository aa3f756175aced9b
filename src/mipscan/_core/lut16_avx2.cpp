// AVX2 LUT16 scan. Built with -mavx2 -mfma; only reached through cpu.cpp's dispatch
// table after the CPU was checked for AVX2 and FMA.
#include <immintrin.h>

#include "lut16.h"

namespace mipscan {

namespace {

// kIters = nbp / 2 (32-byte steps per group) when known at compile time, so that the
// loop unrolls completely; 0 = read it from nbp.
template <size_t kIters>
void scan_impl(const uint8_t* packed, size_t num_groups, size_t nbp, const uint8_t* lut,
               uint16_t cut, uint16_t* sums, uint32_t* masks) {
  const size_t iters = kIters != 0 ? kIters : nbp / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m128i cutv = _mm_set1_epi16(static_cast<short>(cut));
  const __m256i* tables = reinterpret_cast<const __m256i*>(lut);
  for (size_t g = 0; g < num_groups; ++g) {
    const __m256i* codes = reinterpret_cast<const __m256i*>(packed + g * nbp * 16);
    // Shuffle results are 32 bytes; read as 16 uint16 lanes, lane t holds point 2t in its
    // low byte and point 2t + 1 in its high byte. *_all sums whole lanes and *_odd the
    // high bytes, so even = all - 256 * odd. Every true sum is < 65536 (see the header),
    // so this modular arithmetic is exact.
    __m256i lo_all = _mm256_setzero_si256(), lo_odd = _mm256_setzero_si256();
    __m256i hi_all = _mm256_setzero_si256(), hi_odd = _mm256_setzero_si256();
    auto accumulate = [&](__m256i lo, __m256i hi) {
      lo_all = _mm256_add_epi16(lo_all, lo);
      lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16(lo, 8));
      hi_all = _mm256_add_epi16(hi_all, hi);
      hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16(hi, 8));
    };
    size_t it = 0;
    // Two steps at a time: LUT entries are <= 127, so two lookups add in 8 bits.
    for (; it + 2 <= iters; it += 2) {
      const __m256i c0 = _mm256_loadu_si256(codes + it), c1 = _mm256_loadu_si256(codes + it + 1);
      const __m256i t0 = _mm256_loadu_si256(tables + it), t1 = _mm256_loadu_si256(tables + it + 1);
      const __m256i lo = _mm256_add_epi8(_mm256_shuffle_epi8(t0, _mm256_and_si256(c0, low4)),
                                         _mm256_shuffle_epi8(t1, _mm256_and_si256(c1, low4)));
      const __m256i hi = _mm256_add_epi8(
          _mm256_shuffle_epi8(t0, _mm256_and_si256(_mm256_srli_epi16(c0, 4), low4)),
          _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(c1, 4), low4)));
      accumulate(lo, hi);
    }
    if (it < iters) {
      const __m256i c0 = _mm256_loadu_si256(codes + it), t0 = _mm256_loadu_si256(tables + it);
      accumulate(_mm256_shuffle_epi8(t0, _mm256_and_si256(c0, low4)),
                 _mm256_shuffle_epi8(t0, _mm256_and_si256(_mm256_srli_epi16(c0, 4), low4)));
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

}  // namespace

void scan_lut16_avx2(const uint8_t* packed, size_t num_groups, size_t nbp,
                     const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks) {
  // Specialised for the block counts of common embedding widths with 2 or 4 dimensions
  // per block (d = 16 ... 256).
  switch (nbp / 2) {
    case 2: return scan_impl<2>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 4: return scan_impl<4>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 8: return scan_impl<8>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 12: return scan_impl<12>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 16: return scan_impl<16>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 24: return scan_impl<24>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 32: return scan_impl<32>(packed, num_groups, nbp, lut, cut, sums, masks);
    case 64: return scan_impl<64>(packed, num_groups, nbp, lut, cut, sums, masks);
    default: return scan_impl<0>(packed, num_groups, nbp, lut, cut, sums, masks);
  }
}

float dot_avx2(const float* a, const float* b, size_t d) {
  __m256 acc = _mm256_setzero_ps();
  size_t j = 0;
  for (; j + 8 <= d; j += 8) {
    // mul then add, not FMA: the scalar kernel rounds the product first.
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)));
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  for (size_t t = 0; j < d; ++j, ++t) l[t] += a[j] * b[j];
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

}  // namespace mipscan
