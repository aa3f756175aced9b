// topk_columns (topk.h) for each ISA: one template, compiled with each ISA's flags
// (topk.cpp, topk_avx2.cpp, topk_avx512.cpp), whose lane loops the compiler vectorises.
//
// kW columns side by side, each with a list of k (score, id) pairs sorted by `better`.
// Candidate j is inserted into every list at once: slot s takes the old slot s - 1 when
// the candidate beat it, else the candidate when it beats the old slot s, else keeps its
// pair. "Beats" is a strict >: candidates come in id order, so a tie goes to the pair
// already kept, as `better` wants. No arithmetic on scores, so every ISA returns the same
// bits. O(m * k) per column, against a heap's O(m + pushes * log k) with unpredictable
// branches: several times faster for the few hundred candidates it is used for.
// A column whose list is not full at the end (scores of -inf or NaN, never inserted)
// is redone with a heap, which takes them as -inf.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "topk.h"

namespace mipscan {

// Internal linkage: this header is compiled once per ISA (topk.cpp, topk_avx2.cpp,
// topk_avx512.cpp), and an inline function with external linkage would be one symbol
// that the linker keeps a single copy of, whichever ISA's that is: the AVX2 kernel would
// run the baseline copy (as it did), or baseline CPUs an AVX copy (a crash).
namespace {

// Writes columns q0 .. q0 + w of the lists (ts/ti: slot-major, kW = 16 lanes) to
// out_s/out_id; a list that is not full is redone with a heap.
inline void topk_columns_finish(const float* scores_t, size_t m, size_t nq, size_t k, size_t q0,
                                size_t w, const float* ts, const uint32_t* ti, float* out_s,
                                uint32_t* out_id) {
  constexpr size_t kW = 16;
  for (size_t l = 0; l < w; ++l) {
    float* os = out_s + (q0 + l) * k;
    uint32_t* oi = out_id + (q0 + l) * k;
    for (size_t slot = 0; slot < k; ++slot) {
      os[slot] = ts[slot * kW + l];
      oi[slot] = ti[slot * kW + l];
    }
    if (oi[k - 1] != UINT32_MAX) continue;
    HeapView h{os, oi, k, 0};
    for (size_t j = 0; j < m; ++j) h.push(scores_t[j * nq + q0 + l], static_cast<uint32_t>(j));
    h.sort_best_first();
  }
}

inline void topk_columns_impl(const float* scores_t, size_t m, size_t nq, size_t k,
                              float* out_s, uint32_t* out_id) {
  constexpr size_t kW = 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> ts_buf(k * kW);
  std::vector<uint32_t> tb_buf(k * kW);  // the bits of ts
  std::vector<uint32_t> ti_buf(k * kW);
  float* ts = ts_buf.data();
  uint32_t* tb = tb_buf.data();
  uint32_t* ti = ti_buf.data();
  for (size_t q0 = 0; q0 < nq; q0 += kW) {
    const size_t w = std::min(kW, nq - q0);
    std::fill(ts, ts + k * kW, kNegInf);
    std::memcpy(tb, ts, k * kW * sizeof(float));
    std::fill(ti, ti + k * kW, UINT32_MAX);
    const float* last = ts + (k - 1) * kW;
    for (size_t j = 0; j < m; ++j) {
      float v[kW];
      const float* src = scores_t + j * nq + q0;
      if (w == kW) {
        for (size_t l = 0; l < kW; ++l) v[l] = src[l];
      } else {
        for (size_t l = 0; l < kW; ++l) v[l] = l < w ? src[l] : kNegInf;
      }
      int any = 0;  // a column whose worst kept pair the candidate beats
      for (size_t l = 0; l < kW; ++l) any |= v[l] > last[l];
      if (!any) continue;
      const uint32_t id = static_cast<uint32_t>(j);
      // Blends as masks on the bits (all ones where taken): the loops stay branch free.
      uint32_t vb[kW], prev[kW], prev_s[kW], prev_i[kW];
      std::memcpy(vb, v, sizeof vb);
      for (size_t l = 0; l < kW; ++l) prev[l] = 0;
      for (size_t l = 0; l < kW; ++l) prev_s[l] = 0;
      for (size_t l = 0; l < kW; ++l) prev_i[l] = 0;
      for (size_t slot = 0; slot < k; ++slot) {
        float* s = ts + slot * kW;
        uint32_t* sb = tb + slot * kW;
        uint32_t* si = ti + slot * kW;
        for (size_t l = 0; l < kW; ++l) {
          const uint32_t old_b = sb[l];
          const uint32_t old_i = si[l];
          const uint32_t c = 0u - static_cast<uint32_t>(v[l] > s[l]);
          const uint32_t nb = (c & vb[l]) | (~c & old_b);
          const uint32_t ni = (c & id) | (~c & old_i);
          sb[l] = (prev[l] & prev_s[l]) | (~prev[l] & nb);
          si[l] = (prev[l] & prev_i[l]) | (~prev[l] & ni);
          prev[l] = c;
          prev_s[l] = old_b;
          prev_i[l] = old_i;
        }
        std::memcpy(s, sb, kW * sizeof(float));
      }
    }
    topk_columns_finish(scores_t, m, nq, k, q0, w, ts, ti, out_s, out_id);
  }
}

}  // namespace
}  // namespace mipscan
