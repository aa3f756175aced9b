// topk_columns with AVX-512 (topk_columns.h): the template's insertion written with
// intrinsics, one register per slot and 16 columns per register (the compiler keeps the
// template's lane arrays in memory, several times slower). The same compares and
// selects, so the same bits. Reached only through cpu.cpp's table after the CPU was checked.
#include <immintrin.h>

#include "topk_columns.h"

namespace mipscan {

void topk_columns_avx512(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                         uint32_t* out_id) {
  constexpr size_t kW = 16;
  std::vector<float> ts_buf(k * kW);
  std::vector<uint32_t> ti_buf(k * kW);
  float* ts = ts_buf.data();
  uint32_t* ti = ti_buf.data();
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (size_t q0 = 0; q0 < nq; q0 += kW) {
    const size_t w = std::min(kW, nq - q0);
    const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << w) - 1);
    for (size_t slot = 0; slot < k; ++slot) {
      _mm512_storeu_ps(ts + slot * kW, neg_inf);
      _mm512_storeu_si512(ti + slot * kW, _mm512_set1_epi32(-1));
    }
    const float* last = ts + (k - 1) * kW;
    for (size_t j = 0; j < m; ++j) {
      const __m512 v = _mm512_mask_loadu_ps(neg_inf, lanes, scores_t + j * nq + q0);
      if (_mm512_cmp_ps_mask(v, _mm512_loadu_ps(last), _CMP_GT_OQ) == 0) continue;
      const __m512i vi = _mm512_set1_epi32(static_cast<int>(j));
      __mmask16 prev = 0;
      __m512 prev_s = neg_inf;
      __m512i prev_i = vi;
      for (size_t slot = 0; slot < k; ++slot) {
        const __m512 old_s = _mm512_loadu_ps(ts + slot * kW);
        const __m512i old_i = _mm512_loadu_si512(ti + slot * kW);
        const __mmask16 c = _mm512_cmp_ps_mask(v, old_s, _CMP_GT_OQ);
        const __m512 ns = _mm512_mask_blend_ps(prev, _mm512_mask_blend_ps(c, old_s, v), prev_s);
        const __m512i ni =
            _mm512_mask_blend_epi32(prev, _mm512_mask_blend_epi32(c, old_i, vi), prev_i);
        _mm512_storeu_ps(ts + slot * kW, ns);
        _mm512_storeu_si512(ti + slot * kW, ni);
        prev = c;
        prev_s = old_s;
        prev_i = old_i;
      }
    }
    topk_columns_finish(scores_t, m, nq, k, q0, w, ts, ti, out_s, out_id);
  }
}

}  // namespace mipscan
