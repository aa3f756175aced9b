// AVX-512 (F) steps of the AH encoder and codebook training for two dimensions per block
// (encode.cpp), reached only through cpu.cpp's dispatch table: a block's 16 codewords fill
// one register where the SSE2 forms use four. The same float operations in the same order
// (no contraction: the build passes -ffp-contract=off), and the same first-minimum rule,
// as the SSE2 and portable loops, so the codes and codebooks are bit for bit theirs.
#include "avx512_intrin.h"

#include "encode.h"
#include "encode_descent.h"
#include "portable.h"

namespace mipscan {

namespace {

// The first of 16 floats holding their minimum, `none` when none does (all NaN): the SSE2
// form's min tree on the four 128-bit groups, min(min(g0, g1), min(g2, g3)) and then within
// the group, with the same operand order, so that NaNs resolve as there too.
inline unsigned first_min_index16(__m512 v, unsigned none) {
  const __m512 pair = _mm512_min_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m512 mn = _mm512_min_ps(pair, _mm512_shuffle_f32x4(pair, pair, _MM_SHUFFLE(1, 0, 3, 2)));
  mn = _mm512_min_ps(mn, _mm512_shuffle_ps(mn, mn, 0x4E));
  mn = _mm512_min_ps(mn, _mm512_shuffle_ps(mn, mn, 0xB1));
  mn = _mm512_shuffle_f32x4(mn, mn, 0);  // group 0 in every group
  const unsigned hits = _mm512_cmp_ps_mask(v, mn, _CMP_EQ_OQ);
  return hits != 0 ? ctz32(hits) : none;
}

}  // namespace

void encode2_avx512(size_t np, const float* r, const float* dir, const float* w,
                    size_t num_blocks, const float* books_t, int max_iterations, float* err_sq,
                    float* err_par, uint8_t* codes) {
  const size_t errs = 16 * num_blocks;
  for (size_t p = 0; p < np; ++p) {
    const float* rp = r + p * 2 * num_blocks;
    const float* dp = dir + p * 2 * num_blocks;
    for (size_t b = 0; b < num_blocks; ++b) {
      const __m512 e0 = _mm512_sub_ps(_mm512_set1_ps(rp[2 * b]), _mm512_loadu_ps(books_t + 32 * b));
      const __m512 e1 =
          _mm512_sub_ps(_mm512_set1_ps(rp[2 * b + 1]), _mm512_loadu_ps(books_t + 32 * b + 16));
      const __m512 sq = _mm512_add_ps(_mm512_mul_ps(e0, e0), _mm512_mul_ps(e1, e1));
      _mm512_storeu_ps(err_sq + p * errs + 16 * b, sq);
      _mm512_storeu_ps(err_par + p * errs + 16 * b,
                       _mm512_add_ps(_mm512_mul_ps(e0, _mm512_set1_ps(dp[2 * b])),
                                     _mm512_mul_ps(e1, _mm512_set1_ps(dp[2 * b + 1]))));
      codes[p * num_blocks + b] = static_cast<uint8_t>(first_min_index16(sq, 0));
    }
  }
  descend_points(np, num_blocks, max_iterations, w, err_par, codes,
                 [&](size_t p, size_t b, float rest, uint8_t cur) -> uint8_t {
    const __m512 pv = _mm512_add_ps(_mm512_set1_ps(rest), _mm512_loadu_ps(err_par + p * errs + 16 * b));
    const __m512 loss = _mm512_add_ps(_mm512_loadu_ps(err_sq + p * errs + 16 * b),
                                      _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(w[p]), pv), pv));
    return static_cast<uint8_t>(first_min_index16(loss, cur));
  });
}

void nearest2_avx512(const float* xb, size_t m, const float* bt, double* sums, size_t* counts) {
  const __m512 b0 = _mm512_loadu_ps(bt), b1 = _mm512_loadu_ps(bt + 16);
  for (size_t i = 0; i < m; ++i) {
    const __m512 e0 = _mm512_sub_ps(_mm512_set1_ps(xb[2 * i]), b0);
    const __m512 e1 = _mm512_sub_ps(_mm512_set1_ps(xb[2 * i + 1]), b1);
    const unsigned arg = first_min_index16(_mm512_add_ps(_mm512_mul_ps(e0, e0), _mm512_mul_ps(e1, e1)), 0);
    ++counts[arg];
    sums[2 * arg] += xb[2 * i];
    sums[2 * arg + 1] += xb[2 * i + 1];
  }
}

}  // namespace mipscan
