// k-means assignment scores (the tree's training), in the core rather than BLAS: a block of
// rows against every centroid, s[r * L + j] = x_r . c_j as a float32 sum in dimension order
// (acc = acc + x[k] * c[k], no contraction), so that every SIMD level, and every machine,
// gives the same sums bit for bit (a BLAS product's order depends on the library and the
// CPU). Vectorised across centroids (ct holds them transposed, d x L): the portable loop
// in assign.cpp, register tiles in assign_avx2.cpp and assign_avx512.cpp. In the core,
// too, the build's threads do not compete with BLAS's, which spin on a core for about
// 0.1 s after each multi-threaded call.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

// s (nr x L) = the rows x (nr x d) against the centroids ct (d x L, transposed).
using RowScoresFn = void (*)(const float* x, size_t nr, size_t d, const float* ct, size_t L,
                             float* s);
void row_scores_scalar(const float* x, size_t nr, size_t d, const float* ct, size_t L, float* s);
void row_scores_avx2(const float* x, size_t nr, size_t d, const float* ct, size_t L, float* s);
void row_scores_avx512(const float* x, size_t nr, size_t d, const float* ct, size_t L, float* s);
}  // namespace mipscan
