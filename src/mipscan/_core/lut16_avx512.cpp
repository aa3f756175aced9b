// AVX-512 (F, BW, VL) LUT16 scan and centroid scores. Built with -mavx512f -mavx512bw
// -mavx512vl; only reached through cpu.cpp's dispatch table after the CPU was checked
// for those features and the OS for the opmask and ZMM state (XCR0 bits 1, 2, 5, 6, 7).
//
// Same packed layout and same integer and float results as the scalar kernels (lut16.h).
// VBMI is not used: its byte permutes (vpermb) would only replace the final word
// permutes, which run once per group, not once per block.
#include "avx512_intrin.h"

#include "lut16.h"
#include "lut16_group.h"

namespace mipscan {

namespace {

// Lanes 0-1 + lanes 2-3 (uint16, modulo 2^16): a two-block accumulator folded to the
// AVX2 kernel's one.
inline __m256i fold_lanes(__m512i v) {
  return _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// Bit j set iff point j's sum >= cut (cutv: cut in every uint16 lane).
inline uint64_t group_mask(const GroupSums& gs, __m256i cutv) {
  return uint64_t{_mm256_cmpge_epu16_mask(gs.p[0], cutv)} | (uint64_t{_mm256_cmpge_epu16_mask(gs.p[1], cutv)} << 16) |
         (uint64_t{_mm256_cmpge_epu16_mask(gs.p[2], cutv)} << 32) | (uint64_t{_mm256_cmpge_epu16_mask(gs.p[3], cutv)} << 48);
}

// One group, two blocks per register: a group's blocks b and b + 1 are 64 contiguous
// bytes, so one 512-bit load holds block b in 128-bit lanes 0-1 and block b + 1 in lanes
// 2-3, and tables[p] holds LUT row 2p in lanes 0-1 and row 2p + 1 in lanes 2-3 (zeros
// past the last block). No inserts, and a leaf's odd last group costs one group's work.
// Folding lanes 2-3 onto 0-1 at the end gives the AVX2 kernel's accumulators exactly, and
// its finish. kBlocks as in the AVX2 kernel (0: read num_blocks).
template <size_t kBlocks>
inline void scan_group(const uint8_t* g, size_t num_blocks, const __m512i* tables, __m256i cutv,
                       uint16_t* sums, uint64_t* mask) {
  const size_t nb = kBlocks != 0 ? kBlocks : num_blocks;
  const size_t pairs = nb / 2, odd = nb % 2;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // lo covers points 0-15 and 32-47 (per block), hi 16-31 and 48-63; uint16 lane t of a
  // 16-point run holds point 2t (low byte) and 2t + 1 (high byte). even = all - 256 *
  // odd, exact modulo 2^16 because every true sum is < 65536 (lut16.h).
  __m512i lo_all = _mm512_setzero_si512(), lo_odd = _mm512_setzero_si512();
  __m512i hi_all = _mm512_setzero_si512(), hi_odd = _mm512_setzero_si512();
  auto accumulate = [&](__m512i lo, __m512i hi) {
    lo_all = _mm512_add_epi16(lo_all, lo);
    lo_odd = _mm512_add_epi16(lo_odd, _mm512_srli_epi16(lo, 8));
    hi_all = _mm512_add_epi16(hi_all, hi);
    hi_odd = _mm512_add_epi16(hi_odd, _mm512_srli_epi16(hi, 8));
  };
  // Pair p's lookups (blocks 2p and 2p + 1); the odd last block comes zero-extended, its
  // table's upper lanes zero (so its lanes 2-3 add nothing).
  auto lookups = [&](size_t p, __m512i& lo, __m512i& hi) {
    const __m512i c = p < pairs ? _mm512_loadu_si512(g + p * 64)
                                : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + p * 64)));
    lo = _mm512_shuffle_epi8(tables[p], _mm512_and_si512(c, low4));
    hi = _mm512_shuffle_epi8(tables[p], _mm512_and_si512(_mm512_srli_epi16(c, 4), low4));
  };
  // Four registers (eight blocks) at a time: each byte then sums four lookups (one per
  // register; entries <= 63, lut16.h), <= 252, before one widening step.
  const size_t regs = pairs + odd;
  size_t p = 0;
  for (; p + 4 <= regs; p += 4) {
    __m512i l0, h0, l1, h1, l2, h2, l3, h3;
    lookups(p, l0, h0);
    lookups(p + 1, l1, h1);
    lookups(p + 2, l2, h2);
    lookups(p + 3, l3, h3);
    accumulate(_mm512_add_epi8(_mm512_add_epi8(l0, l1), _mm512_add_epi8(l2, l3)),
               _mm512_add_epi8(_mm512_add_epi8(h0, h1), _mm512_add_epi8(h2, h3)));
  }
  if (p < regs) {  // the last one to three registers, summed in 8 bits as above
    __m512i lo, hi, l, h;
    lookups(p, lo, hi);
    if (p + 1 < regs) {
      lookups(p + 1, l, h);
      lo = _mm512_add_epi8(lo, l);
      hi = _mm512_add_epi8(hi, h);
    }
    if (p + 2 < regs) {
      lookups(p + 2, l, h);
      lo = _mm512_add_epi8(lo, l);
      hi = _mm512_add_epi8(hi, h);
    }
    accumulate(lo, hi);
  }
  const __m256i la_all = fold_lanes(lo_all), la_odd = fold_lanes(lo_odd);
  const __m256i ha_all = fold_lanes(hi_all), ha_odd = fold_lanes(hi_odd);
  *mask = group_mask(finish_group(la_all, la_odd, ha_all, ha_odd, sums), cutv);  // the AVX2 kernel's end
}

template <size_t kBlocks>
void scan_impl(const uint8_t* packed, size_t groups, size_t num_blocks, const uint8_t* lut,
               uint16_t cut, uint16_t* sums, uint64_t* masks) {
  const size_t nb = kBlocks != 0 ? kBlocks : num_blocks;
  const size_t bytes = group_bytes(nb);
  const __m256i cutv = _mm256_set1_epi16(static_cast<short>(cut));
  // Pair tables once per call (kept in registers or L1 across groups). Precondition:
  // nb <= 64 (scan_lut16_avx512 sends wider indexes elsewhere).
  constexpr size_t kStack = kBlocks != 0 ? (kBlocks + 1) / 2 : 32;
  __m512i tables[kStack];
  auto row = [lut](size_t b) {  // LUT row b in both lanes of 256 bits
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + b * 16)));
  };
  for (size_t p = 0; p < (nb + 1) / 2; ++p) {
    const __m256i hi = 2 * p + 1 < nb ? row(2 * p + 1) : _mm256_setzero_si256();
    tables[p] = _mm512_inserti64x4(_mm512_castsi256_si512(row(2 * p)), hi, 1);
  }
  for (size_t g = 0; g < groups; ++g) {
    scan_group<kBlocks>(packed + g * bytes, nb, tables, cutv, sums + g * kGroup, masks + g);
  }
}

// Several queries over the same groups (the multi-query scan, lut16.h). Per group, each
// 512-bit register of codes (two blocks, as scan_group reads them) is loaded and split
// into its low and high nibbles once, four registers at a time; then every query looks
// the four up in its own tables, read from the doubled layout (query t's register p:
// blocks 2p and 2p + 1, 64 bytes at luts[t] + 64p), and sums them in 8 bits (<= 4 * 63)
// before widening into its four accumulators. Per query the arithmetic is scan_group's,
// so are the sums. Registers at kT = 4: 8 split codes and 16 accumulators.
// lookups_multi: kU (1..4) registers starting at p, for each of the kT queries.
template <size_t kT, size_t kU>
inline void lookups_multi(const __m512i* const* tables, size_t p, const __m512i* lo, const __m512i* hi,
                          __m512i (&la)[kT], __m512i (&lod)[kT], __m512i (&ha)[kT], __m512i (&hod)[kT]) {
  for (size_t t = 0; t < kT; ++t) {
    __m512i tb = _mm512_loadu_si512(tables[t] + p);
    __m512i l = _mm512_shuffle_epi8(tb, lo[0]), h = _mm512_shuffle_epi8(tb, hi[0]);
    for (size_t v = 1; v < kU; ++v) {
      tb = _mm512_loadu_si512(tables[t] + p + v);
      l = _mm512_add_epi8(l, _mm512_shuffle_epi8(tb, lo[v]));
      h = _mm512_add_epi8(h, _mm512_shuffle_epi8(tb, hi[v]));
    }
    la[t] = _mm512_add_epi16(la[t], l);
    lod[t] = _mm512_add_epi16(lod[t], _mm512_srli_epi16(l, 8));
    ha[t] = _mm512_add_epi16(ha[t], h);
    hod[t] = _mm512_add_epi16(hod[t], _mm512_srli_epi16(h, 8));
  }
}

template <size_t kBlocks, size_t kT>
void scan_multi_impl(const uint8_t* packed, size_t groups, size_t num_blocks,
                     const uint8_t* const* luts, const uint16_t* cuts, uint16_t* const* sums,
                     uint64_t* const* masks) {
  const size_t nb = kBlocks != 0 ? kBlocks : num_blocks;
  const size_t pairs = nb / 2, regs = pairs + nb % 2, bytes = group_bytes(nb);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i* tables[kT];
  for (size_t t = 0; t < kT; ++t) tables[t] = reinterpret_cast<const __m512i*>(luts[t]);
  for (size_t g = 0; g < groups; ++g) {
    const uint8_t* gp = packed + g * bytes;
    __m512i la[kT], lod[kT], ha[kT], hod[kT];
    for (size_t t = 0; t < kT; ++t) la[t] = lod[t] = ha[t] = hod[t] = _mm512_setzero_si512();
    auto split = [&](size_t r, __m512i& lo, __m512i& hi) {
      const __m512i c = r < pairs ? _mm512_loadu_si512(gp + r * 64)
                                  : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp + r * 64)));
      lo = _mm512_and_si512(c, low4);
      hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
    };
    size_t p = 0;
    for (; p + 4 <= regs; p += 4) {
      __m512i lo[4], hi[4];
      for (size_t v = 0; v < 4; ++v) split(p + v, lo[v], hi[v]);
      lookups_multi<kT, 4>(tables, p, lo, hi, la, lod, ha, hod);
    }
    __m512i lo[3], hi[3];
    switch (regs - p) {
      case 3:
        for (size_t v = 0; v < 3; ++v) split(p + v, lo[v], hi[v]);
        lookups_multi<kT, 3>(tables, p, lo, hi, la, lod, ha, hod);
        break;
      case 2:
        for (size_t v = 0; v < 2; ++v) split(p + v, lo[v], hi[v]);
        lookups_multi<kT, 2>(tables, p, lo, hi, la, lod, ha, hod);
        break;
      case 1:
        split(p, lo[0], hi[0]);
        lookups_multi<kT, 1>(tables, p, lo, hi, la, lod, ha, hod);
        break;
      default:
        break;
    }
    for (size_t t = 0; t < kT; ++t) {
      masks[t][g] = group_mask(finish_group(fold_lanes(la[t]), fold_lanes(lod[t]), fold_lanes(ha[t]), fold_lanes(hod[t]), sums[t] + g * kGroup),
                               _mm256_set1_epi16(static_cast<short>(cuts[t])));
    }
  }
}

template <size_t kBlocks>
void scan_multi_blocks(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                       const uint8_t* const* luts, const uint16_t* cuts, uint16_t* const* sums,
                       uint64_t* const* masks) {
  switch (nq) {
    case 1: return scan_multi_impl<kBlocks, 1>(packed, groups, num_blocks, luts, cuts, sums, masks);
    case 2: return scan_multi_impl<kBlocks, 2>(packed, groups, num_blocks, luts, cuts, sums, masks);
    case 3: return scan_multi_impl<kBlocks, 3>(packed, groups, num_blocks, luts, cuts, sums, masks);
    default: return scan_multi_impl<kBlocks, 4>(packed, groups, num_blocks, luts, cuts, sums, masks);
  }
}

}  // namespace

void scan_lut16_multi_avx512(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                             const uint8_t* const* luts, const uint16_t* cuts,
                             uint16_t* const* sums, uint64_t* const* masks) {
  switch (num_blocks) {
    case 16: return scan_multi_blocks<16>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 25: return scan_multi_blocks<25>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 32: return scan_multi_blocks<32>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 50: return scan_multi_blocks<50>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 64: return scan_multi_blocks<64>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    default: return scan_multi_blocks<0>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
  }
}

void scan_lut16_avx512(const uint8_t* packed, size_t groups, size_t num_blocks,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  switch (num_blocks) {
    case 4: return scan_impl<4>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 8: return scan_impl<8>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 16: return scan_impl<16>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 17: return scan_impl<17>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 24: return scan_impl<24>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 25: return scan_impl<25>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 32: return scan_impl<32>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 48: return scan_impl<48>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 50: return scan_impl<50>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 64: return scan_impl<64>(packed, groups, num_blocks, lut, cut, sums, masks);
    default: break;
  }
  if (num_blocks <= 64) return scan_impl<0>(packed, groups, num_blocks, lut, cut, sums, masks);
  // More than 64 blocks: the AVX2 kernel's scheme needs no LUT table; these widths are
  // rare (d > 128 at 2 dims per block), so they take the 256-bit kernel.
  scan_lut16_avx2(packed, groups, num_blocks, lut, cut, sums, masks);
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
