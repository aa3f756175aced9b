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
  // Select on a copy of the scores (4-byte floats, plain comparison: much cheaper than
  // moving 8-byte pairs), then keep the pairs above the k-th score plus enough ties.
  // Which tied pairs survive is settled by finish_sorted() only among the survivors.
  scratch_.resize(size_);
  for (size_t i = 0; i < size_; ++i) scratch_[i] = items_[i].s;
  std::nth_element(scratch_.begin(), scratch_.begin() + (k_ - 1), scratch_.end(), std::greater<float>());
  const float kth = scratch_[k_ - 1];
  size_t above = 0;
  for (size_t i = 0; i < size_; ++i) above += items_[i].s > kth;
  size_t ties = k_ - above, w = 0;
  for (size_t i = 0; i < size_; ++i) {
    const bool keep = items_[i].s > kth || (items_[i].s == kth && ties > 0);
    if (items_[i].s == kth && keep) --ties;
    items_[w] = items_[i];
    w += keep;
  }
  size_ = k_;
  thr_ = kth;
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
