// AVX2 kernel of filtered.cpp (compiled with -mavx2 -mfma; called only when the CPU has them).
#include <immintrin.h>

#include "filtered.h"
#include "lut16.h"

namespace mipscan {

namespace {

// Lanes of acc plus the tail (j >= d8, lane j - d8), reduced in the order of dot_avx2 (the
// spec in lut16.h), so each score equals kn.dot's bit for bit.
inline float finish(__m256 acc, const float* a, const float* b, size_t d8, size_t d) {
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  for (size_t j = d8, u = 0; j < d; ++j, ++u) l[u] += a[j] * b[j];
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

}  // namespace

void dots_rows_avx2(const float* q, const float* rows, const uint32_t* sel, size_t n, size_t d,
                    float* out) {
  const size_t d8 = d - d % 8;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* r0 = rows + size_t{sel[i]} * d;
    const float* r1 = rows + size_t{sel[i + 1]} * d;
    const float* r2 = rows + size_t{sel[i + 2]} * d;
    const float* r3 = rows + size_t{sel[i + 3]} * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (size_t j = 0; j < d8; j += 8) {
      const __m256 qj = _mm256_loadu_ps(q + j);
      // mul then add, as the spec (no FMA)
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(qj, _mm256_loadu_ps(r0 + j)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(qj, _mm256_loadu_ps(r1 + j)));
      a2 = _mm256_add_ps(a2, _mm256_mul_ps(qj, _mm256_loadu_ps(r2 + j)));
      a3 = _mm256_add_ps(a3, _mm256_mul_ps(qj, _mm256_loadu_ps(r3 + j)));
    }
    out[i] = finish(a0, q, r0, d8, d);
    out[i + 1] = finish(a1, q, r1, d8, d);
    out[i + 2] = finish(a2, q, r2, d8, d);
    out[i + 3] = finish(a3, q, r3, d8, d);
  }
  for (; i < n; ++i) out[i] = dot_avx2(q, rows + size_t{sel[i]} * d, d);
}

}  // namespace mipscan
