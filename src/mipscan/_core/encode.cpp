#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu.h"
#include "encode_descent.h"
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

namespace {

// The per-thread state of the encoder, for a batch of up to kEncodeBatch points: their
// residuals and directions (dp floats each), their blocks' 16 errors (err_sq / err_par,
// 16 * num_blocks floats each), and the codebooks transposed per block (dimension-major:
// a block's 16 first dimensions, then its 16 second ones, ...) for the vector paths.
struct EncodeScratch {
  std::vector<float> res, dir, err_par, err_sq, books_t;
  EncodeScratch(size_t num_blocks, size_t dpb, const float* codebooks)
      : res(kEncodeBatch * num_blocks * dpb), dir(kEncodeBatch * num_blocks * dpb),
        err_par(kEncodeBatch * num_blocks * 16), err_sq(kEncodeBatch * num_blocks * 16),
        books_t(num_blocks * 16 * dpb) {
    for (size_t b = 0; b < num_blocks; ++b)
      for (size_t c = 0; c < 16; ++c)
        for (size_t j = 0; j < dpb; ++j)
          books_t[(b * dpb + j) * 16 + c] = codebooks[(b * 16 + c) * dpb + j];
  }
};

// eta - 1 of a unit-norm row (as float, the weight of the parallel error).
float unit_parallel_weight(float threshold, size_t d_eff) {
  double eta = 1.0;
  if (threshold > 0 && d_eff > 1) {
    // t is capped at 0.5 (eta <= (d - 1) / 3): with ScaNN's t = T / |x|, rows far below
    // the threshold would otherwise get an unbounded eta, and their free orthogonal error
    // then makes them false positives for many queries.
    const double t = std::min(double(threshold), 0.5);
    // Clamped below at 1: the loss may favour the parallel error, never discount it
    // (with a small T or few dimensions the raw formula drops below 1).
    eta = std::max(1.0, double(d_eff - 1) * t * t / (1.0 - t * t));
  }
  return static_cast<float>(eta - 1.0);
}

// x's direction into dir (dp floats, zero for a zero row); returns |x| (float64 sums).
double unit_direction(const float* x, size_t dp, float* dir) {
  double norm2 = 0;
  for (size_t j = 0; j < dp; ++j) norm2 += double(x[j]) * x[j];
  const double norm = std::sqrt(norm2);
  for (size_t j = 0; j < dp; ++j) dir[j] = norm > 0 ? float(x[j] / norm) : 0.f;
  return norm;
}

// A block's 16 errors of one point and its nearest codeword: err_sq[c] = |r_b - C_b[c]|^2,
// err_par[c] = (r_b - C_b[c]) . dir_b, as float sums over the block's dimensions in order.
uint8_t block_errors(const float* rb, const float* db, size_t b, size_t dpb,
                     const float* codebooks, const float* books_t, float* err_sq,
                     float* err_par) {
#if defined(__SSE2__)
  // Two dimensions per block (the common case) in SSE2, four codewords per register,
  // with the same float operations in the same order as the portable loop below.
  if (dpb == 2) {
    const __m128 r0 = _mm_set1_ps(rb[0]), r1 = _mm_set1_ps(rb[1]);
    const __m128 d0 = _mm_set1_ps(db[0]), d1 = _mm_set1_ps(db[1]);
    const float* bt = books_t + b * 32;  // dim 0 of the 16 codewords, then dim 1
    __m128 sq[4];
    for (int k = 0; k < 4; ++k) {
      const __m128 e0 = _mm_sub_ps(r0, _mm_loadu_ps(bt + 4 * k));
      const __m128 e1 = _mm_sub_ps(r1, _mm_loadu_ps(bt + 16 + 4 * k));
      sq[k] = _mm_add_ps(_mm_mul_ps(e0, e0), _mm_mul_ps(e1, e1));
      _mm_storeu_ps(err_sq + 4 * k, sq[k]);
      _mm_storeu_ps(err_par + 4 * k, _mm_add_ps(_mm_mul_ps(e0, d0), _mm_mul_ps(e1, d1)));
    }
    return static_cast<uint8_t>(first_min_index(sq, 0));
  }
#else
  (void)books_t;
#endif
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
    err_sq[c] = sq;
    err_par[c] = par;
    if (sq < best) { best = sq; arg = static_cast<uint8_t>(c); }
  }
  return arg;
}

// The codes of np <= kEncodeBatch points, their residuals and directions in s (dp floats
// apart), w[p] = eta - 1 of each: nearest codewords, then the interleaved descent.
void encode_batch(const Kernels& kn, size_t np, const float* w, size_t num_blocks, size_t dpb,
                  const float* codebooks, int max_iterations, EncodeScratch& s, uint8_t* codes) {
  const size_t dp = num_blocks * dpb, errs = num_blocks * 16;
  if (dpb == 2 && kn.encode2 != nullptr) {
    kn.encode2(np, s.res.data(), s.dir.data(), w, num_blocks, s.books_t.data(), max_iterations,
               s.err_sq.data(), s.err_par.data(), codes);
    return;
  }
  for (size_t p = 0; p < np; ++p) {
    for (size_t b = 0; b < num_blocks; ++b) {
      codes[p * num_blocks + b] = block_errors(
          s.res.data() + p * dp + b * dpb, s.dir.data() + p * dp + b * dpb, b, dpb, codebooks,
          s.books_t.data(), s.err_sq.data() + p * errs + b * 16, s.err_par.data() + p * errs + b * 16);
    }
  }
  descend_points(np, num_blocks, max_iterations, w, s.err_par.data(), codes,
                 [&](size_t p, size_t b, float rest, uint8_t cur) -> uint8_t {
    const float* par = s.err_par.data() + p * errs + b * 16;
    const float* sq = s.err_sq.data() + p * errs + b * 16;
#if defined(__SSE2__)
    const __m128 rv = _mm_set1_ps(rest), wv = _mm_set1_ps(w[p]);
    __m128 loss[4];
    for (int k = 0; k < 4; ++k) {
      const __m128 pv = _mm_add_ps(rv, _mm_loadu_ps(par + 4 * k));
      loss[k] = _mm_add_ps(_mm_loadu_ps(sq + 4 * k), _mm_mul_ps(_mm_mul_ps(wv, pv), pv));
    }
    return static_cast<uint8_t>(first_min_index(loss, cur));
#else
    float best = std::numeric_limits<float>::infinity();
    uint8_t arg = cur;
    for (size_t c = 0; c < 16; ++c) {
      const float pc = rest + par[c];
      const float loss = sq[c] + w[p] * pc * pc;
      if (loss < best) { best = loss; arg = static_cast<uint8_t>(c); }
    }
    return arg;
#endif
  });
}

}  // namespace

void encode_anisotropic_rows(const Kernels& kn, const float* rows, size_t width,
                             const int64_t* ids, const int64_t* leaves, const float* centroids,
                             size_t n, size_t num_blocks, size_t dims_per_block,
                             const float* codebooks, float threshold, size_t d_eff,
                             int max_iterations, int num_threads, uint8_t* codes) {
  const size_t dp = num_blocks * dims_per_block;
  const float w_unit = unit_parallel_weight(threshold, d_eff);
  parallel_for(n, num_threads, 1024, [&](size_t begin, size_t end, int) {
    EncodeScratch s(num_blocks, dims_per_block, codebooks);
    std::vector<float> x(dp, 0.f);  // the row, zero-padded to dp
    float w[kEncodeBatch];
    for (size_t i = begin; i < end; i += kEncodeBatch) {
      const size_t np = std::min(kEncodeBatch, end - i);
      for (size_t p = 0; p < np; ++p) {
        const float* row = rows + static_cast<size_t>(ids[i + p]) * width;
        const float* c = centroids + static_cast<size_t>(leaves[i + p]) * width;
        float* res = s.res.data() + p * dp;  // (past width, res and x stay 0)
        for (size_t j = 0; j < width; ++j) {
          x[j] = row[j];
          res[j] = row[j] - c[j];
        }
        const double norm = unit_direction(x.data(), dp, s.dir.data() + p * dp);
        w[p] = norm > 0 ? w_unit : 0.f;
      }
      encode_batch(kn, np, w, num_blocks, dims_per_block, codebooks, max_iterations, s,
                   codes + i * num_blocks);
    }
  });
}

void gather_residuals(const float* rows, size_t width, const int64_t* ids, const int64_t* leaves,
                      const float* centroids, size_t n, size_t dp, int num_threads, float* out) {
  parallel_for(n, num_threads, 4096, [&](size_t begin, size_t end, int) {
    for (size_t i = begin; i < end; ++i) {
      const float* row = rows + static_cast<size_t>(ids[i]) * width;
      const float* c = centroids + static_cast<size_t>(leaves[i]) * width;
      float* o = out + i * dp;
      for (size_t j = 0; j < width; ++j) o[j] = row[j] - c[j];
      for (size_t j = width; j < dp; ++j) o[j] = 0.f;
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
void train_one_block(Nearest2Fn nearest2, const float* xb, size_t m, size_t dpb_rt,
                     int iterations, const float* data, size_t dp, size_t b, float* book) {
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
    if (kDpb == 2 && nearest2 != nullptr) {
      nearest2(xb, m, bt.data(), sums.data(), counts.data());
      i = m;
    }
#if defined(__SSE2__)
    else if (kDpb == 2) {
      i = nearest_codewords_sse2(xb, m, bt.data(), sums.data(), counts.data());
    }
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

void train_block_codebooks(const Kernels& kn, const float* data, size_t m, size_t num_blocks,
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
        case 1: train_one_block<1>(kn.nearest2, xb.data(), m, dpb, iterations, data, dp, b, book); break;
        case 2: train_one_block<2>(kn.nearest2, xb.data(), m, dpb, iterations, data, dp, b, book); break;
        case 4: train_one_block<4>(kn.nearest2, xb.data(), m, dpb, iterations, data, dp, b, book); break;
        default: train_one_block<0>(kn.nearest2, xb.data(), m, dpb, iterations, data, dp, b, book); break;
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
