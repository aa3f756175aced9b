#include "topk.h"

#include <algorithm>
#include <functional>
#include <utility>

#include "cpu.h"
#include "parallel.h"
#include "portable.h"
#include "topk_columns.h"

namespace mipscan {

namespace {
// Root = worst. "worse(a, b)" is the heap's "greater" so that the root is the maximum
// of worseness.
inline bool worse(const float* s, const uint32_t* id, size_t a, size_t b) {
  return better(s[b], id[b], s[a], id[a]);
}
inline void swap_at(float* s, uint32_t* id, size_t a, size_t b) {
  std::swap(s[a], s[b]);
  std::swap(id[a], id[b]);
}
void sift_down(float* s, uint32_t* id, size_t n, size_t i) {
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, w = i;
    if (l < n && worse(s, id, l, w)) w = l;
    if (r < n && worse(s, id, r, w)) w = r;
    if (w == i) return;
    swap_at(s, id, i, w);
    i = w;
  }
}
}  // namespace

void HeapView::push(float score, uint32_t i) {
  score = no_nan(score);
  if (size < k) {
    size_t c = size++;
    s[c] = score;
    id[c] = i;
    while (c > 0) {
      size_t p = (c - 1) / 2;
      if (!worse(s, id, c, p)) break;
      swap_at(s, id, c, p);
      c = p;
    }
  } else if (better(score, i, s[0], id[0])) {
    s[0] = score;
    id[0] = i;
    sift_down(s, id, size, 0);
  }
}

void HeapView::sort_best_first() {
  // Heap sort: repeatedly move the worst to the end.
  for (size_t n = size; n > 1; --n) {
    swap_at(s, id, 0, n - 1);
    sift_down(s, id, n - 1, 0);
  }
}

void TopKBuffer::prune() {
  // Cheap path: estimate a score that about 1.25k of the buffered pairs reach, from a
  // strided sample of 64, and keep everything at or above it in one linear pass. The
  // estimate becomes the threshold only if at least k pairs reach it (so the true top k
  // are all kept) and the pass frees a useful amount of space; else select exactly.
  constexpr size_t kSample = 64;
  const size_t n = size_;
  if (n < 8 * kSample) {  // small buffers: exact selection is cheaper than estimating
    select_exact();
    return;
  }
  float* s = s_.data();
  uint32_t* id = id_.data();
  float sample[kSample];
  for (size_t i = 0; i < kSample; ++i) sample[i] = s[(i * n) / kSample];
  const size_t rank = std::min(kSample - 1, (k_ * kSample) / n + 4);
  static_assert(kSample == 64, "nth_of_64 takes 64 values");
  const float est = kernels().nth_of_64(sample, rank);
  size_t reach = 0;
  for (size_t i = 0; i < n; ++i) reach += s[i] >= est;
  if (reach >= k_ && reach <= n - (n - k_) / 4) {
    size_ = kernels().compact_ge(s, id, n, est);
    thr_ = est;
    thr_id_ = kAllTies;  // every pair at est was kept, so ties at it may still enter
    return;
  }
  select_exact();
}

float kth_largest(const float* v, size_t n, size_t k, std::vector<uint16_t>& bins_scratch,
                  std::vector<float>& edge_scratch) {
  // A histogram over [min, max] with about two values per bin (at most 1024 bins) finds
  // the bin holding the k-th largest (the bin index is monotone in the value);
  // nth_element then runs on that bin's few values only.
  if (n <= 16) {
    if (n > edge_scratch.capacity()) fault::alloc();
    edge_scratch.assign(v, v + n);
    std::nth_element(edge_scratch.begin(), edge_scratch.begin() + (k - 1), edge_scratch.end(),
                     std::greater<float>());
    return edge_scratch[k - 1];
  }
  // Eight running minima and maxima: independent chains, so the loop is not latency bound.
  float lo8[8], hi8[8];
  for (size_t t = 0; t < 8; ++t) lo8[t] = hi8[t] = v[0];
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (size_t t = 0; t < 8; ++t) {
      lo8[t] = v[i + t] < lo8[t] ? v[i + t] : lo8[t];
      hi8[t] = v[i + t] > hi8[t] ? v[i + t] : hi8[t];
    }
  }
  for (; i < n; ++i) {
    lo8[0] = std::min(lo8[0], v[i]);
    hi8[0] = std::max(hi8[0], v[i]);
  }
  const float lo = *std::min_element(lo8, lo8 + 8), hi = *std::max_element(hi8, hi8 + 8);
  if (!(hi > lo)) return hi;  // all equal
  const size_t nbins = std::min<size_t>(1024, n / 2);
  // Bins in a separate pass (it vectorises); clamped in float so that no out-of-range
  // value reaches the int conversion.
  const float scale = static_cast<float>(nbins) / (hi - lo);
  const float top_bin = static_cast<float>(nbins - 1);
  grow(bins_scratch, n);
  uint16_t* bins = bins_scratch.data();
  for (size_t j = 0; j < n; ++j) {
    float f = (v[j] - lo) * scale;
    f = f > 0.f ? f : 0.f;
    f = f < top_bin ? f : top_bin;
    bins[j] = static_cast<uint16_t>(static_cast<int>(f));
  }
  uint32_t hist[1024];
  std::fill(hist, hist + nbins, 0u);
  for (size_t j = 0; j < n; ++j) ++hist[bins[j]];
  size_t above = 0, b = nbins - 1;
  while (above + hist[b] < k) above += hist[b--];
  // The bin's values.
  if (edge_scratch.size() < n + kCompactSlack) grow(edge_scratch, n + kCompactSlack);
  float* edge = edge_scratch.data();
  const size_t e = kernels().compact_bin(v, bins, n, static_cast<uint16_t>(b), edge);
  const size_t need = k - above;  // 1 <= need <= hist[b] = e
  std::nth_element(edge, edge + (need - 1), edge + e, std::greater<float>());
  return edge[need - 1];
}

void TopKBuffer::select_exact() {
  // The k-th largest score t, then one branch-free pass keeps the pairs above t and, of
  // the pairs at t, the ones with the smallest ids (as many as make k): the best k by
  // `better`, whatever order they came in.
  const size_t n = size_;
  float* s = s_.data();
  uint32_t* id = id_.data();
  const float t = kth_largest(s, n, k_, bins_, edge_);
  size_t above = 0, at = 0;
  for (size_t j = 0; j < n; ++j) {
    above += s[j] > t;
    at += s[j] == t;
  }
  const size_t ties = k_ - above;  // pairs at t to keep (>= 1)
  if (ties == at) {
    // Every pair at t is kept: the pairs >= t, and any later tie is admitted (admits()
    // may let in pairs that lose; they cost a push only).
    kernels().compact_ge(s, id, n, t);
    size_ = k_;
    thr_ = t;
    thr_id_ = kAllTies;
    return;
  }
  // The largest id kept at t: the ties-th smallest (ids are distinct in every caller;
  // with repeats the count below still keeps exactly k).
  tie_ids_.clear();
  for (size_t j = 0; j < n; ++j)
    if (s[j] == t) tie_ids_.push_back(id[j]);  // capacity cap_ >= n: no allocation
  std::nth_element(tie_ids_.begin(), tie_ids_.begin() + static_cast<std::ptrdiff_t>(ties - 1), tie_ids_.end());
  const uint32_t last = tie_ids_[ties - 1];
  size_t w = 0, kept_ties = 0;
  for (size_t j = 0; j < n; ++j) {
    const float v = s[j];
    const uint32_t d = id[j];
    const bool tie = (v == t) & (d <= last) & (kept_ties < ties);
    s[w] = v;
    id[w] = d;
    w += (v > t) | tie;
    kept_ties += tie;
  }
  size_ = k_;
  thr_ = t;
  thr_id_ = last;
}

float nth_of_64_scalar(const float* v, size_t rank) {
  float c[64];
  std::copy(v, v + 64, c);
  std::nth_element(c, c + rank, c + 64, std::greater<float>());
  return c[rank];
}

size_t compact_ge_scalar(float* s, uint32_t* id, size_t n, float t) {
  size_t w = 0;
  for (size_t i = 0; i < n; ++i) {  // branch-free: keeps are unpredictable
    const float v = s[i];
    const uint32_t d = id[i];
    s[w] = v;
    id[w] = d;
    w += v >= t;
  }
  return w;
}

size_t collect_group_scalar(const uint16_t* sums, uint64_t mask, float base, float inv,
                            uint32_t id0, float thr, uint64_t thr_id, float* out_s,
                            uint32_t* out_id) {
  size_t w = 0;
  for (; mask != 0; mask &= mask - 1) {
    const unsigned j = ctz64(mask);
    const float v = base + static_cast<float>(sums[j]) * inv;
    out_s[w] = v;
    out_id[w] = id0 + j;
    w += v > thr || (v == thr && uint64_t{id0 + j} < thr_id);
  }
  return w;
}

size_t compact_bin_scalar(const float* v, const uint16_t* bins, size_t n, uint16_t b, float* out) {
  // Branch-free (a bin's members are unpredictable): every value is written, and the
  // position advances past the bin's own.
  size_t e = 0;
  for (size_t j = 0; j < n; ++j) {
    out[e] = v[j];
    e += bins[j] == b;
  }
  return e;
}
size_t TopKBuffer::finish_unsorted() {
  if (size_ > k_) select_exact();
  return size_;
}

size_t TopKBuffer::finish_sorted() {
  const size_t n = finish_unsorted();
  grow(pairs_, n);
  for (size_t i = 0; i < n; ++i) pairs_[i] = {s_[i], id_[i]};
  std::sort(pairs_.begin(), pairs_.end(), [](const auto& a, const auto& b) {
    return better(a.first, a.second, b.first, b.second);
  });
  for (size_t i = 0; i < n; ++i) {
    s_[i] = pairs_[i].first;
    id_[i] = pairs_[i].second;
  }
  return n;
}

void topk_update_rows(const float* scores, size_t nq, size_t m, size_t ld,
                      const float* col_bias, uint32_t col_offset, size_t k,
                      float* heap_s, uint32_t* heap_id, int64_t* sizes, int num_threads) {
  parallel_for(nq, num_threads, 16, [&](size_t b, size_t e, int) {
    for (size_t r = b; r < e; ++r) {
      HeapView h{heap_s + r * k, heap_id + r * k, k, static_cast<size_t>(sizes[r])};
      const float* row = scores + r * ld;
      float thr = h.threshold();
      if (col_bias == nullptr) {
        for (size_t j = 0; j < m; ++j) {
          // ">=" keeps ties so that the id order decides them inside push(); "not <" also
          // lets a NaN through (as -inf) while the heap has room, so it always fills to k.
          if (!(row[j] < thr)) {
            h.push(row[j], col_offset + static_cast<uint32_t>(j));
            thr = h.threshold();
          }
        }
      } else {
        for (size_t j = 0; j < m; ++j) {
          float v = row[j] + col_bias[j];
          if (!(v < thr)) {
            h.push(v, col_offset + static_cast<uint32_t>(j));
            thr = h.threshold();
          }
        }
      }
      sizes[r] = static_cast<int64_t>(h.size);
    }
  });
}

void topk_update_rows_masked(const float* scores, size_t nq, size_t m, size_t ld,
                             const uint64_t* bits, size_t words, uint32_t col_offset, size_t k,
                             float* heap_s, uint32_t* heap_id, int64_t* sizes, int num_threads) {
  parallel_for(nq, num_threads, 16, [&](size_t b, size_t e, int) {
    for (size_t r = b; r < e; ++r) {
      HeapView h{heap_s + r * k, heap_id + r * k, k, static_cast<size_t>(sizes[r])};
      const float* row = scores + r * ld;
      const uint64_t* rb = bits + r * words + col_offset / 64;
      float thr = h.threshold();
      for (size_t w0 = 0; w0 < m; w0 += 64) {
        uint64_t mk = rb[w0 / 64];
        if (m - w0 < 64) mk &= (uint64_t{1} << (m - w0)) - 1;
        while (mk != 0) {
          const size_t j = w0 + ctz64(mk);
          mk &= mk - 1;
          if (!(row[j] < thr)) {  // as topk_update_rows
            h.push(row[j], col_offset + static_cast<uint32_t>(j));
            thr = h.threshold();
          }
        }
      }
      sizes[r] = static_cast<int64_t>(h.size);
    }
  });
}

void topk_columns_scalar(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                         uint32_t* out_id) {
  topk_columns_impl(scores_t, m, nq, k, out_s, out_id);
}

void topk_finish_rows(size_t nq, size_t k, float* heap_s, uint32_t* heap_id,
                      const int64_t* sizes, int num_threads) {
  parallel_for(nq, num_threads, 64, [&](size_t b, size_t e, int) {
    for (size_t r = b; r < e; ++r) {
      HeapView h{heap_s + r * k, heap_id + r * k, k, static_cast<size_t>(sizes[r])};
      h.sort_best_first();
    }
  });
}

}  // namespace mipscan
