// The AVX-512 LUT16 scans (one query, several queries), shared by lut16_avx512.cpp and
// lut16_avx512_gfni.cpp: one template per kernel, kGfni choosing how the high nibbles
// are split off (high_nibbles). Everything here has internal linkage: the two files are
// built with different flags (-mgfni in the second), and one inline symbol would be a
// single copy for both (topk_columns.h).
//
// Same packed layout and same integer results as the scalar kernels (lut16.h).
// VBMI is not used: its byte permutes (vpermb) would only replace the final word
// permutes, which run once per group, not once per block.
#pragma once
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

// The high nibble of every byte, in the low four bits (the lookups' indexes). With GFNI
// one affine map over GF(2) per byte (output bit i = input bit i + 4 for i < 4, else 0):
// one instruction, on the port the shuffles do not use, instead of a shift and an AND.
template <bool kGfni>
inline __m512i high_nibbles(__m512i c, __m512i low4) {
  if constexpr (kGfni) {
    return _mm512_gf2p8affine_epi64_epi8(c, _mm512_set1_epi64(0x1020408000000000LL), 0);
  } else {
    return _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
  }
}

// One group, two blocks per register: a group's blocks b and b + 1 are 64 contiguous
// bytes, so one 512-bit load holds block b in 128-bit lanes 0-1 and block b + 1 in lanes
// 2-3, and tables[p] holds LUT row 2p in lanes 0-1 and row 2p + 1 in lanes 2-3 (zeros
// past the last block). No inserts, and a leaf's odd last group costs one group's work.
// Folding lanes 2-3 onto 0-1 at the end gives the AVX2 kernel's accumulators exactly, and
// its finish. kBlocks as in the AVX2 kernel (0: read num_blocks).
template <size_t kBlocks, bool kGfni>
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
    hi = _mm512_shuffle_epi8(tables[p], high_nibbles<kGfni>(c, low4));
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

template <size_t kBlocks, bool kGfni>
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
    scan_group<kBlocks, kGfni>(packed + g * bytes, nb, tables, cutv, sums + g * kGroup, masks + g);
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

template <size_t kBlocks, size_t kT, bool kGfni>
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
      hi = high_nibbles<kGfni>(c, low4);
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

template <size_t kBlocks, bool kGfni>
void scan_multi_blocks(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                       const uint8_t* const* luts, const uint16_t* cuts, uint16_t* const* sums,
                       uint64_t* const* masks) {
  switch (nq) {
    case 1: return scan_multi_impl<kBlocks, 1, kGfni>(packed, groups, num_blocks, luts, cuts, sums, masks);
    case 2: return scan_multi_impl<kBlocks, 2, kGfni>(packed, groups, num_blocks, luts, cuts, sums, masks);
    case 3: return scan_multi_impl<kBlocks, 3, kGfni>(packed, groups, num_blocks, luts, cuts, sums, masks);
    default: return scan_multi_impl<kBlocks, 4, kGfni>(packed, groups, num_blocks, luts, cuts, sums, masks);
  }
}

template <bool kGfni>
void scan_lut16_multi_avx512_t(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                               const uint8_t* const* luts, const uint16_t* cuts,
                               uint16_t* const* sums, uint64_t* const* masks) {
  switch (num_blocks) {
    case 16: return scan_multi_blocks<16, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 25: return scan_multi_blocks<25, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 32: return scan_multi_blocks<32, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 50: return scan_multi_blocks<50, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    case 64: return scan_multi_blocks<64, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
    default: return scan_multi_blocks<0, kGfni>(packed, groups, num_blocks, nq, luts, cuts, sums, masks);
  }
}

template <bool kGfni>
void scan_lut16_avx512_t(const uint8_t* packed, size_t groups, size_t num_blocks,
                         const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  switch (num_blocks) {
    case 4: return scan_impl<4, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 8: return scan_impl<8, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 16: return scan_impl<16, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 17: return scan_impl<17, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 24: return scan_impl<24, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 25: return scan_impl<25, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 32: return scan_impl<32, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 48: return scan_impl<48, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 50: return scan_impl<50, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    case 64: return scan_impl<64, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
    default: break;
  }
  if (num_blocks <= 64) return scan_impl<0, kGfni>(packed, groups, num_blocks, lut, cut, sums, masks);
  // More than 64 blocks: the AVX2 kernel's scheme needs no LUT table; these widths are
  // rare (d > 128 at 2 dims per block), so they take the 256-bit kernel.
  scan_lut16_avx2(packed, groups, num_blocks, lut, cut, sums, masks);
}

}  // namespace
}  // namespace mipscan
