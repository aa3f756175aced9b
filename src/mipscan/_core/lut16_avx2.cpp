// AVX2 LUT16 scan. Built with -mavx2 -mfma; only reached through cpu.cpp's dispatch
// table after the CPU was checked for AVX2 and FMA.
#include <immintrin.h>

#include <algorithm>

#include "lut16.h"
#include "lut16_group.h"

namespace mipscan {

namespace {

// kBlocks = num_blocks when known at compile time, so that the loop unrolls completely;
// 0 = read it from num_blocks. kDouble: lut is in the doubled layout (lut16.h), row b
// already in both lanes at lut + 32b.
template <size_t kBlocks, bool kDouble = false>
void scan_impl(const uint8_t* packed, size_t groups, size_t num_blocks, const uint8_t* lut,
               uint16_t cut, uint16_t* sums, uint64_t* masks) {
  const size_t nb = kBlocks != 0 ? kBlocks : num_blocks;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i cutv = _mm256_set1_epi16(static_cast<short>(cut));
  auto table = [lut](size_t b) {  // LUT row b in both lanes
    if constexpr (kDouble) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut + b * 32));
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + b * 16)));
  };
  for (size_t g = 0; g < groups; ++g) {
    const __m256i* codes = reinterpret_cast<const __m256i*>(packed + g * nb * 32);
    // Shuffle results are 32 bytes: lo covers points 0-15 (lane 0) and 32-47 (lane 1), hi
    // points 16-31 and 48-63. Read as uint16 lanes, lane t of a 16-point run holds point
    // 2t in its low byte and 2t + 1 in its high byte. *_all sums whole lanes and *_odd the
    // high bytes, so even = all - 256 * odd. Every true sum is < 65536 (see the header),
    // so this modular arithmetic is exact.
    __m256i lo_all = _mm256_setzero_si256(), lo_odd = _mm256_setzero_si256();
    __m256i hi_all = _mm256_setzero_si256(), hi_odd = _mm256_setzero_si256();
    auto accumulate = [&](__m256i lo, __m256i hi) {
      lo_all = _mm256_add_epi16(lo_all, lo);
      lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16(lo, 8));
      hi_all = _mm256_add_epi16(hi_all, hi);
      hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16(hi, 8));
    };
    // Four blocks at a time: LUT entries are <= 63 (lut16.h), so four lookups add in 8
    // bits (<= 252) before one widening step.
    auto lookups = [&](size_t blk, __m256i& lo, __m256i& hi) {
      const __m256i c = _mm256_loadu_si256(codes + blk), t = table(blk);
      lo = _mm256_shuffle_epi8(t, _mm256_and_si256(c, low4));
      hi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
    };
    size_t b = 0;
    for (; b + 4 <= nb; b += 4) {
      __m256i l0, h0, l1, h1, l2, h2, l3, h3;
      lookups(b, l0, h0);
      lookups(b + 1, l1, h1);
      lookups(b + 2, l2, h2);
      lookups(b + 3, l3, h3);
      accumulate(_mm256_add_epi8(_mm256_add_epi8(l0, l1), _mm256_add_epi8(l2, l3)),
                 _mm256_add_epi8(_mm256_add_epi8(h0, h1), _mm256_add_epi8(h2, h3)));
    }
    if (b < nb) {  // the last one to three blocks, summed in 8 bits as above
      __m256i lo, hi, l, h;
      lookups(b, lo, hi);
      if (b + 1 < nb) {
        lookups(b + 1, l, h);
        lo = _mm256_add_epi8(lo, l);
        hi = _mm256_add_epi8(hi, h);
      }
      if (b + 2 < nb) {
        lookups(b + 2, l, h);
        lo = _mm256_add_epi8(lo, l);
        hi = _mm256_add_epi8(hi, h);
      }
      accumulate(lo, hi);
    }
    const GroupSums gs = finish_group(lo_all, lo_odd, hi_all, hi_odd, sums + g * kGroup);
    // Unsigned a >= cut  <=>  max(a, cut) == a. packs works within lanes, giving 8-byte
    // runs in the order (0-7, 16-23 | 8-15, 24-31); permute4x64 0xD8 restores point order
    // so movemask yields one bit per point.
    auto ge = [&](__m256i v) { return _mm256_cmpeq_epi16(_mm256_max_epu16(v, cutv), v); };
    auto bits = [&](__m256i x, __m256i y) {
      const __m256i packed8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(ge(x), ge(y)), 0xD8);
      return static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(packed8)));
    };
    masks[g] = bits(gs.p[0], gs.p[1]) | (bits(gs.p[2], gs.p[3]) << 32);
  }
}

}  // namespace

namespace {

// Specialised for the block counts of common embedding widths with 1, 2 or 4 dimensions
// per block (d = 16 ... 256).
template <bool kDouble>
void scan_blocks(const uint8_t* packed, size_t groups, size_t num_blocks, const uint8_t* lut,
                 uint16_t cut, uint16_t* sums, uint64_t* masks) {
  switch (num_blocks) {
    case 4: return scan_impl<4, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 8: return scan_impl<8, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 16: return scan_impl<16, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 17: return scan_impl<17, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 24: return scan_impl<24, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 25: return scan_impl<25, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 32: return scan_impl<32, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 48: return scan_impl<48, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 50: return scan_impl<50, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 64: return scan_impl<64, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
    default: return scan_impl<0, kDouble>(packed, groups, num_blocks, lut, cut, sums, masks);
  }
}

}  // namespace

void scan_lut16_avx2(const uint8_t* packed, size_t groups, size_t num_blocks,
                     const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  scan_blocks<false>(packed, groups, num_blocks, lut, cut, sums, masks);
}

// One query after another: sixteen YMM registers do not hold the accumulators of several
// queries beside the split codes (the AVX-512 kernel's 32 do), so at this level the
// queries share only the codes' trips from L2 to L1.
void scan_lut16_multi_avx2(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                           const uint8_t* const* luts, const uint16_t* cuts,
                           uint16_t* const* sums, uint64_t* const* masks) {
  for (size_t t = 0; t < nq; ++t) scan_blocks<true>(packed, groups, num_blocks, luts[t], cuts[t], sums[t], masks[t]);
}

float dot_avx2(const float* a, const float* b, size_t d) {
  __m256 acc = _mm256_setzero_ps();
  size_t j = 0;
  for (; j + 8 <= d; j += 8) {
    // mul then add, not FMA: the scalar kernel rounds the product first.
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)));
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  for (size_t t = 0; j < d; ++j, ++t) l[t] += a[j] * b[j];
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

namespace {

// Lanes of acc plus the scalar tail (j >= d8, lane j - d8), reduced as dot_avx2 does.
inline float finish_dot(__m256 acc, const float* a, const float* b, size_t d8, size_t d) {
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


// The spec's reduction ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) in registers: the
// same additions as finish_dot's, in the same order.
inline float reduce_lanes(__m256 acc) {
  const __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 w = _mm_add_ps(v, _mm_movehl_ps(v, v));  // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
  return _mm_cvtss_f32(_mm_add_ss(w, _mm_movehdup_ps(w)));
}

// One query against m rows, row t at row_at(t): eight rows per transposed reduction
// (dots8), then four sharing the loads of q, then one; each value exactly dot_avx2's.
// For the reorder (rows by id) and the centroid scores of one query (rows in order).
template <bool kPrefetch, class RowAt>
void dots_rows_impl(const float* q, size_t d, size_t m, RowAt row_at, float* out) {
  const size_t d8 = d - d % 8;
  const int tail = static_cast<int>(d - d8);
  // The tail (j >= d8) goes to lane j - d8, as in dot_avx2: its products are added to
  // those lanes only (a blend, so that no other lane gets even a + 0.0, which would turn
  // a -0.0 lane into +0.0).
  const __m256i tmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 tmaskf = _mm256_castsi256_ps(tmask);
  const __m256 qt = tail != 0 ? _mm256_maskload_ps(q + d8, tmask) : _mm256_setzero_ps();
  auto finish = [&](__m256 acc, const float* r) {
    if (tail != 0) {
      const __m256 p = _mm256_mul_ps(qt, _mm256_maskload_ps(r + d8, tmask));
      acc = _mm256_blendv_ps(acc, _mm256_add_ps(acc, p), tmaskf);
    }
    return reduce_lanes(acc);
  };
  // Scattered rows (the reorder) miss the caches: each row's lines are requested two
  // batches of eight ahead, so that their loads overlap the arithmetic on the rows before
  // (GloVe, reorder 500: 5% faster searches).
  const size_t row_bytes = d * sizeof(float);
  auto prefetch = [&](size_t from, size_t to) {
    if constexpr (kPrefetch) {
      for (size_t u = from; u < std::min(m, to); ++u) {
        const char* p = reinterpret_cast<const char*>(row_at(u));
        for (size_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
        _mm_prefetch(p + row_bytes - 1, _MM_HINT_T0);
      }
    }
  };
  prefetch(8, 16);
  size_t t = 0;
  for (; t + 8 <= m; t += 8) {  // eight rows, one transposed reduction
    const float* r[8];
    for (size_t u = 0; u < 8; ++u) r[u] = row_at(t + u);
    prefetch(t + 16, t + 24);
    dots8(q, r, d8, d, out + t);
  }
  for (; t + 4 <= m; t += 4) {
    const float* r0 = row_at(t);
    const float* r1 = row_at(t + 1);
    const float* r2 = row_at(t + 2);
    const float* r3 = row_at(t + 3);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (size_t j = 0; j < d8; j += 8) {
      const __m256 qj = _mm256_loadu_ps(q + j);
      // mul then add, as dot_avx2 (no FMA)
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(qj, _mm256_loadu_ps(r0 + j)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(qj, _mm256_loadu_ps(r1 + j)));
      a2 = _mm256_add_ps(a2, _mm256_mul_ps(qj, _mm256_loadu_ps(r2 + j)));
      a3 = _mm256_add_ps(a3, _mm256_mul_ps(qj, _mm256_loadu_ps(r3 + j)));
    }
    out[t] = finish(a0, r0);
    out[t + 1] = finish(a1, r1);
    out[t + 2] = finish(a2, r2);
    out[t + 3] = finish(a3, r3);
  }
  for (; t < m; ++t) {
    const float* r0 = row_at(t);
    __m256 a0 = _mm256_setzero_ps();
    for (size_t j = 0; j < d8; j += 8)
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(r0 + j)));
    out[t] = finish(a0, r0);
  }
}

// One query against every row (rows in order); measured: eight rows per transposed
// reduction halved the centroid scores' share of a single-query search against four
// rows each finished through memory.
void dots_one_query(const float* q, const float* rows, size_t m, size_t d, float* out) {
  dots_rows_impl<false>(q, d, m, [rows, d](size_t t) { return rows + t * d; }, out);
}

}  // namespace

void dot_rows_avx2(const float* q, const float* rows, size_t d, const uint32_t* ids, size_t m,
                   float* out) {
  dots_rows_impl<true>(q, d, m, [rows, ids, d](size_t t) { return rows + size_t{ids[t]} * d; }, out);
}

void dots_avx2(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out) {
  const size_t d8 = d - d % 8;
  size_t i = 0;
  // Four queries against two rows at a time: eight accumulators, and each row is read
  // once per four queries instead of once per query.
  for (; i + 4 <= nq; i += 4) {
    const float* q[4] = {qs + i * d, qs + (i + 1) * d, qs + (i + 2) * d, qs + (i + 3) * d};
    size_t r = 0;
    for (; r + 2 <= m; r += 2) {
      const float* r0 = rows + r * d;
      const float* r1 = r0 + d;
      __m256 acc[4][2];
      for (size_t t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      for (size_t j = 0; j < d8; j += 8) {
        const __m256 x0 = _mm256_loadu_ps(r0 + j), x1 = _mm256_loadu_ps(r1 + j);
        for (size_t t = 0; t < 4; ++t) {
          const __m256 qj = _mm256_loadu_ps(q[t] + j);
          acc[t][0] = _mm256_add_ps(acc[t][0], _mm256_mul_ps(qj, x0));
          acc[t][1] = _mm256_add_ps(acc[t][1], _mm256_mul_ps(qj, x1));
        }
      }
      for (size_t t = 0; t < 4; ++t) {
        out[(i + t) * m + r] = finish_dot(acc[t][0], q[t], r0, d8, d);
        out[(i + t) * m + r + 1] = finish_dot(acc[t][1], q[t], r1, d8, d);
      }
    }
    for (; r < m; ++r)
      for (size_t t = 0; t < 4; ++t) out[(i + t) * m + r] = dot_avx2(q[t], rows + r * d, d);
  }
  for (; i < nq; ++i) dots_one_query(qs + i * d, rows, m, d, out + i * m);
}

}  // namespace mipscan
