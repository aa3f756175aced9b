// assign.h's nearest centroids in AVX-512 (F): 4 rows x 32 centroids of sums in registers,
// each centroid load shared by the rows, each step a fused multiply-add (acc = fma(x[k],
// c[k], acc) in dimension order, from 0: the AVX2 kernel's bits). The scores never reach
// memory: each row keeps, per lane, the best score and its column so far (strictly
// greater replaces, so the first of equals stays), and the row's answer is the smallest
// column among the lanes holding the maximum: the first maximum, as numpy's argmax.
#include "avx512_intrin.h"

#include <limits>

#include "assign.h"

namespace mipscan {

namespace {

struct Best {
  __m512 score;
  __m512i column;
  __mmask16 nan;
};

// kRows rows against kVecs * 16 centroids from column j0 (the last vector's lanes outside
// `tail` masked off), folded into each row's Best.
template <size_t kRows, size_t kVecs>
inline void tile(const float* x, size_t d, const float* ct, const float* h, size_t L, size_t j0,
                 __mmask16 tail, Best* best) {
  __m512 acc[kRows][kVecs];
  for (size_t r = 0; r < kRows; ++r)
    for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  for (size_t k = 0; k < d; ++k) {
    __m512 c[kVecs];
    for (size_t v = 0; v + 1 < kVecs; ++v) c[v] = _mm512_loadu_ps(ct + k * L + j0 + 16 * v);
    c[kVecs - 1] = _mm512_maskz_loadu_ps(tail, ct + k * L + j0 + 16 * (kVecs - 1));
    for (size_t r = 0; r < kRows; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * d + k]);
      for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(xv, c[v], acc[r][v]);
    }
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (size_t v = 0; v < kVecs; ++v) {
    const __mmask16 m = v + 1 < kVecs ? static_cast<__mmask16>(0xFFFF) : tail;
    const __m512 hv = _mm512_maskz_loadu_ps(m, h + j0 + 16 * v);
    const __m512i col = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j0 + 16 * v)));
    for (size_t r = 0; r < kRows; ++r) {
      const __m512 s = _mm512_sub_ps(acc[r][v], hv);
      best[r].nan |= _mm512_mask_cmp_ps_mask(m, s, s, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, s, best[r].score, _CMP_GT_OQ);
      best[r].score = _mm512_mask_mov_ps(best[r].score, gt, s);
      best[r].column = _mm512_mask_mov_epi32(best[r].column, gt, col);
    }
  }
}

template <size_t kRows>
inline void rows(const float* x, size_t d, const float* ct, const float* h, size_t L,
                 int64_t* out) {
  Best best[kRows];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (size_t r = 0; r < kRows; ++r) {
    // A lane that never beats -inf keeps its lane number as column; it ties for the
    // maximum only when every score is -inf, and lane 0 (column 0, numpy's answer) wins.
    best[r] = Best{_mm512_set1_ps(-std::numeric_limits<float>::infinity()), lane, 0};
  }
  size_t j = 0;
  for (; j + 32 <= L; j += 32) tile<kRows, 2>(x, d, ct, h, L, j, 0xFFFF, best);
  if (j + 16 < L) {
    tile<kRows, 2>(x, d, ct, h, L, j, static_cast<__mmask16>((1u << (L - j - 16)) - 1), best);
  } else if (j < L) {
    const unsigned left = static_cast<unsigned>(L - j);
    tile<kRows, 1>(x, d, ct, h, L, j, static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1),
                   best);
  }
  for (size_t r = 0; r < kRows; ++r) {
    if (best[r].nan != 0) {  // numpy's answer, the first NaN
      nearest_row_fused(x + r * d, d, ct, h, L, out + r);
      continue;
    }
    const float mx = _mm512_reduce_max_ps(best[r].score);
    const __mmask16 at = _mm512_cmp_ps_mask(best[r].score, _mm512_set1_ps(mx), _CMP_EQ_OQ);
    out[r] = _mm512_mask_reduce_min_epi32(at, best[r].column);
  }
}

}  // namespace

void nearest_rows_avx512(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                         size_t L, int64_t* out) {
  size_t r = 0;
  for (; r + 4 <= nr; r += 4) rows<4>(x + r * d, d, ct, h, L, out + r);
  for (; r < nr; ++r) rows<1>(x + r * d, d, ct, h, L, out + r);
}

}  // namespace mipscan
