// AVX-512 (F, BW, VL) quantized dot products (reorder.h): one register holds the sixteen
// lanes of the specification; the tail is a masked load (masked-off lanes add +0, which
// changes no lane). Built with -mavx512f -mavx512bw -mavx512vl; reached only through
// cpu.cpp's table after the CPU and OS were checked.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm*_undefined_*
// placeholders (a known GCC bug); nothing here reads an uninitialised value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "reorder.h"

namespace mipscan {

namespace {

// The specification's reduction, in registers: s = l[0:8] + l[8:16]; then
// ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7)) as in reorder_avx2.cpp.
inline float reduce16_avx512(__m512 acc) {
  const __m256 sum = _mm256_add_ps(_mm512_castps512_ps256(acc),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

}  // namespace

float dot_i8_avx512(const float* a, const int8_t* b, size_t d) {
  __m512 acc = _mm512_setzero_ps();
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512 x = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j))));
    // mul then add, not FMA: the scalar specification rounds the product first.
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + j), x));
  }
  if (j < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - j)) - 1);
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, b + j)));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + j), x));
  }
  return reduce16_avx512(acc);
}

float dot_bf16_avx512(const float* a, const uint16_t* b, size_t d) {
  __m512 acc = _mm512_setzero_ps();
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j))), 16));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + j), x));
  }
  if (j < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - j)) - 1);
    const __m512 x = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + j)), 16));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + j), x));
  }
  return reduce16_avx512(acc);
}

}  // namespace mipscan
