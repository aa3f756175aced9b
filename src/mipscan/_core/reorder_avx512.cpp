// AVX-512 (F, BW, VL) quantized dot products (reorder.h): one register holds the sixteen
// lanes of the specification; the tail is a masked load (masked-off lanes add +0, which
// changes no lane). Built with -mavx512f -mavx512bw -mavx512vl; reached only through
// cpu.cpp's table after the CPU and OS were checked.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*
// placeholders (a known GCC bug); nothing here reads an uninitialised value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "reorder.h"

namespace mipscan {

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
  alignas(64) float l[16];
  _mm512_store_ps(l, acc);
  return reduce16(l);
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
  alignas(64) float l[16];
  _mm512_store_ps(l, acc);
  return reduce16(l);
}

}  // namespace mipscan
