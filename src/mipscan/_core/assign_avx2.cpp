// assign.h's nearest centroids in AVX2 (with FMA): 4 rows x 16 centroids of sums in
// registers, each centroid load shared by the rows, each step a fused multiply-add (acc =
// fma(x[k], c[k], acc) in dimension order, from 0: the AVX-512 kernel's bits); the last few
// centroids (fewer than 8) by std::fma. As in the AVX-512 kernel, each row keeps per lane
// the best score and its column (strictly greater replaces), and answers the smallest
// column holding the maximum: numpy's first maximum.
#include <immintrin.h>

#include <climits>
#include <cmath>
#include <limits>

#include "assign.h"

namespace mipscan {

namespace {

struct Best {
  __m256 score;
  __m256i column;
  __m256 nan;
};

template <size_t kRows, size_t kVecs>
inline void tile(const float* x, size_t d, const float* ct, const float* h, size_t L, size_t j0,
                 Best* best) {
  __m256 acc[kRows][kVecs];
  for (size_t r = 0; r < kRows; ++r)
    for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm256_setzero_ps();
  for (size_t k = 0; k < d; ++k) {
    __m256 c[kVecs];
    for (size_t v = 0; v < kVecs; ++v) c[v] = _mm256_loadu_ps(ct + k * L + j0 + 8 * v);
    for (size_t r = 0; r < kRows; ++r) {
      const __m256 xv = _mm256_set1_ps(x[r * d + k]);
      for (size_t v = 0; v < kVecs; ++v) acc[r][v] = _mm256_fmadd_ps(xv, c[v], acc[r][v]);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (size_t v = 0; v < kVecs; ++v) {
    const __m256 hv = _mm256_loadu_ps(h + j0 + 8 * v);
    const __m256i col = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(j0 + 8 * v)));
    for (size_t r = 0; r < kRows; ++r) {
      const __m256 s = _mm256_sub_ps(acc[r][v], hv);
      best[r].nan = _mm256_or_ps(best[r].nan, _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
      const __m256 gt = _mm256_cmp_ps(s, best[r].score, _CMP_GT_OQ);
      best[r].score = _mm256_blendv_ps(best[r].score, s, gt);
      best[r].column = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(best[r].column), _mm256_castsi256_ps(col), gt));
    }
  }
}

// One row's score of centroid c, as the tiles sum it.
inline float score_of(const float* xr, size_t d, const float* ct, size_t L, size_t c) {
  float acc = 0.f;
  for (size_t k = 0; k < d; ++k) acc = std::fma(xr[k], ct[k * L + c], acc);
  return acc;
}

template <size_t kRows>
inline void rows(const float* x, size_t d, const float* ct, const float* h, size_t L,
                 int64_t* out) {
  Best best[kRows];
  for (size_t r = 0; r < kRows; ++r) {
    // As in the AVX-512 kernel: an all -inf row answers lane 0, column 0.
    best[r] = Best{_mm256_set1_ps(-std::numeric_limits<float>::infinity()), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                   _mm256_setzero_ps()};
  }
  size_t j = 0;
  for (; j + 16 <= L; j += 16) tile<kRows, 2>(x, d, ct, h, L, j, best);
  for (; j + 8 <= L; j += 8) tile<kRows, 1>(x, d, ct, h, L, j, best);
  for (size_t r = 0; r < kRows; ++r) {
    const float* xr = x + r * d;
    bool nan = _mm256_movemask_ps(best[r].nan) != 0;
    float lane_s[8];
    int lane_c[8];
    _mm256_storeu_ps(lane_s, best[r].score);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_c), best[r].column);
    float mx = lane_s[0];
    for (int t = 1; t < 8; ++t) mx = lane_s[t] > mx ? lane_s[t] : mx;
    int col = INT_MAX;
    for (int t = 0; t < 8; ++t)
      if (lane_s[t] == mx && lane_c[t] < col) col = lane_c[t];
    for (size_t c = j; c < L; ++c) {  // the last columns: later than every lane's
      const float s = score_of(xr, d, ct, L, c) - h[c];
      nan |= s != s;
      if (s > mx) mx = s, col = static_cast<int>(c);
    }
    if (nan) {  // numpy's answer, the first NaN
      nearest_row_fused(xr, d, ct, h, L, out + r);
      continue;
    }
    out[r] = col;
  }
}

}  // namespace

void nearest_rows_avx2(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                       size_t L, int64_t* out) {
  size_t r = 0;
  for (; r + 4 <= nr; r += 4) rows<4>(x + r * d, d, ct, h, L, out + r);
  for (; r < nr; ++r) rows<1>(x + r * d, d, ct, h, L, out + r);
}

}  // namespace mipscan
