// The AH encoder's coordinate descent over blocks (encode.cpp), for a few points at once.
// Each point's descent is a chain of dependent steps (a block's choice moves the running
// parallel error that the next block's losses read), so one point at a time leaves the
// core waiting on latency; interleaving independent points fills it. Each point still
// takes exactly its own steps, in its own order, and stops after its own first pass
// without a change: the codes are those of one point at a time.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mipscan {

constexpr size_t kEncodeBatch = 4;

// np <= kEncodeBatch points, point p's errors at err_par + p * 16 * num_blocks (block b's
// 16 at + 16 * b) and its codes at codes + p * num_blocks, holding the nearest codewords on
// entry. w[p] = eta - 1 (0: no descent). argmin(p, b, rest, cur) returns the codeword of
// block b minimising err_sq + w * (rest + err_par)^2, the first such, or cur when none is
// (NaN losses).
template <class Argmin>
inline void descend_points(size_t np, size_t num_blocks, int max_iterations, const float* w,
                           const float* err_par, uint8_t* codes, Argmin argmin) {
  const size_t errs = num_blocks * 16;
  float total[kEncodeBatch];
  bool active[kEncodeBatch];
  size_t left = 0;
  for (size_t p = 0; p < np; ++p) {
    active[p] = w[p] != 0.f;
    left += active[p];
    total[p] = 0;
    for (size_t b = 0; b < num_blocks; ++b)
      total[p] += err_par[p * errs + b * 16 + codes[p * num_blocks + b]];
  }
  for (int it = 0; it < max_iterations && left > 0; ++it) {
    bool changed[kEncodeBatch] = {};
    for (size_t b = 0; b < num_blocks; ++b) {
      for (size_t p = 0; p < np; ++p) {
        if (!active[p]) continue;
        uint8_t& code = codes[p * num_blocks + b];
        const float* par = err_par + p * errs + b * 16;
        const float rest = total[p] - par[code];
        const uint8_t arg = argmin(p, b, rest, code);
        changed[p] |= arg != code;
        code = arg;
        total[p] = rest + par[arg];
      }
    }
    for (size_t p = 0; p < np; ++p) {
      if (active[p] && !changed[p]) {
        active[p] = false;
        --left;
      }
    }
  }
}

}  // namespace mipscan
