#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "parallel.h"
#include "portable.h"
#include "search.h"

namespace mipscan {

namespace {

#if defined(__SSE2__)
// The first index holding the minimum of 16 floats in four registers, from a min tree
// and the compare masks: the answer of a strict-< scan, without a branch per value.
// `none` is returned when no value is a minimum (all NaN), as such a scan would keep it.
inline unsigned first_min_index(const __m128 v[4], unsigned none) {
  __m128 mn = _mm_min_ps(_mm_min_ps(v[0], v[1]), _mm_min_ps(v[2], v[3]));
  mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, 0x4E));
  mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, 0xB1));
  unsigned hits = 0;
  for (int k = 0; k < 4; ++k)
    hits |= static_cast<unsigned>(_mm_movemask_ps(_mm_cmpeq_ps(v[k], mn))) << (4 * k);
  return hits != 0 ? ctz32(hits) : none;
}
#endif

}  // namespace

void encode_anisotropic(const float* residuals, const float* rows, size_t n,
                        size_t num_blocks, size_t dims_per_block, const float* codebooks,
                        float threshold, size_t d_eff, int max_iterations, int num_threads,
                        uint8_t* codes) {
  const size_t dp = num_blocks * dims_per_block;
  const size_t dpb = dims_per_block;
  parallel_for(n, num_threads, 1024, [&](size_t begin, size_t end, int) {
    std::vector<float> dir(dp);
    // err_par[b * 16 + c]: (r_b - C_b[c]) . x_hat_b ; err_sq likewise |r_b - C_b[c]|^2.
    std::vector<float> err_par(num_blocks * 16), err_sq(num_blocks * 16);
    // The codebooks transposed per block (dimension-major), for the SSE2 path.
    std::vector<float> books_t(num_blocks * 16 * dpb);
    for (size_t b = 0; b < num_blocks; ++b)
      for (size_t c = 0; c < 16; ++c)
        for (size_t j = 0; j < dpb; ++j)
          books_t[(b * dpb + j) * 16 + c] = codebooks[(b * 16 + c) * dpb + j];
    for (size_t i = begin; i < end; ++i) {
      const float* r = residuals + i * dp;
      const float* x = rows + i * dp;
      uint8_t* code = codes + i * num_blocks;
      double norm2 = 0;
      for (size_t j = 0; j < dp; ++j) norm2 += double(x[j]) * x[j];
      const double norm = std::sqrt(norm2);
      double eta = 1.0;
      if (threshold > 0 && norm > 0 && d_eff > 1) {
        // t is capped at 0.5 (eta <= (d - 1) / 3): rows far below the threshold would
        // otherwise get an unbounded eta, and their free orthogonal error then makes
        // them false positives for many queries.
        double t = std::min(double(threshold) / norm, 0.5);
        // Clamped below at 1: the loss may favour the parallel error, never discount it
        // (with large norms, T / |x| is tiny and the raw formula would drop below 1).
        eta = std::max(1.0, double(d_eff - 1) * t * t / (1.0 - t * t));
      }
      const float w = static_cast<float>(eta - 1.0);
      for (size_t j = 0; j < dp; ++j) dir[j] = norm > 0 ? float(x[j] / norm) : 0.f;

      size_t b0 = 0;
#if defined(__SSE2__)
      // Two dimensions per block (the common case) in SSE2, four codewords per register,
      // with the same float operations in the same order as the portable loop below.
      if (dpb == 2) {
        for (; b0 < num_blocks; ++b0) {
          const __m128 r0 = _mm_set1_ps(r[2 * b0]), r1 = _mm_set1_ps(r[2 * b0 + 1]);
          const __m128 d0 = _mm_set1_ps(dir[2 * b0]), d1 = _mm_set1_ps(dir[2 * b0 + 1]);
          const float* bt = books_t.data() + b0 * 32;  // dim 0 of the 16 codewords, then dim 1
          __m128 sq[4];
          for (int k = 0; k < 4; ++k) {
            const __m128 e0 = _mm_sub_ps(r0, _mm_loadu_ps(bt + 4 * k));
            const __m128 e1 = _mm_sub_ps(r1, _mm_loadu_ps(bt + 16 + 4 * k));
            sq[k] = _mm_add_ps(_mm_mul_ps(e0, e0), _mm_mul_ps(e1, e1));
            _mm_storeu_ps(&err_sq[b0 * 16 + 4 * k], sq[k]);
            _mm_storeu_ps(&err_par[b0 * 16 + 4 * k],
                          _mm_add_ps(_mm_mul_ps(e0, d0), _mm_mul_ps(e1, d1)));
          }
          code[b0] = static_cast<uint8_t>(first_min_index(sq, 0));
        }
      }
#endif
      for (size_t b = b0; b < num_blocks; ++b) {
        const float* rb = r + b * dpb;
        const float* db = dir.data() + b * dpb;
        float best = std::numeric_limits<float>::infinity();
        uint8_t arg = 0;
        for (size_t c = 0; c < 16; ++c) {
          const float* cw = codebooks + (b * 16 + c) * dpb;
          float sq = 0, par = 0;
          for (size_t j = 0; j < dpb; ++j) {
            float e = rb[j] - cw[j];
            sq += e * e;
            par += e * db[j];
          }
          err_sq[b * 16 + c] = sq;
          err_par[b * 16 + c] = par;
          if (sq < best) { best = sq; arg = static_cast<uint8_t>(c); }
        }
        code[b] = arg;
      }
      if (w == 0.f) continue;
      float total_par = 0;
      for (size_t b = 0; b < num_blocks; ++b) total_par += err_par[b * 16 + code[b]];
      for (int it = 0; it < max_iterations; ++it) {
        bool changed = false;
        for (size_t b = 0; b < num_blocks; ++b) {
          const float rest = total_par - err_par[b * 16 + code[b]];
          uint8_t arg = code[b];
#if defined(__SSE2__)
          {
            const __m128 rv = _mm_set1_ps(rest), wv = _mm_set1_ps(w);
            __m128 loss[4];
            for (int k = 0; k < 4; ++k) {
              const __m128 p = _mm_add_ps(rv, _mm_loadu_ps(&err_par[b * 16 + 4 * k]));
              loss[k] = _mm_add_ps(_mm_loadu_ps(&err_sq[b * 16 + 4 * k]),
                                   _mm_mul_ps(_mm_mul_ps(wv, p), p));
            }
            arg = static_cast<uint8_t>(first_min_index(loss, arg));
          }
#else
          float best = std::numeric_limits<float>::infinity();
          for (size_t c = 0; c < 16; ++c) {
            const float p = rest + err_par[b * 16 + c];
            const float loss = err_sq[b * 16 + c] + w * p * p;
            if (loss < best) { best = loss; arg = static_cast<uint8_t>(c); }
          }
#endif
          if (arg != code[b]) {
            changed = true;
            code[b] = arg;
          }
          total_par = rest + err_par[b * 16 + arg];
        }
        if (!changed) break;
      }
    }
  });
}

namespace {

#if defined(__SSE2__)
// The assignment step for two dimensions per block, in SSE2 (part of every x86-64 CPU):
// the 16 distances in four registers, the minimum by a min tree, the first codeword
// holding it from the compare masks. Same float operations, in the same order, as the
// portable loop below, so the same codewords result. bt: the codewords transposed (dim 0
// of the 16, then dim 1). Adds into sums/counts; returns m.
size_t nearest_codewords_sse2(const float* xb, size_t m, const float* bt, double* sums,
                              size_t* counts) {
  __m128 b0[4], b1[4];
  for (int k = 0; k < 4; ++k) {
    b0[k] = _mm_loadu_ps(bt + 4 * k);
    b1[k] = _mm_loadu_ps(bt + 16 + 4 * k);
  }
  for (size_t i = 0; i < m; ++i) {
    const __m128 x0 = _mm_set1_ps(xb[2 * i]), x1 = _mm_set1_ps(xb[2 * i + 1]);
    __m128 d[4];
    for (int k = 0; k < 4; ++k) {
      const __m128 e0 = _mm_sub_ps(x0, b0[k]), e1 = _mm_sub_ps(x1, b1[k]);
      d[k] = _mm_add_ps(_mm_mul_ps(e0, e0), _mm_mul_ps(e1, e1));
    }
    const size_t arg = first_min_index(d, 0);
    ++counts[arg];
    sums[2 * arg] += xb[2 * i];
    sums[2 * arg + 1] += xb[2 * i + 1];
  }
  return m;
}
#endif

// One block's Lloyd iterations over xb (m * dpb floats, contiguous). kDpb = dims per
// block when known at compile time (the distance loops then unroll and stay in
// registers), 0 = read dpb.
template <size_t kDpb>
void train_one_block(const float* xb, size_t m, size_t dpb_rt, int iterations,
                     const float* data, size_t dp, size_t b, float* book) {
  const size_t dpb = kDpb != 0 ? kDpb : dpb_rt;
  std::vector<double> sums(16 * dpb);
  std::vector<size_t> counts(16);
  std::vector<float> bt(16 * dpb);
  for (int it = 0; it < iterations; ++it) {
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    // Codewords transposed (bt[j * 16 + c]): a point's 16 distances vectorise over c.
    for (size_t c = 0; c < 16; ++c)
      for (size_t j = 0; j < dpb; ++j) bt[j * 16 + c] = book[c * dpb + j];
    size_t i = 0;
#if defined(__SSE2__)
    if (kDpb == 2) i = nearest_codewords_sse2(xb, m, bt.data(), sums.data(), counts.data());
#endif
    for (; i < m; ++i) {
      const float* x = xb + i * dpb;
      float d2[16] = {0};
      for (size_t j = 0; j < dpb; ++j) {
        const float xj = x[j];
        for (size_t c = 0; c < 16; ++c) {
          const float e = xj - bt[j * 16 + c];
          d2[c] += e * e;
        }
      }
      // The nearest codeword without a branch per codeword (unpredictable) or a
      // 15-step dependency chain: a min tree, then the first index holding the min.
      float m8[8];
      for (size_t c = 0; c < 8; ++c) m8[c] = d2[c + 8] < d2[c] ? d2[c + 8] : d2[c];
      for (size_t c = 0; c < 4; ++c) m8[c] = m8[c + 4] < m8[c] ? m8[c + 4] : m8[c];
      const float best = std::min(std::min(m8[0], m8[1]), std::min(m8[2], m8[3]));
      unsigned hits = 0;
      for (size_t c = 0; c < 16; ++c) hits |= unsigned(d2[c] == best) << c;
      const size_t arg = hits != 0 ? static_cast<size_t>(ctz32(hits)) : 0;
      ++counts[arg];
      for (size_t j = 0; j < dpb; ++j) sums[arg * dpb + j] += x[j];
    }
    bool changed = false;
    for (size_t c = 0; c < 16; ++c) {
      for (size_t j = 0; j < dpb; ++j) {
        // An empty codeword takes a deterministic, spread-out training row.
        const float v = counts[c] > 0
                            ? static_cast<float>(sums[c * dpb + j] / double(counts[c]))
                            : data[((c * 7919 + size_t(it) * 104729 + b) % m) * dp + b * dpb + j];
        changed |= v != book[c * dpb + j];
        book[c * dpb + j] = v;
      }
    }
    if (!changed) break;
  }
}

}  // namespace

void train_block_codebooks(const float* data, size_t m, size_t num_blocks,
                           size_t dims_per_block, int iterations, int num_threads, float* books) {
  const size_t dpb = dims_per_block, dp = num_blocks * dpb;
  parallel_for(num_blocks, num_threads, 1, [&](size_t b0, size_t b1, int) {
    std::vector<float> xb(m * dpb);  // this block's columns, contiguous
    for (size_t b = b0; b < b1; ++b) {
      // One strided pass per block instead of one per iteration: the rows are wide
      // (num_blocks * dpb floats) and only dpb of them belong to this block.
      for (size_t i = 0; i < m; ++i) {
        std::copy(data + i * dp + b * dpb, data + i * dp + (b + 1) * dpb, xb.data() + i * dpb);
      }
      float* book = books + b * 16 * dpb;
      switch (dpb) {
        case 1: train_one_block<1>(xb.data(), m, dpb, iterations, data, dp, b, book); break;
        case 2: train_one_block<2>(xb.data(), m, dpb, iterations, data, dp, b, book); break;
        case 4: train_one_block<4>(xb.data(), m, dpb, iterations, data, dp, b, book); break;
        default: train_one_block<0>(xb.data(), m, dpb, iterations, data, dp, b, book); break;
      }
    }
  });
}

void cluster_sums(const float* x, size_t n, size_t d, const int64_t* labels, size_t k,
                  double* sums, int64_t* counts) {
  std::fill(sums, sums + k * d, 0.0);
  std::fill(counts, counts + k, 0);
  for (size_t i = 0; i < n; ++i) {
    const size_t l = static_cast<size_t>(labels[i]);
    if (l >= k) continue;  // (callers pass labels in [0, k); never write out of bounds)
    ++counts[l];
    double* s = sums + l * d;
    const float* r = x + i * d;
    for (size_t j = 0; j < d; ++j) s[j] += r[j];
  }
}

}  // namespace mipscan
