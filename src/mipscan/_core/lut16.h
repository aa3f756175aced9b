// LUT16 asymmetric-hashing scan: packed 4-bit codes scored against a per-query table.
//
// Codes. A datapoint's residual is cut into num_blocks blocks, each encoded as one of 16
// codewords (4 bits). Before packing, codes are one byte per (point, block), row-major:
// codes[i * num_blocks + b] in [0, 16).
//
// Packed layout (what makes one vpshufb score 32 points). Points are taken in groups of
// 32; the number of blocks is padded to an even number nbp = num_blocks + (num_blocks & 1)
// (the padding block has code 0 and a LUT row of zeros). A group occupies nbp * 16 bytes:
// for each block b, 16 bytes where byte j holds the code of point j in its low nibble and
// the code of point j + 16 in its high nibble. Points past n in the last group have code 0.
//   packed size = ceil(n / 32) * nbp * 16 bytes.
// Two consecutive blocks (b, b + 1) thus fill one 32-byte AVX2 register: lane 0 holds
// block b and lane 1 block b + 1, matching a LUT register whose lanes are LUT rows b, b + 1.
//
// LUT. lut[b * 16 + c] is the quantized (uint8) contribution of codeword c of block b,
// nbp rows. Callers keep every entry <= min(127, floor(65535 / nbp)): 127 lets the AVX2
// kernel add the lookups of two block pairs in 8-bit lanes before widening (<= 254), and
// the second bound keeps the sum over blocks of one point within 16 bits, so the uint16
// accumulators never overflow and the scalar and AVX2 kernels return identical sums.
//
// Output. sums[g * 32 + j] = sum over b of lut[b * 16 + code(point 32g + j, block b)], and
// bit j of masks[g] is set iff sums[g * 32 + j] >= cut (so the caller visits only the
// points that can still enter its top-k; padding points past n may be flagged too).
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

inline size_t padded_blocks(size_t num_blocks) { return num_blocks + (num_blocks & 1); }
inline size_t packed_group_bytes(size_t num_blocks) { return padded_blocks(num_blocks) * 16; }

// codes: n * num_blocks bytes (values < 16); packed: ceil(n/32) * packed_group_bytes bytes.
void pack_codes(const uint8_t* codes, size_t n, size_t num_blocks, uint8_t* packed);
// Inverse of pack_codes (for tests and inspection).
void unpack_codes(const uint8_t* packed, size_t n, size_t num_blocks, uint8_t* codes);

// The scan, one kernel per ISA, same signature, same result bit for bit.
// packed: num_groups * nbp * 16 bytes; lut: nbp * 16 bytes; sums: num_groups * 32;
// masks: num_groups.
using ScanLut16Fn = void (*)(const uint8_t* packed, size_t num_groups, size_t nbp,
                             const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks);
void scan_lut16_scalar(const uint8_t* packed, size_t num_groups, size_t nbp,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks);
#if MIPSCAN_HAVE_AVX2
void scan_lut16_avx2(const uint8_t* packed, size_t num_groups, size_t nbp,
                     const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks);
#endif

// Float inner product, also one kernel per ISA with identical results: eight running
// sums (lane j % 8 takes a[j] * b[j], multiply then add, never fused), reduced as
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
using DotFn = float (*)(const float* a, const float* b, size_t d);
float dot_scalar(const float* a, const float* b, size_t d);
#if MIPSCAN_HAVE_AVX2
float dot_avx2(const float* a, const float* b, size_t d);
#endif

}  // namespace mipscan
