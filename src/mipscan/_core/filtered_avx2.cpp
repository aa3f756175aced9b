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

// Eight rows at once: eight accumulators of the spec's eight lanes each, the tail added
// to its lanes (blend: other lanes keep their bits, -0.0 included), then an 8 x 8
// transpose so that the spec's reduction ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
// runs once for the eight rows, lane r of each vector being row r.
inline void dots8(const float* q, const float* const* r, size_t d8, size_t d, float* out) {
  __m256 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
  for (size_t j = 0; j < d8; j += 8) {
    const __m256 qj = _mm256_loadu_ps(q + j);
    for (int t = 0; t < 8; ++t) a[t] = _mm256_add_ps(a[t], _mm256_mul_ps(qj, _mm256_loadu_ps(r[t] + j)));
  }
  if (d8 < d) {
    const int m = static_cast<int>(d - d8);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), lane);
    const __m256 qt = _mm256_maskload_ps(q + d8, tail);
    const __m256 keep = _mm256_castsi256_ps(tail);
    for (int t = 0; t < 8; ++t) {
      const __m256 sum = _mm256_add_ps(a[t], _mm256_mul_ps(qt, _mm256_maskload_ps(r[t] + d8, tail)));
      a[t] = _mm256_blendv_ps(a[t], sum, keep);
    }
  }
  const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
  const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
  const __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
  const __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
  // u0: lanes 0 (low half) and 4 (high half) of rows 0-3; u1: lanes 1 and 5; u2: 2 and
  // 6; u3: 3 and 7; u4-u7 the same for rows 4-7.
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 l0 = _mm256_permute2f128_ps(u0, u4, 0x20), l4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  const __m256 l1 = _mm256_permute2f128_ps(u1, u5, 0x20), l5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  const __m256 l2 = _mm256_permute2f128_ps(u2, u6, 0x20), l6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  const __m256 l3 = _mm256_permute2f128_ps(u3, u7, 0x20), l7 = _mm256_permute2f128_ps(u3, u7, 0x31);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(l0, l4), _mm256_add_ps(l2, l6)),
                                      _mm256_add_ps(_mm256_add_ps(l1, l5), _mm256_add_ps(l3, l7))));
}

}  // namespace

void dots_rows_avx2(const float* q, const float* rows, const uint32_t* sel, size_t n, size_t d,
                    float* out) {
  const size_t d8 = d - d % 8;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float* r[8];
    for (int t = 0; t < 8; ++t) r[t] = rows + size_t{sel[i + t]} * d;
    dots8(q, r, d8, d, out + i);
  }
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
