#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "search.h"

namespace mipscan {

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
    for (size_t i = begin; i < end; ++i) {
      const float* r = residuals + i * dp;
      const float* x = rows + i * dp;
      uint8_t* code = codes + i * num_blocks;
      double norm2 = 0;
      for (size_t j = 0; j < dp; ++j) norm2 += double(x[j]) * x[j];
      const double norm = std::sqrt(norm2);
      double eta = 1.0;
      if (threshold > 0 && norm > 0 && d_eff > 1) {
        double t = std::min(double(threshold) / norm, 0.999);
        eta = double(d_eff - 1) * t * t / (1.0 - t * t);
      }
      const float w = static_cast<float>(eta - 1.0);
      for (size_t j = 0; j < dp; ++j) dir[j] = norm > 0 ? float(x[j] / norm) : 0.f;

      for (size_t b = 0; b < num_blocks; ++b) {
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
          float best = std::numeric_limits<float>::infinity();
          uint8_t arg = code[b];
          for (size_t c = 0; c < 16; ++c) {
            const float p = rest + err_par[b * 16 + c];
            const float loss = err_sq[b * 16 + c] + w * p * p;
            if (loss < best) { best = loss; arg = static_cast<uint8_t>(c); }
          }
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

}  // namespace mipscan
