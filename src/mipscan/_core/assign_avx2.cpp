// assign.h's scores in AVX2: 4 rows x 16 centroids of sums in registers, each centroid
// load shared by the rows; the last few centroids (fewer than 8) by the generic source.
// The same operations per sum as the generic source (acc = acc + x[k] * c[k] in dimension
// order, from 0; -ffp-contract=off keeps the multiply and the add apart), so the same bits.
#include <immintrin.h>

#include "assign.h"

namespace mipscan {

namespace {

template <size_t kRows, size_t kVecs>
inline void tile(const float* x, size_t d, const float* ct, size_t L, float* s) {
  __m256 acc[kRows][kVecs];
  for (size_t r = 0; r < kRows; ++r)
    for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm256_setzero_ps();
  for (size_t k = 0; k < d; ++k) {
    __m256 c[kVecs];
    for (size_t v = 0; v < kVecs; ++v) c[v] = _mm256_loadu_ps(ct + k * L + 8 * v);
    for (size_t r = 0; r < kRows; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * d + k]);
      for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(xv, c[v]));
    }
  }
  for (size_t r = 0; r < kRows; ++r)
    for (size_t v = 0; v < kVecs; ++v) _mm256_storeu_ps(s + r * L + 8 * v, acc[r][v]);
}

template <size_t kRows>
inline void rows(const float* x, size_t d, const float* ct, size_t L, float* s) {
  size_t j = 0;
  for (; j + 16 <= L; j += 16) tile<kRows, 2>(x, d, ct + j, L, s + j);
  for (; j + 8 <= L; j += 8) tile<kRows, 1>(x, d, ct + j, L, s + j);
  for (; j < L; ++j) {
    for (size_t r = 0; r < kRows; ++r) {
      float acc = 0.f;
      for (size_t k = 0; k < d; ++k) acc = acc + x[r * d + k] * ct[k * L + j];
      s[r * L + j] = acc;
    }
  }
}

}  // namespace

void row_scores_avx2(const float* x, size_t nr, size_t d, const float* ct, size_t L, float* s) {
  size_t r = 0;
  for (; r + 4 <= nr; r += 4) rows<4>(x + r * d, d, ct, L, s + r * L);
  for (; r < nr; ++r) rows<1>(x + r * d, d, ct, L, s + r * L);
}

}  // namespace mipscan
