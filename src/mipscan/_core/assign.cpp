#include "assign.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "cpu.h"
#include "lut16.h"
#include "parallel.h"
#include "search.h"

namespace mipscan {

namespace {

// kRows rows at a time share each load of the centroids; the j loop vectorises with no
// reassociation (each lane is one centroid's own sum).
template <size_t kRows>
inline void row_scores_rows(const float* __restrict x, size_t d, const float* __restrict ct,
                            size_t L, float* __restrict s) {
  for (size_t r = 0; r < kRows; ++r)
    for (size_t j = 0; j < L; ++j) s[r * L + j] = 0.f;
  for (size_t k = 0; k < d; ++k) {
    const float* __restrict c = ct + k * L;
    float xv[kRows];
    for (size_t r = 0; r < kRows; ++r) xv[r] = x[r * d + k];
    for (size_t r = 0; r < kRows; ++r) {
      float* __restrict sr = s + r * L;
      const float v = xv[r];
      for (size_t j = 0; j < L; ++j) sr[j] = sr[j] + v * c[j];
    }
  }
}

inline void row_scores_generic(const float* x, size_t nr, size_t d, const float* ct, size_t L,
                               float* s) {
  size_t r = 0;
  for (; r + 4 <= nr; r += 4) row_scores_rows<4>(x + r * d, d, ct, L, s + r * L);
  for (; r < nr; ++r) row_scores_rows<1>(x + r * d, d, ct, L, s + r * L);
}

}  // namespace

void nearest_rows_scalar(const float* x, size_t nr, size_t d, const float* ct, const float* h,
                         size_t L, int64_t* out) {
  // Blocks of rows whose scores (block x L floats, at most 64 KiB) stay in cache.
  const size_t block = std::max<size_t>(1, std::min<size_t>(64, (size_t{1} << 14) / std::max<size_t>(L, 1)));
  std::vector<float> s(block * L);
  for (size_t i = 0; i < nr; i += block) {
    const size_t n = std::min(block, nr - i);
    row_scores_generic(x + i * d, n, d, ct, L, s.data());
    argmax_shifted_scalar(s.data(), n, L, h, out + i);
  }
}

void nearest_row_fused(const float* xr, size_t d, const float* ct, const float* h, size_t L,
                       int64_t* out) {
  std::vector<float> s(L);
  for (size_t c = 0; c < L; ++c) {
    float acc = 0.f;
    for (size_t k = 0; k < d; ++k) acc = std::fma(xr[k], ct[k * L + c], acc);
    s[c] = acc;
  }
  argmax_shifted_scalar(s.data(), 1, L, h, out);
}

void nearest_centroids(const Kernels& kn, const float* x, size_t n, size_t d, const float* ct,
                       const float* h, size_t L, int num_threads, int64_t* out) {
  parallel_for(n, num_threads, 2048, [&](size_t begin, size_t end, int) {
    kn.nearest_rows(x + begin * d, end - begin, d, ct, h, L, out + begin);
  });
}

}  // namespace mipscan
