#include "topk.h"

#include <algorithm>
#include <functional>
#include <utility>

#include "parallel.h"

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
  float sample[kSample];
  for (size_t i = 0; i < kSample; ++i) sample[i] = items_[(i * n) / kSample].s;
  const size_t rank = std::min(kSample - 1, (k_ * kSample) / n + 4);
  std::nth_element(sample, sample + rank, sample + kSample, std::greater<float>());
  const float est = sample[rank];
  size_t reach = 0;
  for (size_t i = 0; i < n; ++i) reach += items_[i].s >= est;
  if (reach >= k_ && reach <= n - (n - k_) / 4) {
    size_t w = 0;
    for (size_t i = 0; i < n; ++i) {
      items_[w] = items_[i];
      w += items_[i].s >= est;
    }
    size_ = w;
    thr_ = est;
    return;
  }
  select_exact();
}

void TopKBuffer::select_exact() {
  // Exact k-th largest score without sorting: a 1024-bin histogram over [min, max] finds
  // the bin holding it (the bin index is monotone in the score), the pairs in higher
  // bins are kept, and nth_element runs only on the boundary bin's pairs.
  constexpr int kBins = 1024;
  if (size_ < kBins / 4) {  // small: zeroing the histogram would cost more than it saves
    std::nth_element(items_.begin(), items_.begin() + (k_ - 1), items_.begin() + size_,
                     [](const Item& x, const Item& y) { return x.s > y.s; });
    size_ = k_;
    thr_ = items_[k_ - 1].s;
    return;
  }
  float lo = items_[0].s, hi = items_[0].s;
  for (size_t i = 1; i < size_; ++i) {
    lo = std::min(lo, items_[i].s);
    hi = std::max(hi, items_[i].s);
  }
  if (!(hi > lo)) {  // all scores equal (or a single pair)
    size_ = k_;
    thr_ = hi;
    return;
  }
  const float scale = static_cast<float>(kBins) / (hi - lo);
  // Written so that no float reaches the int conversion unless it is in [0, kBins).
  auto bin = [&](float v) {
    const float f = (v - lo) * scale;
    return f >= 1.0f ? (f < static_cast<float>(kBins) ? static_cast<int>(f) : kBins - 1) : 0;
  };
  uint32_t hist[kBins] = {0};
  for (size_t i = 0; i < size_; ++i) ++hist[bin(items_[i].s)];
  size_t above = 0;
  int b = kBins - 1;
  while (above + hist[b] < k_) above += hist[b--];
  boundary_.clear();
  size_t w = 0;
  for (size_t i = 0; i < size_; ++i) {
    const int bi = bin(items_[i].s);
    if (bi > b) items_[w++] = items_[i];
    else if (bi == b) boundary_.push_back(items_[i]);
  }
  const size_t need = k_ - above;  // 1 <= need <= boundary_.size()
  std::nth_element(boundary_.begin(), boundary_.begin() + (need - 1), boundary_.end(),
                   [](const Item& x, const Item& y) { return x.s > y.s; });
  for (size_t i = 0; i < need; ++i) items_[w++] = boundary_[i];
  size_ = k_;
  thr_ = boundary_[need - 1].s;
}

size_t TopKBuffer::finish_unsorted() {
  if (size_ > k_) select_exact();
  return size_;
}

size_t TopKBuffer::finish_sorted() {
  const size_t n = finish_unsorted();
  std::sort(items_.begin(), items_.begin() + n,
            [](const Item& a, const Item& b) { return better(a.s, a.id, b.s, b.id); });
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
          // ">=" keeps ties so that the id order decides them inside push().
          if (row[j] >= thr) {
            h.push(row[j], col_offset + static_cast<uint32_t>(j));
            thr = h.threshold();
          }
        }
      } else {
        for (size_t j = 0; j < m; ++j) {
          float v = row[j] + col_bias[j];
          if (v >= thr) {
            h.push(v, col_offset + static_cast<uint32_t>(j));
            thr = h.threshold();
          }
        }
      }
      sizes[r] = static_cast<int64_t>(h.size);
    }
  });
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
