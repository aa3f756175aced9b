// k-means assignment (the tree's training), in the core rather than BLAS: rows against
// every centroid, each score x_r . c_j summed in dimension order from 0, less h[j].
// The AVX2 and AVX-512 kernels take each step as a fused multiply-add (register tiles in
// assign_avx2.cpp and assign_avx512.cpp; the same bits at both levels), the portable loop
// in assign.cpp as a float32 multiply, then add (a CPU without AVX2 may lack FMA, and
// emulating it would cost far more than the product), into a block of scores for
// argmax_shifted; the vector kernels keep each row's best in registers instead. The two can differ in the last bit
// and so, rarely, in a label (as BLAS's products differed from one CPU to another).
// Vectorised across centroids (ct holds them transposed, d x L). In the core, the build's
// threads do not compete with BLAS's, which spin on a core for about 0.1 s after each
// multi-threaded call.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

// out[r] = the nearest centroid of row r of x (nr x d): the first j maximising
// x_r . c_j - h[j], the centroids transposed in ct (d x L); NaN as argmax_shifted (lut16.h).
using NearestRowsFn = void (*)(const float* x, size_t nr, size_t d, const float* ct,
                               const float* h, size_t L, int64_t* out);
void nearest_rows_scalar(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                         size_t L, int64_t* out);
void nearest_rows_avx2(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                       size_t L, int64_t* out);
void nearest_rows_avx512(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                         size_t L, int64_t* out);
// A row's answer from its scores summed with fused multiply-adds in dimension order (the
// AVX2 and AVX-512 kernels' sums: fma rounds once, whether the CPU or the library does it),
// NaN as argmax_shifted: those kernels' slow path for a row with a NaN score.
void nearest_row_fused(const float* xr, size_t d, const float* ct, const float* h, size_t L,
                       int64_t* out);
}  // namespace mipscan
