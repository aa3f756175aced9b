// The AH encoder's and codebook trainer's inner steps for two dimensions per block (the
// common case), vectorised per SIMD level (cpu.h's table; null where encode.cpp's own SSE2
// or portable loops serve). Bit for bit the results of those loops.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

// The anisotropic codes of np <= kEncodeBatch points (encode.cpp, encode_batch, two
// dimensions per block): point p's residual and direction at r / dir + p * 2 * num_blocks,
// w[p] = its eta - 1, its codes to codes + p * num_blocks; books_t, each block's codewords
// transposed (the 16 first dimensions, then the 16 second ones); err_sq / err_par,
// np * 16 * num_blocks floats of scratch.
using Encode2Fn = void (*)(size_t np, const float* r, const float* dir, const float* w,
                           size_t num_blocks, const float* books_t, int max_iterations,
                           float* err_sq, float* err_par, uint8_t* codes);
// The assignment step of a block's codebook training: each of the m points of xb (2 floats
// each) to its nearest of the 16 codewords bt (transposed), added into sums (16 x 2,
// float64) and counts (16).
using Nearest2Fn = void (*)(const float* xb, size_t m, const float* bt, double* sums,
                            size_t* counts);

void encode2_avx512(size_t np, const float* r, const float* dir, const float* w,
                    size_t num_blocks, const float* books_t, int max_iterations, float* err_sq,
                    float* err_par, uint8_t* codes);
void nearest2_avx512(const float* xb, size_t m, const float* bt, double* sums, size_t* counts);

}  // namespace mipscan
