// The top-k kernels with AVX-512 (topk.h), reached only through cpu.cpp's table after the
// CPU was checked:
// - topk_columns (topk_columns.h): the template's insertion written with intrinsics, one
//   register per slot and 16 columns per register (the compiler keeps the template's lane
//   arrays in memory, several times slower). The same compares and selects, so the same bits.
// - the compactions: 16 values per step, kept ones packed by vcompressps into a register
//   (a compress straight to memory is slow on some CPUs) and stored whole.
#include "avx512_intrin.h"

#include <type_traits>

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

float nth_of_64_avx512(const float* v, size_t rank) {
  // v[i] is the answer when fewer than rank + 1 values exceed it and more than rank reach
  // it: two counts per candidate over four registers, branch-light (a sort of 64 values
  // mispredicts about once per comparison).
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const __m512 c = _mm512_loadu_ps(v + 32), d = _mm512_loadu_ps(v + 48);
  auto count = [&](auto pred, __m512 x) {  // how many of v[0, 64) compare true with x
    constexpr int p = decltype(pred)::value;
    const uint64_t m = (uint64_t{_mm512_cmp_ps_mask(a, x, p)} << 48) |
                       (uint64_t{_mm512_cmp_ps_mask(b, x, p)} << 32) |
                       (uint64_t{_mm512_cmp_ps_mask(c, x, p)} << 16) | _mm512_cmp_ps_mask(d, x, p);
    return static_cast<size_t>(_mm_popcnt_u64(m));
  };
  using Gt = std::integral_constant<int, _CMP_GT_OQ>;
  using Ge = std::integral_constant<int, _CMP_GE_OQ>;
  for (size_t i = 0; i < 64; ++i) {
    const __m512 x = _mm512_set1_ps(v[i]);
    if (count(Gt{}, x) <= rank && count(Ge{}, x) > rank) return v[i];
  }
  return v[0];  // unreachable: some value always satisfies both counts
}

size_t compact_ge_avx512(float* s, uint32_t* id, size_t n, float t) {
  // In place: the 16 values at i are loaded before the store at w <= i, whose 16 lanes end
  // at or before i + 15, so nothing is overwritten before it is read.
  const __m512 tv = _mm512_set1_ps(t);
  size_t w = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(s + i);
    const __m512i d = _mm512_loadu_si512(id + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    _mm512_storeu_ps(s + w, _mm512_maskz_compress_ps(keep, v));
    _mm512_storeu_si512(id + w, _mm512_maskz_compress_epi32(keep, d));
    w += static_cast<size_t>(_mm_popcnt_u32(keep));
  }
  if (i < n) {  // the tail, masked: no lane past n is read or written
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, s + i);
    const __m512i d = _mm512_maskz_loadu_epi32(lanes, id + i);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, v, tv, _CMP_GE_OQ);
    const unsigned c = _mm_popcnt_u32(keep);
    const __mmask16 out = static_cast<__mmask16>((1u << c) - 1);
    _mm512_mask_storeu_ps(s + w, out, _mm512_maskz_compress_ps(keep, v));
    _mm512_mask_storeu_epi32(id + w, out, _mm512_maskz_compress_epi32(keep, d));
    w += c;
  }
  return w;
}

size_t compact_bin_avx512(const float* v, const uint16_t* bins, size_t n, uint16_t b, float* out) {
  const __m256i bv = _mm256_set1_epi16(static_cast<short>(b));
  size_t w = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i bi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bins + i));
    const __mmask16 keep = _mm256_cmpeq_epi16_mask(bi, bv);
    _mm512_storeu_ps(out + w, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(v + i)));
    w += static_cast<size_t>(_mm_popcnt_u32(keep));
  }
  for (; i < n; ++i) {
    out[w] = v[i];
    w += bins[i] == b;
  }
  return w;
}

size_t collect_group_avx512(const uint16_t* sums, uint64_t mask, float base, float inv,
                            uint32_t id0, float thr, uint64_t thr_id, float* out_s,
                            uint32_t* out_id) {
  const __m512 bv = _mm512_set1_ps(base), iv = _mm512_set1_ps(inv), tv = _mm512_set1_ps(thr);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const bool all_ties = thr_id > 0xFFFFFFFFu;  // admits() takes every tie at thr
  const __m512i tid = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(thr_id)));
  size_t w = 0;
  for (unsigned r = 0; r < 4; ++r) {  // 16 points at a time
    const __mmask16 m = static_cast<__mmask16>(mask >> (16 * r));
    if (m == 0) continue;
    const __m512i s32 =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + 16 * r)));
    // Exact conversion (sums < 2^16), then the product and the sum, each rounded: the
    // scalar kernel's float operations (no contraction: -ffp-contract=off).
    const __m512 v = _mm512_add_ps(bv, _mm512_mul_ps(_mm512_cvtepi32_ps(s32), iv));
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(id0 + 16 * r)), lane);
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(m, v, tv, _CMP_EQ_OQ);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, v, tv, _CMP_GT_OQ) |
                           (all_ties ? eq : _mm512_mask_cmplt_epu32_mask(eq, ids, tid));
    _mm512_storeu_ps(out_s + w, _mm512_maskz_compress_ps(keep, v));
    _mm512_storeu_si512(out_id + w, _mm512_maskz_compress_epi32(keep, ids));
    w += static_cast<size_t>(_mm_popcnt_u32(keep));
  }
  return w;
}

}  // namespace mipscan
