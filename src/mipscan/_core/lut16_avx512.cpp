// AVX-512 (F, BW, VL) LUT16 scans and centroid scores. Built with -mavx512f -mavx512bw
// -mavx512vl; only reached through cpu.cpp's dispatch table after the CPU was checked
// for those features and the OS for the opmask and ZMM state (XCR0 bits 1, 2, 5, 6, 7).
// The scans are lut16_avx512_scan.h's (lut16_avx512_gfni.cpp: the same with GFNI).
//
// Same integer and float results as the scalar kernels (lut16.h).
#include "lut16_avx512_scan.h"

namespace mipscan {

void scan_lut16_multi_avx512(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                             const uint8_t* const* luts, const uint16_t* cuts,
                             uint16_t* const* sums, uint64_t* const* masks) {
  scan_lut16_multi_avx512_t<false>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
}

void scan_lut16_avx512(const uint8_t* packed, size_t groups, size_t num_blocks,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  scan_lut16_avx512_t<false>(packed, groups, num_blocks, lut, cut, sums, masks);
}

float dot_avx512(const float* a, const float* b, size_t d) {
  // One inner product has a single chain per lane; 512 bits would need 16 lanes, which
  // the spec's 8-lane order forbids. So this is dot_avx2's body (VEX encoded here too).
  return dot_avx2(a, b, d);
}

namespace {

// Finishes two dots held side by side in acc (lanes 0-7: q . row0, 8-15: q . row1, the
// spec's eight running sums each): adds the tail j in [d8, d) to lane j - d8 of each half
// (masked, so other lanes stay bit for bit as they are, -0.0 included), then reduces each
// half in the spec's order with shuffles:
//   s1 lane t (t < 4) = l[t] + l[t + 4];  s2 lane 0 = s1[0] + s1[2], lane 1 = s1[1] + s1[3];
//   result = s2[0] + s2[1] = ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline void finish_pair(__m512 acc, const float* q, const float* r0, const float* r1,
                        size_t d8, size_t d, float* out0, float* out1) {
  if (d8 < d) {
    const __mmask8 t8 = static_cast<__mmask8>((1u << (d - d8)) - 1);
    const __mmask16 t16 = static_cast<__mmask16>(t8 | (t8 << 8));
    const __m256 qt = _mm256_maskz_loadu_ps(t8, q + d8);
    const __m512 qq = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(qt)));
    const __m512 rr = _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_maskz_loadu_ps(t8, r0 + d8))),
        _mm256_castps_pd(_mm256_maskz_loadu_ps(t8, r1 + d8)), 1));
    acc = _mm512_mask_add_ps(acc, t16, acc, _mm512_mul_ps(qq, rr));
  }
  const __m512 s1 = _mm512_add_ps(acc, _mm512_shuffle_f32x4(acc, acc, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512 s2 = _mm512_add_ps(s1, _mm512_permute_ps(s1, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 s3 = _mm512_add_ps(s2, _mm512_permute_ps(s2, _MM_SHUFFLE(2, 3, 0, 1)));
  *out0 = _mm512_cvtss_f32(s3);
  *out1 = _mm512_cvtss_f32(_mm512_shuffle_f32x4(s3, s3, _MM_SHUFFLE(2, 2, 2, 2)));
}

// Rows r and r + 1 side by side, 8 floats each: lanes 0-7 row r, 8-15 row r + 1.
inline __m512 load_rows(const float* r0, const float* r1) {
  // insertf64x4 rather than insertf32x8 (DQ): the same bits, F only.
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(r0))),
                                             _mm256_castps_pd(_mm256_loadu_ps(r1)), 1));
}

// Queries q[0..kQ) against rows[r .. r + 4): each 512-bit accumulator holds two rows'
// eight spec lanes (the query broadcast to both halves), so every lane still sums
// a[j] * b[j] for j = lane, lane + 8, ... in order, multiply then add, as dot_scalar.
template <size_t kQ>
inline void dots_block(const float* const* q, const float* rows, size_t r, size_t m, size_t d,
                       size_t d8, float* out, size_t i) {
  const float* r0 = rows + r * d;
  const float* r1 = r0 + d;
  const float* r2 = r1 + d;
  const float* r3 = r2 + d;
  __m512 acc[kQ][2];
  for (size_t t = 0; t < kQ; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (size_t j = 0; j < d8; j += 8) {
    const __m512 x01 = load_rows(r0 + j, r1 + j), x23 = load_rows(r2 + j, r3 + j);
    for (size_t t = 0; t < kQ; ++t) {
      const __m512 qj = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(q[t] + j))));
      acc[t][0] = _mm512_add_ps(acc[t][0], _mm512_mul_ps(qj, x01));
      acc[t][1] = _mm512_add_ps(acc[t][1], _mm512_mul_ps(qj, x23));
    }
  }
  for (size_t t = 0; t < kQ; ++t) {
    float* o = out + (i + t) * m + r;
    finish_pair(acc[t][0], q[t], r0, r1, d8, d, o, o + 1);
    finish_pair(acc[t][1], q[t], r2, r3, d8, d, o + 2, o + 3);
  }
}

template <size_t kQ>
void dots_queries(const float* qs, size_t i, const float* rows, size_t m, size_t d, float* out) {
  const size_t d8 = d - d % 8;
  const float* q[kQ];
  for (size_t t = 0; t < kQ; ++t) q[t] = qs + (i + t) * d;
  size_t r = 0;
  for (; r + 4 <= m; r += 4) dots_block<kQ>(q, rows, r, m, d, d8, out, i);
  for (; r < m; ++r)
    for (size_t t = 0; t < kQ; ++t) out[(i + t) * m + r] = dot_avx2(q[t], rows + r * d, d);
}

}  // namespace

void dots_avx512(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out) {
  // Four queries against four rows at a time (eight 512-bit accumulators); each row is
  // read once per four queries.
  // Fewer than four queries (a single-query search): the AVX2 kernel, measured faster in
  // whole searches (glove-50-dev single queries 0.96x -> 1.01x of the AVX2 level), though
  // not in isolation: one query gives the 512-bit version only two accumulator chains.
  if (nq < 4) return dots_avx2(qs, nq, rows, m, d, out);
  size_t i = 0;
  for (; i + 4 <= nq; i += 4) dots_queries<4>(qs, i, rows, m, d, out);
  for (; i < nq; ++i) dots_queries<1>(qs, i, rows, m, d, out);
}

void argmax_shifted_avx512(const float* s, size_t m, size_t k, const float* h, int64_t* out) {
  // Per lane, the first maximum of its columns (strictly greater replaces); then the
  // row's maximum and, among lanes holding it, the smallest column: the first maximum.
  // A row with a NaN takes the scalar kernel (numpy's answer: the first NaN).
  const __m512i step = _mm512_set1_epi32(16);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_huge_valf());
  for (size_t i = 0; i < m; ++i) {
    const float* r = s + i * k;
    __m512 best = neg_inf;
    __m512i at = lane, col = lane;
    __mmask16 nan = 0;
    size_t j = 0;
    for (; j + 16 <= k; j += 16) {
      const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(r + j), _mm512_loadu_ps(h + j));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, col);
      col = _mm512_add_epi32(col, step);
    }
    if (j < k) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (k - j)) - 1);
      const __m512 v = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, r + j),
                                           _mm512_maskz_loadu_ps(tail, h + j));
      nan |= _mm512_mask_cmp_ps_mask(tail, v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(tail, v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, col);
    }
    if (nan != 0) {
      argmax_shifted_scalar(r, 1, k, h, out + i);
      continue;
    }
    // A lane that never beat -inf keeps at = its lane number, maybe >= k; it ties for the
    // maximum only when every value is -inf, and lane 0 (column 0, numpy's answer) wins then.
    const float mx = _mm512_reduce_max_ps(best);
    const __mmask16 is_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(mx), _CMP_EQ_OQ);
    out[i] = static_cast<int64_t>(_mm512_mask_reduce_min_epi32(is_max, at));
  }
}

}  // namespace mipscan
