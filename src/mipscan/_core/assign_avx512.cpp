// assign.h's scores in AVX-512 (F): 4 rows x 32 centroids of sums in registers, each
// centroid load shared by the rows. The same operations per sum as the generic source
// (acc = acc + x[k] * c[k] in dimension order, from 0; -ffp-contract=off keeps the multiply
// and the add apart), so the same bits.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "assign.h"

namespace mipscan {

namespace {

// kRows rows x kVecs * 16 centroids (the last vector's lanes past `tail` masked off).
template <size_t kRows, size_t kVecs>
inline void tile(const float* x, size_t d, const float* ct, size_t L, float* s, __mmask16 tail) {
  __m512 acc[kRows][kVecs];
  for (size_t r = 0; r < kRows; ++r)
    for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  for (size_t k = 0; k < d; ++k) {
    __m512 c[kVecs];
    for (size_t v = 0; v + 1 < kVecs; ++v) c[v] = _mm512_loadu_ps(ct + k * L + 16 * v);
    c[kVecs - 1] = _mm512_maskz_loadu_ps(tail, ct + k * L + 16 * (kVecs - 1));
    for (size_t r = 0; r < kRows; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * d + k]);
      for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_mul_ps(xv, c[v]));
    }
  }
  for (size_t r = 0; r < kRows; ++r) {
    for (size_t v = 0; v + 1 < kVecs; ++v) _mm512_storeu_ps(s + r * L + 16 * v, acc[r][v]);
    _mm512_mask_storeu_ps(s + r * L + 16 * (kVecs - 1), tail, acc[r][kVecs - 1]);
  }
}

template <size_t kRows>
inline void rows(const float* x, size_t d, const float* ct, size_t L, float* s) {
  size_t j = 0;
  for (; j + 32 <= L; j += 32) tile<kRows, 2>(x, d, ct + j, L, s + j, 0xFFFF);
  if (j + 16 < L) {
    tile<kRows, 2>(x, d, ct + j, L, s + j, static_cast<__mmask16>((1u << (L - j - 16)) - 1));
  } else if (j < L) {
    const unsigned left = static_cast<unsigned>(L - j);
    tile<kRows, 1>(x, d, ct + j, L, s + j,
                   static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1));
  }
}

}  // namespace

void row_scores_avx512(const float* x, size_t nr, size_t d, const float* ct, size_t L, float* s) {
  size_t r = 0;
  for (; r + 4 <= nr; r += 4) rows<4>(x + r * d, d, ct, L, s + r * L);
  for (; r < nr; ++r) rows<1>(x + r * d, d, ct, L, s + r * L);
}

}  // namespace mipscan
