// Exact scoring against quantized rows (reorder(quantize=...), score_brute_force(quantize=...)
// and tree(quantize_centroids=True)): a float32 query times an int8 or bfloat16 row.
//
// Row formats (row-major, d values per row; the Python layer writes them, _build.py):
//   int8:  r[j] in [-127, 127]; the row's value is scale[j] * r[j], with one float32
//          scale > 0 per dimension (max |x[:, j]| / 127 over the data). The scales are not
//          the kernel's business: the caller folds them into the query once per query,
//          q'[j] = q[j] * scale[j] (fold_scales), and scores dot(q', r).
//   bf16:  r[j] is the upper 16 bits of a float32 (rounded to nearest even when written);
//          its value is the float32 with those bits and a zero lower half.
//
// Summation (the specification; every ISA returns the same float bit for bit): sixteen
// running sums, lane j % 16 taking a[j] * float(b[j]) (multiply, then add: never fused),
// reduced as s[i] = l[i] + l[i + 8] for i < 8, then
// ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). Sixteen lanes so that one AVX-512
// register (or two AVX2 ones) holds them all; int8 and bf16 widen to float exactly.
//
// Preconditions: a and b hold d values; any d >= 0. No alignment required.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

using DotI8Fn = float (*)(const float* a, const int8_t* b, size_t d);
using DotBf16Fn = float (*)(const float* a, const uint16_t* b, size_t d);

float dot_i8_scalar(const float* a, const int8_t* b, size_t d);
float dot_bf16_scalar(const float* a, const uint16_t* b, size_t d);
#if MIPSCAN_HAVE_AVX2
float dot_i8_avx2(const float* a, const int8_t* b, size_t d);
float dot_bf16_avx2(const float* a, const uint16_t* b, size_t d);
#endif
#if MIPSCAN_HAVE_AVX512
float dot_i8_avx512(const float* a, const int8_t* b, size_t d);
float dot_bf16_avx512(const float* a, const uint16_t* b, size_t d);
#endif

// The float value of a bfloat16 (exact).
float bf16_to_float(uint16_t v);

// out[j] = q[j] * scale[j] for j < d (plain multiplies: the same at every level).
void fold_scales(const float* q, const float* scale, size_t d, float* out);

// The sixteen-lane reduction of the specification above.
inline float reduce16(const float* l) {
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = l[i] + l[i + 8];
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

}  // namespace mipscan
