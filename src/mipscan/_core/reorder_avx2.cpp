// AVX2 quantized dot products (reorder.h). Built with -mavx2 -mfma; reached only through
// cpu.cpp's table after the CPU was checked. Lanes 0-7 of the specification live in lo,
// 8-15 in hi; the tail (d % 16 values) goes through zero-padded copies, which adds +0
// products to the lanes it does not reach (a lane is never -0, so that changes nothing).
#include <immintrin.h>

#include <cstring>

#include "reorder.h"

namespace mipscan {

namespace {

inline __m256 i8_to_ps(const int8_t* p) {  // 8 int8 -> 8 float, exact
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

inline __m256 bf16_to_ps(const uint16_t* p) {  // 8 bf16 -> 8 float, exact
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <class T, class Load>
inline float dot16(const float* a, const T* b, size_t d, Load load) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    // mul then add, not FMA: the scalar specification rounds the product first.
    lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(a + j), load(b + j)));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(a + j + 8), load(b + j + 8)));
  }
  if (j < d) {
    alignas(32) float ta[16] = {0};
    alignas(32) T tb[16] = {0};
    std::memcpy(ta, a + j, (d - j) * sizeof(float));
    std::memcpy(tb, b + j, (d - j) * sizeof(T));
    lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_load_ps(ta), load(tb)));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_load_ps(ta + 8), load(tb + 8)));
  }
  alignas(32) float l[16];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(l + 8, hi);
  return reduce16(l);
}

}  // namespace

float dot_i8_avx2(const float* a, const int8_t* b, size_t d) { return dot16(a, b, d, i8_to_ps); }

float dot_bf16_avx2(const float* a, const uint16_t* b, size_t d) {
  return dot16(a, b, d, bf16_to_ps);
}

}  // namespace mipscan
