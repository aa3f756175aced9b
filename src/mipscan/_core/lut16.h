// LUT16 asymmetric-hashing scan: packed 4-bit codes scored against a per-query table.
//
// Codes. A datapoint's residual is cut into num_blocks blocks, each encoded as one of 16
// codewords (4 bits). Before packing, codes are one byte per (point, block), row-major:
// codes[i * num_blocks + b] in [0, 16).
//
// Packed layout (what makes one vpshufb score 64 lookups). Points are taken in groups of
// kGroup = 64. A group occupies num_blocks * 32 bytes: for each block b, 32 bytes where
//   byte j      (j < 16) holds point j      in its low nibble and point j + 16 in its high,
//   byte 16 + j (j < 16) holds point 32 + j in its low nibble and point 48 + j in its high.
// So one 32-byte AVX2 register holds one block of the whole group: lane 0 points 0-31,
// lane 1 points 32-63, and a LUT row broadcast to both lanes scores all 64 with two
// shuffles (low nibbles, high nibbles). Points past n in the last group have code 0.
//   packed size = ceil(n / 64) * num_blocks * 32 bytes.
//
// LUT. lut[b * 16 + c] is the quantized (uint8) contribution of codeword c of block b,
// num_blocks rows. Callers keep every entry <= lut_cap(num_blocks) = min(63,
// floor(65535 / num_blocks)): 63 lets the SIMD kernels add the lookups of four blocks in
// 8-bit lanes before widening (<= 252), and the second bound keeps a point's sum over
// blocks within 16 bits, so the uint16 accumulators never overflow and the scalar and
// SIMD kernels return identical sums. (63 rather than 127 halves the widening work; the
// coarser LUT moved recall@10 by at most 0.0004 on GloVe-50 and the seed candidates.)
//
// Bound on num_blocks: the quantized scan needs lut_cap >= 1, i.e. num_blocks <=
// kMaxLut16Blocks = 65535. Above it an entry would have to be 0 (every sum 0, the scale
// infinite), so the searcher scores such indexes exactly in float instead (search.cpp,
// scan_leaf_ah_exact; slow, but never garbage), and the Python builder refuses them.

// Output. sums[g * 64 + j] = sum over b of lut[b * 16 + code(point 64g + j, block b)], and
// bit j of masks[g] is set iff sums[g * 64 + j] >= cut (so the caller visits only the
// points that can still enter its top-k; padding points past n may be flagged too).
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

constexpr size_t kGroup = 64;
inline size_t group_bytes(size_t num_blocks) { return num_blocks * 32; }
inline size_t num_groups(size_t n) { return (n + kGroup - 1) / kGroup; }
constexpr size_t kMaxLut16Blocks = 65535;
// Largest LUT entry for num_blocks blocks (see "LUT" above); 0 when num_blocks > 65535.
inline unsigned lut_cap(size_t num_blocks) {
  const size_t c = 65535 / (num_blocks > 0 ? num_blocks : 1);
  return static_cast<unsigned>(c < 63 ? c : 63);
}
// Byte offset within a block's 32 bytes, and nibble, of point j (< 64) of a group.
inline size_t byte_of(size_t j) { return (j / 32) * 16 + (j % 16); }
inline bool high_nibble(size_t j) { return (j % 32) >= 16; }
// The code of point j (< 64) of a group for block b.
inline uint8_t code_at(const uint8_t* group, size_t b, size_t j) {
  const uint8_t byte = group[b * 32 + byte_of(j)];
  return high_nibble(j) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0x0F);
}

// codes: n * num_blocks bytes (values < 16); packed: num_groups(n) * group_bytes bytes.
void pack_codes(const uint8_t* codes, size_t n, size_t num_blocks, uint8_t* packed);
// Inverse of pack_codes (for tests and inspection).
void unpack_codes(const uint8_t* packed, size_t n, size_t num_blocks, uint8_t* codes);

// The scan, one kernel per ISA, same signature, same result bit for bit.
// packed: groups * num_blocks * 32 bytes; lut: num_blocks * 16 bytes; sums: groups * 64;
// masks: groups.
using ScanLut16Fn = void (*)(const uint8_t* packed, size_t groups, size_t num_blocks,
                             const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks);
void scan_lut16_scalar(const uint8_t* packed, size_t groups, size_t num_blocks,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks);
#if MIPSCAN_HAVE_AVX2
void scan_lut16_avx2(const uint8_t* packed, size_t groups, size_t num_blocks,
                     const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks);
#endif
#if MIPSCAN_HAVE_AVX512
// Two groups per 512-bit register (group g in the low 256 bits, g + 1 in the high).
void scan_lut16_avx512(const uint8_t* packed, size_t groups, size_t num_blocks,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks);
// The same with GFNI (the high nibbles split off by one affine byte map, not a shift and
// an AND; cpu.cpp chooses it at the AVX-512 level on CPUs that have GFNI).
void scan_lut16_avx512_gfni(const uint8_t* packed, size_t groups, size_t num_blocks,
                            const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks);
#endif

// Several queries over the same codes (search_batch's leaf-by-leaf scan): the codes of
// each block are loaded and split into nibbles once for up to kMultiQueries queries, and
// query t's sums and masks are exactly scan_lut16's with luts[t] and cuts[t].
// The LUTs come in the doubled layout (lut16_double): row b at bytes [32b, 32b + 16) and
// again at [32b + 16, 32b + 32), num_blocks rounded up to even, the padding row zero;
// that is the 256-bit register the AVX2 kernel broadcasts per block, and two blocks of it
// the AVX-512 kernel's 512-bit table, so neither rebuilds its tables per call.
// luts: nq pointers to lut16_double_bytes(num_blocks) bytes; sums: nq pointers to groups
// * 64; masks: nq pointers to groups. 1 <= nq <= kMultiQueries.
constexpr size_t kMultiQueries = 4;
inline size_t lut16_double_bytes(size_t num_blocks) { return (num_blocks + 1) / 2 * 64; }
// out (lut16_double_bytes(num_blocks)) = lut (num_blocks * 16) in the doubled layout.
void lut16_double(const uint8_t* lut, size_t num_blocks, uint8_t* out);
using ScanLut16MultiFn = void (*)(const uint8_t* packed, size_t groups, size_t num_blocks,
                                  size_t nq, const uint8_t* const* luts, const uint16_t* cuts,
                                  uint16_t* const* sums, uint64_t* const* masks);
void scan_lut16_multi_scalar(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                             const uint8_t* const* luts, const uint16_t* cuts,
                             uint16_t* const* sums, uint64_t* const* masks);
#if MIPSCAN_HAVE_AVX2
void scan_lut16_multi_avx2(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                           const uint8_t* const* luts, const uint16_t* cuts,
                           uint16_t* const* sums, uint64_t* const* masks);
#endif
#if MIPSCAN_HAVE_AVX512
void scan_lut16_multi_avx512(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                             const uint8_t* const* luts, const uint16_t* cuts,
                             uint16_t* const* sums, uint64_t* const* masks);
void scan_lut16_multi_avx512_gfni(const uint8_t* packed, size_t groups, size_t num_blocks,
                                  size_t nq, const uint8_t* const* luts, const uint16_t* cuts,
                                  uint16_t* const* sums, uint64_t* const* masks);
#endif

// k-means assignment step: out[i] = the first j < k maximising s[i * k + j] - h[j] (float
// subtraction), or the first j where that is NaN: numpy's argmax(s - h, axis=1), without
// writing s - h. s: m * k scores (rows . centroids), h: k half squared norms.
using ArgmaxShiftedFn = void (*)(const float* s, size_t m, size_t k, const float* h, int64_t* out);
void argmax_shifted_scalar(const float* s, size_t m, size_t k, const float* h, int64_t* out);
#if MIPSCAN_HAVE_AVX512
void argmax_shifted_avx512(const float* s, size_t m, size_t k, const float* h, int64_t* out);
#endif

// Float inner product, also one kernel per ISA with identical results: eight running
// sums (lane j % 8 takes a[j] * b[j], multiply then add, never fused), reduced as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
using DotFn = float (*)(const float* a, const float* b, size_t d);
float dot_scalar(const float* a, const float* b, size_t d);
#if MIPSCAN_HAVE_AVX2
float dot_avx2(const float* a, const float* b, size_t d);
#endif
#if MIPSCAN_HAVE_AVX512
float dot_avx512(const float* a, const float* b, size_t d);
#endif

// out[t] = dot(q, rows + ids[t] * d, d) for t < m: one query against scattered rows (the
// reorder's candidates), each result exactly as the level's dot kernel computes it. (The
// AVX2 version scores four rows at a time: four independent chains sharing the loads of
// q, instead of one latency-bound chain per row.)
using DotRowsFn = void (*)(const float* q, const float* rows, size_t d, const uint32_t* ids,
                           size_t m, float* out);
void dot_rows_scalar(const float* q, const float* rows, size_t d, const uint32_t* ids, size_t m,
                     float* out);
#if MIPSCAN_HAVE_AVX2
void dot_rows_avx2(const float* q, const float* rows, size_t d, const uint32_t* ids, size_t m,
                   float* out);
#endif

// out[i * m + r] = dot(qs + i * d, rows + r * d, d) for i < nq, r < m: many queries
// against many rows (the centroids), each result exactly as the dot kernel computes it.
// (The AVX2 version scores four queries against two rows at a time, sharing the loads,
// and streams the rows once per four queries; the AVX-512 one four queries against four.)
using DotsFn = void (*)(const float* qs, size_t nq, const float* rows, size_t m, size_t d,
                        float* out);
void dots_scalar(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out);
#if MIPSCAN_HAVE_AVX2
void dots_avx2(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out);
#endif
#if MIPSCAN_HAVE_AVX512
// Two rows per 512-bit accumulator (lanes 0-7 one row's eight spec lanes, 8-15 the
// next row's): 16-lane sums would reassociate, so the spec's 8 lanes are kept per row.
void dots_avx512(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out);
#endif

}  // namespace mipscan
