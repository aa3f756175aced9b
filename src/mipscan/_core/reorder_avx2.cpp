// AVX2 quantized dot products (reorder.h). Built with -mavx2 -mfma; reached only through
// cpu.cpp's table after the CPU was checked. Lanes 0-7 of the specification live in lo,
// 8-15 in hi. The last d % 8 values come from the 8 values ending at d, rotated into
// their lanes; the lanes they do not reach get +0 (a lane is never -0, so that changes
// nothing).
#include <immintrin.h>

#include <cstdint>

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

// The specification's reduction of lanes lo (0-7) and hi (8-15), in registers:
// s = lo + hi; t = s[0:4] + s[4:8] = (s0+s4, s1+s5, s2+s6, s3+s7);
// u = (t0+t2, t1+t3); u0 + u1 = ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7)).
inline float reduce16_avx2(__m256 lo, __m256 hi) {
  const __m256 sum = _mm256_add_ps(lo, hi);
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
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
  // j % 16 == 0 here: the next 8 values belong to lanes 0-7, the 8 after to lanes 8-15.
  bool in_hi = false;
  if (j + 8 <= d) {
    lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(a + j), load(b + j)));
    j += 8;
    in_hi = true;
  }
  if (j < d) {
    const int r = static_cast<int>(d - j);  // 1..7 values left, for lanes (j % 16) + t
    __m256 tail;
    if (d >= 8) {
      // The 8 values ending at d (all inside the row), multiplied, then lanes rotated so
      // that value j + t lands in lane t, and lanes t >= r zeroed. Same products as the
      // specification, moved, never re-rounded.
      const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(a + d - 8), load(b + d - 8));
      const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i idx = _mm256_add_epi32(iota, _mm256_set1_epi32(8 - r));
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(r), iota));
      tail = _mm256_and_ps(_mm256_permutevar8x32_ps(prod, idx), keep);
    } else {  // a row shorter than 8: zero-padded copies
      alignas(32) float ta[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      alignas(32) T tb[8] = {};
      for (int t = 0; t < r; ++t) {
        ta[t] = a[j + t];
        tb[t] = b[j + t];
      }
      tail = _mm256_mul_ps(_mm256_load_ps(ta), load(tb));
    }
    if (in_hi) {
      hi = _mm256_add_ps(hi, tail);
    } else {
      lo = _mm256_add_ps(lo, tail);
    }
  }
  return reduce16_avx2(lo, hi);
}

}  // namespace

float dot_i8_avx2(const float* a, const int8_t* b, size_t d) { return dot16(a, b, d, i8_to_ps); }

float dot_bf16_avx2(const float* a, const uint16_t* b, size_t d) {
  return dot16(a, b, d, bf16_to_ps);
}

}  // namespace mipscan
