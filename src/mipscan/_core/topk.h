// Top-k selection shared by brute force and the searcher.
//
// Order: a (score, id) pair is better than another when its score is higher, or the
// scores are equal and its id is smaller. Results are therefore deterministic even with
// ties, and equal to a stable descending sort.
//
// NaN. `better` is a strict weak order only over non-NaN scores; std::sort and
// nth_element with an inconsistent order may read and write outside their range. So no
// NaN ever enters a buffer here: HeapView::push maps NaN to -inf (no_nan: the worst
// score; the data that made it was garbage anyway, and the result stays a well-formed
// top-k of distinct ids), and TopKBuffer::push requires a non-NaN score, which its callers
// in search.cpp guarantee (a check per push there cost 3% of a single-query search).
// +-inf are ordinary values.
#pragma once
#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "fault.h"

namespace mipscan {

inline bool better(float sa, uint32_t ia, float sb, uint32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

inline float no_nan(float v) { return v == v ? v : -std::numeric_limits<float>::infinity(); }

// Kernels (cpu.h's table) for the passes that TopKBuffer, kth_largest and the LUT16
// scans' candidate handling spend most of their time in. Every level gives the same
// result: they select and move values, and collect_group rounds as the scalar code does.
// compact_ge: keeps the pairs of s[0, n) / id[0, n) whose score is >= t, in order, at the
// front of both arrays; returns how many. No NaN in s.
using CompactGeFn = size_t (*)(float* s, uint32_t* id, size_t n, float t);
// compact_bin: copies the v[j] with bins[j] == b, in order, to out; returns how many.
// out has room for n + kCompactSlack values (a kernel may write whole registers).
using CompactBinFn = size_t (*)(const float* v, const uint16_t* bins, size_t n, uint16_t b,
                                float* out);
constexpr size_t kCompactSlack = 16;
// collect_group: of one group of 64 LUT16 sums (lut16.h), the points flagged in mask as
// (score, id) pairs: score base + float(sum) * inv (a product, then a sum, as written),
// id id0 + j. Writes the pairs that TopKBuffer::admits() under the threshold thr and
// threshold id thr_id, in point order, at out_s / out_id (room for 64 each); returns
// how many.
using CollectGroupFn = size_t (*)(const uint16_t* sums, uint64_t mask, float base, float inv,
                                  uint32_t id0, float thr, uint64_t thr_id, float* out_s,
                                  uint32_t* out_id);
// nth_of_64: the rank-th largest (0: the largest) of v[0, 64), no NaN in v: the value
// std::nth_element with std::greater puts at v + rank (a value, so the same at every level).
using NthOf64Fn = float (*)(const float* v, size_t rank);
float nth_of_64_scalar(const float* v, size_t rank);
size_t compact_ge_scalar(float* s, uint32_t* id, size_t n, float t);
size_t compact_bin_scalar(const float* v, const uint16_t* bins, size_t n, uint16_t b, float* out);
size_t collect_group_scalar(const uint16_t* sums, uint64_t mask, float base, float inv,
                            uint32_t id0, float thr, uint64_t thr_id, float* out_s,
                            uint32_t* out_id);
#if MIPSCAN_HAVE_AVX512
float nth_of_64_avx512(const float* v, size_t rank);
size_t compact_ge_avx512(float* s, uint32_t* id, size_t n, float t);
size_t compact_bin_avx512(const float* v, const uint16_t* bins, size_t n, uint16_t b, float* out);
size_t collect_group_avx512(const uint16_t* sums, uint64_t mask, float base, float inv,
                            uint32_t id0, float thr, uint64_t thr_id, float* out_s,
                            uint32_t* out_id);
#endif

// A binary heap over two parallel arrays (scores, ids) of capacity k whose root is the
// worst kept pair. The arrays are owned by the caller: they are the state that
// `topk_update_rows` carries from one block of brute-force scores to the next.
struct HeapView {
  float* s;
  uint32_t* id;
  size_t k;
  size_t size;

  // Lowest score that can still enter; -inf while not full.
  float threshold() const {
    return size < k ? -std::numeric_limits<float>::infinity() : s[0];
  }
  // NaN scores are taken as -inf (see the top of this file).
  void push(float score, uint32_t i);
  // Sorts the kept pairs best first, in place; the heap is unusable afterwards.
  void sort_best_first();
};

// Top-k by "collect, then select": pairs above the running threshold are appended to a
// buffer of max(2k + 16, 1024); when it fills, prune() drops the pairs below an estimate of the k-th
// best score (or, failing that, nth_element keeps exactly the best k) and raises the
// threshold to it. Amortised O(1) per accepted pair, against O(log k) sifts for a
// heap: this matters when k is the reorder depth (hundreds) and tens of thousands of
// points are offered.
//
// The result does not depend on the order pairs are offered in: it is the best k by
// `better` (ties at the k-th score go to the smaller ids) of all pairs pushed. Callers
// offer a pair only when admits() (which is what keeps them cheap), and admits() rejects
// only pairs that k buffered pairs beat: after an exact selection, ties at the threshold
// are admitted when their id is below the largest kept tie's; after an estimated prune,
// all ties at the estimate are. This is what lets a batch of queries scan their leaves in
// any order (leaf by leaf, several queries at once) with the results of one query at a
// time.
class TopKBuffer {
 public:
  // Pairs buffered for a given k (each takes about 18 bytes of the buffer's memory).
  // At least 1024: for small k, frequent exact selections of a few hundred pairs cost
  // more than the pushes a later threshold lets through. 2k (not 4k) above that: the
  // first threshold comes after half the pushes, and the later ones rise sooner, which
  // saved more pushes than the extra prunes cost (GloVe, reorder 500 ... 5,000: 0-7%
  // faster). Results do not depend on it.
  static size_t capacity_for(size_t k) { return std::max<size_t>(2 * k + 16, 1024); }
  void reset(size_t k) {
    k_ = k;
    cap_ = capacity_for(k);
    if (s_.size() < cap_ || id_.size() < cap_) {  // both: a bad_alloc may fall between
      grow(s_, cap_);
      grow(id_, cap_);
      // The selection's scratch at its largest now, not at some later prune: buffers kept
      // between searches then stop growing after the first one (a late reallocation
      // fragments the heap).
      bins_.reserve(cap_);
      edge_.reserve(cap_ + kCompactSlack);
      pairs_.reserve(k);
      tie_ids_.reserve(cap_);
    }
    size_ = 0;
    thr_ = -std::numeric_limits<float>::infinity();
    thr_id_ = 0;  // -inf itself is never admitted
  }
  // Pairs scoring below threshold() cannot enter; admits() decides the ties at it.
  float threshold() const { return thr_; }
  // False only for a pair that cannot be among the best k of all pairs pushed (callers
  // skip those; pushing one anyway is harmless). -inf is never admitted.
  bool admits(float score, uint32_t id) const {
    return score > thr_ || (score == thr_ && uint64_t{id} < thr_id_);
  }
  size_t k() const { return k_; }
  // With threshold(), what admits() decides by (for kernels that apply it themselves).
  uint64_t threshold_id() const { return thr_id_; }
  // Raises the threshold to t (ties at t stay admitted). Precondition: at least k
  // buffered pairs score at or above t.
  void raise_threshold(float t) {
    if (t > thr_) {
      thr_ = t;
      thr_id_ = kAllTies;
    }
  }
  // Appends the pair (pruning when the buffer fills). Precondition: score is not NaN
  // (see the top of this file; asserted in debug builds).
  void push(float score, uint32_t id) {
    assert(score == score);
    s_[size_] = score;
    id_[size_] = id;
    if (++size_ == cap_) prune();
  }
  // The most pairs one append() may add: an exact selection leaves room for cap - k >= 520
  // (capacity_for), so append() always finds it.
  static constexpr size_t kMaxAppend = 512;
  // Offers up to n <= kMaxAppend pairs at once, without a capacity check per pair:
  // fill(scores, ids) writes candidates at scores[0, n) and ids[0, n) and returns how
  // many of them, from the first, to keep; it keeps only pairs that admits() (a
  // branch-free count suits it: w += admits(v, id)). Prunes first when the buffer lacks
  // room for n, so the result is offer()'s for each pair.
  template <class Fill>
  void append(size_t n, Fill&& fill) {
    assert(n <= kMaxAppend);
    if (cap_ - size_ < n) {
      prune();
      if (cap_ - size_ < n) select_exact();
    }
    size_ += fill(s_.data() + size_, id_.data() + size_);
    assert(size_ <= cap_);
    if (size_ == cap_) prune();
  }
  // Pushes the pair if admits() it: how callers offer candidates.
  void offer(float score, uint32_t id) {
    if (admits(score, id)) push(score, id);
  }
  // Keeps the best min(k, size) pairs, in no particular order; returns how many.
  size_t finish_unsorted();
  // Keeps the best min(k, size) pairs, best first (ties: smaller id); returns how many.
  size_t finish_sorted();
  float score(size_t i) const { return s_[i]; }
  uint32_t id(size_t i) const { return id_[i]; }
  // Memory held (for callers that keep buffers between searches).
  size_t bytes() const {
    return s_.capacity() * sizeof(float) + id_.capacity() * sizeof(uint32_t) +
           bins_.capacity() * sizeof(uint16_t) + edge_.capacity() * sizeof(float) +
           pairs_.capacity() * sizeof(pairs_[0]) + tie_ids_.capacity() * sizeof(uint32_t);
  }

 private:
  void prune();
  void select_exact();
  // Scores and ids in separate arrays (not pairs): the passes over scores vectorise.
  std::vector<float> s_;
  std::vector<uint32_t> id_;
  std::vector<uint16_t> bins_;                 // select_exact's scratch
  std::vector<float> edge_;
  std::vector<std::pair<float, uint32_t>> pairs_;  // the final sort
  std::vector<uint32_t> tie_ids_;                  // select_exact: ids of the ties at t
  static constexpr uint64_t kAllTies = uint64_t{1} << 32;
  size_t k_ = 0, cap_ = 0, size_ = 0;
  float thr_ = 0;
  uint64_t thr_id_ = 0;  // ties at thr_ are admitted when their id is below it
};

// The k-th largest of v[0, n) (1 <= k <= n; no NaN in v), exactly and in O(n): a histogram over
// [min, max] narrows it to one bin, nth_element finishes on that bin's values. The two
// vectors are scratch memory the caller keeps between calls.
float kth_largest(const float* v, size_t n, size_t k, std::vector<uint16_t>& bins_scratch,
                  std::vector<float>& edge_scratch);

// Streams a block of scores into per-row heaps: for each row r < nq, the m scores
// scores[r*ld + j] (+ col_bias[j] when col_bias is non-null) are offered with id
// col_offset + j. heap_s/heap_id are nq*k arrays and sizes an nq array, all owned by
// the caller and carried from one block to the next (sizes start at 0).
// Preconditions: k >= 1, ld >= m, col_offset + m <= 2^32.
void topk_update_rows(const float* scores, size_t nq, size_t m, size_t ld,
                      const float* col_bias, uint32_t col_offset, size_t k,
                      float* heap_s, uint32_t* heap_id, int64_t* sizes, int num_threads);

// As topk_update_rows (no bias), offering to row r only the columns j whose bit
// col_offset + j is set in row r's bitset bits[r * words, (r + 1) * words) (bit b of word
// b / 64). The cost follows the set bits, not m: a sparse row skips its empty words.
// Preconditions: as topk_update_rows, col_offset % 64 == 0, col_offset + m <= 64 * words.
void topk_update_rows_masked(const float* scores, size_t nq, size_t m, size_t ld,
                             const uint64_t* bits, size_t words, uint32_t col_offset, size_t k,
                             float* heap_s, uint32_t* heap_id, int64_t* sizes, int num_threads);

// The best k (1 <= k <= m) of each column of a small (m, nq) score block, many columns
// at once: column r holds one query's scores of m candidates, candidate j has id j.
// Writes out_s/out_id, (nq, k), best first by `better` (NaN as -inf). A kernel (cpu.h):
// the same result at every SIMD level (topk_columns.h: compares and selects only).
using TopkColumnsFn = void (*)(const float* scores_t, size_t m, size_t nq, size_t k,
                               float* out_s, uint32_t* out_id);
void topk_columns_scalar(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                         uint32_t* out_id);
#if MIPSCAN_HAVE_AVX2
void topk_columns_avx2(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                       uint32_t* out_id);
#endif
#if MIPSCAN_HAVE_AVX512
void topk_columns_avx512(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                         uint32_t* out_id);
#endif

// Sorts each row's heap best first (rows with fewer than k entries keep their count).
void topk_finish_rows(size_t nq, size_t k, float* heap_s, uint32_t* heap_id,
                      const int64_t* sizes, int num_threads);

}  // namespace mipscan
