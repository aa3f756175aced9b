#include "search.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu.h"
#include "fault.h"
#include "lut16.h"
#include "parallel.h"
#include "portable.h"
#include "reorder.h"
#include "topk.h"

namespace mipscan {

namespace {

struct LeafKey {
  float s;
  uint32_t l;
};

// Quantized query LUT: score(point) ~= bias + sum(lut_u8) * inv_scale.
struct QuantLut {
  float bias = 0;
  float scale = 0;      // float units -> integer units; 0: every entry 0 (see build_lut)
  float inv_scale = 0;  // integer units -> float units
  bool exact = false;   // num_blocks > kMaxLut16Blocks: score from lut_f (scan_leaf_ah_exact)
};

// search_chunk's buffers (several queries, leaf by leaf): each query's searched leaves
// and their base scores (plan_start: nq + 1 offsets), its LUT doubled (lut16.h) and its
// scale; each leaf's queries (leaf_start: offsets by leaf, L + 1; job_*: the entries);
// the leaves in the order they are scanned; the kernel's outputs for kMultiQueries queries.
struct ChunkScratch {
  std::vector<uint32_t> plan_leaf;
  std::vector<float> plan_base;
  std::vector<size_t> plan_start;
  std::vector<uint8_t> luts2;
  std::vector<QuantLut> quant;
  std::vector<uint32_t> leaf_start;
  std::vector<uint32_t> job_query;
  std::vector<float> job_base;
  std::vector<uint32_t> scan_order;
  std::vector<uint16_t> sums;
  std::vector<uint64_t> masks;

  size_t bytes() const {
    auto b = [](const auto& v) { return v.capacity() * sizeof(v[0]); };
    return b(plan_leaf) + b(plan_base) + b(plan_start) + b(luts2) + b(quant) + b(leaf_start) +
           b(job_query) + b(job_base) + b(scan_order) + b(sums) + b(masks);
  }
};

}  // namespace

struct alignas(64) Scratch {  // aligned: workers' scratches never share a cache line
  std::vector<LeafKey> leaf_keys;
  std::vector<float> leaf_edge;  // kth_largest scratch for the leaf selection
  std::vector<uint16_t> leaf_bins;
  std::vector<float> leaf_scores;
  std::vector<float> leaf_rank;  // ranks_by_spread(): the order key of each leaf
  float rank_w = 0;              // ranks_by_spread(): spread_weight * |q| of this query
  float rank_qq = 0;             // ranks_by_axes(): |q|^2 of this query
  std::vector<float> axes_q;     // ranks_by_axes(): a_lj . q of a range of leaves
  std::vector<float> chunk_axes;  // ranks_by_axes(): a_lj . q of every leaf, a chunk's queries
  const float* pre_axes = nullptr;  // this query's row of chunk_axes (null: computed per range)
  std::vector<float> chunk_scores;  // centroid scores of a chunk of queries
  std::vector<uint32_t> leaf_order;
  std::vector<uint64_t> leaf_radix;  // radix_order_leaves: two buffers of L keys
  std::vector<uint8_t> leaf_bucket;  // rough_order_selected: each selected leaf's bucket
  std::vector<float> qpad;
  std::vector<float> lut_f;
  std::vector<uint8_t> lut_u8;
  std::vector<uint16_t> sums;
  std::vector<uint64_t> masks;
  std::vector<uint32_t> histogram;
  std::vector<uint32_t> rows;
  std::vector<float> row_scores;
  std::vector<uint32_t> hash;
  std::vector<std::pair<float, uint32_t>> pairs;
  std::vector<uint64_t> taken;  // completing a short result: rows already in it
  std::vector<uint64_t> allow;  // filtered search: eligible entries of a leaf, per 64-group
  std::vector<uint64_t> qbits;  // filtered search: a query's list as a bitset (kept all 0)
  std::vector<float> qfold;     // the query times int8 scales (reorder.h)
  std::vector<float> upper_scores;   // upper tree: node scores
  std::vector<uint32_t> upper_pick;  // upper tree: nodes by score
  std::vector<uint8_t> scored;       // upper tree: leaf l's score was computed
  std::vector<float> tile;           // score_all_slots: a tile of the chunk's scores
  std::vector<TopKBuffer> chunk_top;  // score_all_slots, search_chunk: each query's candidates
  ChunkScratch chunk;                 // search_chunk
  TopKBuffer candidates;
  TopKBuffer final_;

  size_t bytes() const {
    auto b = [](const auto& v) { return v.capacity() * sizeof(v[0]); };
    return sizeof(Scratch) + b(leaf_keys) + b(leaf_edge) + b(leaf_bins) + b(leaf_scores) + b(leaf_rank) + b(axes_q) + b(chunk_axes) +
           b(chunk_scores) + b(leaf_order) + b(leaf_radix) + b(leaf_bucket) + b(qpad) + b(lut_f) + b(lut_u8) + b(sums) +
           b(masks) + b(histogram) + b(rows) + b(row_scores) + b(hash) + b(pairs) + b(taken) +
           b(allow) + b(qbits) + b(qfold) + b(upper_scores) + b(upper_pick) + b(scored) +
           b(tile) + b(chunk_top) + chunk.bytes() + candidates.bytes() + final_.bytes() + [this] {
             size_t t = 0;
             for (const TopKBuffer& c : chunk_top) t += c.bytes();
             return t;
           }();
  }
};

ScratchCache::ScratchCache() { free_.reserve(kMaxCached); }
ScratchCache::~ScratchCache() = default;

std::unique_ptr<Scratch> ScratchCache::take() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      std::unique_ptr<Scratch> s = std::move(free_.back());
      free_.pop_back();
      return s;
    }
  }
  fault::alloc();
  return std::make_unique<Scratch>();
}

void ScratchCache::give(std::unique_ptr<Scratch> s) noexcept {
  if (s == nullptr || s->bytes() > kKeepBytes) return;  // freed here
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.size() < kMaxCached) free_.push_back(std::move(s));  // never reallocates
}

size_t ScratchCache::cached_count() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_.size();
}

size_t ScratchCache::cached_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t total = 0;
  for (const auto& s : free_) total += s->bytes();
  return total;
}

namespace {

// One working thread's scratch for one search_batch call: taken from the cache on first
// use, given back when the call ends. When the call ends by an exception (bad_alloc in
// the middle of growing a buffer), the scratch is freed instead: it need not be
// consistent.
class ScratchLease {
 public:
  explicit ScratchLease(ScratchCache& cache)
      : cache_(&cache), exceptions_(std::uncaught_exceptions()) {}
  ScratchLease(ScratchLease&& o) noexcept
      : cache_(o.cache_), exceptions_(o.exceptions_), s_(std::move(o.s_)) {}
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ScratchLease& operator=(ScratchLease&&) = delete;
  ~ScratchLease() {
    if (std::uncaught_exceptions() == exceptions_) cache_->give(std::move(s_));
  }
  Scratch& get() {
    if (s_ == nullptr) s_ = cache_->take();
    return *s_;
  }

 private:
  ScratchCache* cache_;
  int exceptions_;
  std::unique_ptr<Scratch> s_;
};

// The smallest integer sum whose score, base + sum * inv_scale as the scans compute it in
// float, reaches thr: the scan kernels' cut, below which no point of the leaf can be
// admitted (the ties at thr itself are the buffer's to decide, by id). Exact, not
// estimated, so that which points are offered never depends on float rounding of the
// cut, only on the threshold: scores are monotone in the sum, so a guess from the
// inverse, checked and, when off, a binary search over the 16-bit sums.
uint16_t lut16_cut(float thr, float base, const QuantLut& ql) {
  if (!(thr > -INFINITY) || ql.scale <= 0) return 0;
  const float inv = ql.inv_scale;
  auto reaches = [&](uint32_t sum) { return base + static_cast<float>(sum) * inv >= thr; };
  const double x = std::floor(double(thr - base) * ql.scale);
  const uint32_t g = !(x > 0) ? 0u : (x >= 65535 ? 65535u : static_cast<uint32_t>(x));  // NaN -> 0
  uint32_t lo, hi;  // the answer is in [lo, hi], and hi reaches (or hi = 65535)
  if (reaches(g)) {
    if (g == 0 || !reaches(g - 1)) return static_cast<uint16_t>(g);
    lo = 0;
    hi = g - 1;
  } else {
    if (g == 65535 || reaches(g + 1)) return static_cast<uint16_t>(g == 65535 ? g : g + 1);
    lo = g + 2;
    hi = 65535;
  }
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (reaches(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return static_cast<uint16_t>(hi);
}

QuantLut build_lut(const IndexView& ix, const float* q, Scratch& s) {
  const size_t nb = ix.num_blocks, dpb = ix.dims_per_block;
  grow_fill(s.qpad, nb * dpb, 0.f);  // the query, zero padded to whole blocks
  std::copy(q, q + ix.d, s.qpad.begin());
  grow(s.lut_f, nb * 16);
  grow_fill(s.lut_u8, nb * 16, uint8_t{0});
  QuantLut out;
  // More blocks than the uint8 LUT allows (lut16.h): the raw dot products are the table,
  // summed in double by scan_leaf_ah_exact (no bias: a float sum of 65,536 block minima
  // would lose digits to cancellation).
  out.exact = nb > kMaxLut16Blocks;
  float max_range = 0;
  for (size_t b = 0; b < nb; ++b) {
    // Sixteen independent sums over the block's dimensions: vectorises over codewords.
    float acc[16] = {0};
    const float* book = ix.codebooks + b * 16 * dpb;
    for (size_t j = 0; j < dpb; ++j) {
      const float qj = s.qpad[b * dpb + j];
      for (size_t c = 0; c < 16; ++c) acc[c] += qj * book[c * dpb + j];
    }
    if (out.exact) {
      std::copy(acc, acc + 16, s.lut_f.begin() + static_cast<std::ptrdiff_t>(b * 16));
      continue;
    }
    float lo = acc[0], hi = acc[0];
    for (size_t c = 1; c < 16; ++c) {
      lo = std::min(lo, acc[c]);
      hi = std::max(hi, acc[c]);
    }
    out.bias += lo;
    for (size_t c = 0; c < 16; ++c) s.lut_f[b * 16 + c] = acc[c] - lo;
    max_range = std::max(max_range, hi - lo);
  }
  if (out.exact) return out;
  // Largest entry such that nb entries still sum within 16 bits (see lut16.h).
  const float cap = static_cast<float>(lut_cap(nb));
  // max_range > 0 is false for NaN. A spread so large that a sum (<= 65535) times
  // inv_scale could overflow (inf or huge codebooks or query), or so small that the scale
  // overflows, leaves scale = 0 and every entry 0: scores are then the leaf's base score,
  // finite or not. So sum * inv_scale is always finite, and base + it never NaN.
  if (max_range > 0) {
    out.scale = cap / max_range;
    out.inv_scale = max_range / cap;
    if (!(std::isfinite(out.scale) && out.inv_scale > 0 && std::isfinite(out.inv_scale * 65535.f))) {
      out.scale = out.inv_scale = 0;
      return out;
    }
    // Branch-free, through local pointers (a byte store may alias anything, so indexing
    // the vectors reloaded their data pointers at every entry and nothing vectorised).
    const float* __restrict lf = s.lut_f.data();
    uint8_t* __restrict lu = s.lut_u8.data();
    const float sc = out.scale;
    for (size_t i = 0; i < nb * 16; ++i) {
      float v = lf[i] * sc + 0.5f;  // >= 0.5: truncation rounds to nearest
      v = v < cap ? v : cap;        // NaN -> cap
      v = v >= 0 ? v : 0.f;
      lu[i] = static_cast<uint8_t>(static_cast<int>(v));
    }
  }
  return out;
}

// out[r] = q . row r of an int8 (with per-dimension and per-row scales) or bf16 array of
// m rows: the quantized kernels of reorder.h. Leaves the folded query in s.qfold.
void quantized_dots(const int8_t* i8, const uint16_t* bf16, const float* scales,
                    const float* row_scales, size_t m, size_t d, const Kernels& kn,
                    const float* q, Scratch& s, float* out) {
  if (i8 != nullptr) {
    grow(s.qfold, d);
    fold_scales(q, scales, d, s.qfold.data());
    for (size_t r = 0; r < m; ++r) out[r] = kn.dot_i8(s.qfold.data(), i8 + r * d, d) * row_scales[r];
  } else {
    for (size_t r = 0; r < m; ++r) out[r] = kn.dot_bf16(q, bf16 + r * d, d);
  }
}

// The order key of leaves [a, b) from their scores: the score plus the query's share of
// the leaf's spread (IndexView::leaf_spread), or the score itself. No NaN (-inf instead),
// whatever the arrays hold: the selection and sorts need a total order.
void rank_leaf_range(const IndexView& ix, const Kernels& kn, const float* q, size_t a, size_t b,
                     Scratch& s) {
  if (!ix.ranks_by_spread()) return;
  const float* sc = s.leaf_scores.data();
  float* rk = s.leaf_rank.data();
  if (!ix.ranks_by_axes()) {
    for (size_t l = a; l < b; ++l) rk[l] = no_nan(sc[l] + s.rank_w * ix.leaf_spread[l]);
    return;
  }
  // a_lj . q for up to kAxesLeaves leaves at a time (one many-rows dot call).
  constexpr size_t kAxesLeaves = 64;
  const size_t d = ix.d, r = ix.axes_rank;
  grow(s.axes_q, std::min(b - a, kAxesLeaves) * r);
  for (size_t c = a; c < b; c += kAxesLeaves) {
    const size_t e = std::min(b, c + kAxesLeaves);
    if (s.pre_axes == nullptr) kn.dots(q, 1, ix.leaf_axes + c * r * d, (e - c) * r, d, s.axes_q.data());
    for (size_t l = c; l < e; ++l) {
      const float* t = s.pre_axes != nullptr ? s.pre_axes + l * r : s.axes_q.data() + (l - c) * r;
      float var = s.rank_qq * ix.leaf_spread[l] * ix.leaf_spread[l];
      for (size_t j = 0; j < r; ++j) var += t[j] * t[j];
      // A NaN (a bad array, an inf query) ranks the leaf by its score alone.
      rk[l] = no_nan(sc[l] + ix.spread_weight * (var > 0 ? std::sqrt(var) : 0.f));
    }
  }
}

// The scores that order the leaves (see rank_leaf_range).
inline const float* leaf_keys_of(const IndexView& ix, const Scratch& s) {
  return ix.ranks_by_spread() ? s.leaf_rank.data() : s.leaf_scores.data();
}

// Scores of leaves [a, b) into s.leaf_scores (float32 or quantized centroids).
void score_leaf_range(const IndexView& ix, const Kernels& kn, const float* q, size_t a,
                      size_t b, Scratch& s) {
  float* sc = s.leaf_scores.data();
  if (ix.quantized_centroids()) {
    quantized_dots(ix.centroids_i8 ? ix.centroids_i8 + a * ix.d : nullptr,
                   ix.centroids_bf16 ? ix.centroids_bf16 + a * ix.d : nullptr, ix.centroid_scales,
                   ix.centroid_row_scales ? ix.centroid_row_scales + a : nullptr, b - a, ix.d, kn, q,
                   s, sc + a);
  } else {
    kn.dots(q, 1, ix.centroids + a * ix.d, b - a, ix.d, sc + a);
  }
  for (size_t l = a; l < b; ++l) {
    sc[l] = no_nan(sc[l]);
    s.scored[l] = 1;
  }
  rank_leaf_range(ix, kn, q, a, b, s);
}

// Upper tree: scores the upper nodes, then the children of the best `upper` of them; the
// other leaves get -inf (and scored[l] = 0) until widening needs them. Returns how many
// leaves were scored.
size_t score_upper_tree(const IndexView& ix, const Kernels& kn, const float* q, size_t upper,
                        Scratch& s) {
  const size_t U = ix.num_upper, L = ix.num_leaves;
  grow(s.upper_scores, U);
  grow(s.upper_pick, U);
  grow_fill(s.scored, L, uint8_t{0});
  std::fill(s.leaf_scores.begin(), s.leaf_scores.begin() + static_cast<std::ptrdiff_t>(L), -INFINITY);
  if (ix.ranks_by_spread())
    std::fill(s.leaf_rank.begin(), s.leaf_rank.begin() + static_cast<std::ptrdiff_t>(L), -INFINITY);
  kn.dots(q, 1, ix.upper_centroids, U, ix.d, s.upper_scores.data());
  for (size_t u = 0; u < U; ++u) {
    s.upper_scores[u] = no_nan(s.upper_scores[u]);
    s.upper_pick[u] = static_cast<uint32_t>(u);
  }
  const float* us = s.upper_scores.data();
  upper = std::min(std::max<size_t>(upper, 1), U);
  std::partial_sort(s.upper_pick.begin(), s.upper_pick.begin() + static_cast<std::ptrdiff_t>(upper),
                    s.upper_pick.begin() + static_cast<std::ptrdiff_t>(U),
                    [us](uint32_t a, uint32_t b) { return better(us[a], a, us[b], b); });
  size_t scored = 0;
  for (size_t i = 0; i < upper; ++i) {
    const uint32_t u = s.upper_pick[i];
    const size_t a = static_cast<size_t>(ix.upper_offsets[u]), b = static_cast<size_t>(ix.upper_offsets[u + 1]);
    score_leaf_range(ix, kn, q, a, b, s);
    scored += b - a;
  }
  return scored;
}

// A 32-bit key whose unsigned order is the descending order of the scores (no NaN here:
// -inf instead); -0.0 is folded into +0.0, which better() takes as equal.
inline uint32_t descending_key(float v) {
  v += 0.0f;  // -0.0 + 0.0 = +0.0
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);  // unsigned order = float order
  return ~u;
}

// s.leaf_order = every leaf by (score desc, index asc), as better() orders them: a stable
// LSD radix sort (8 bits a pass) of the keys, from index order. For selections that are a
// sizeable share of the leaves, where it is cheaper than kth_largest plus a comparison
// sort (branch-free passes instead of mispredicted compares).
void radix_order_leaves(const float* sc, size_t L, Scratch& s) {
  grow(s.leaf_radix, 2 * L);
  uint64_t* a = s.leaf_radix.data();
  uint64_t* b = a + L;
  for (size_t l = 0; l < L; ++l) a[l] = (uint64_t{descending_key(sc[l])} << 32) | l;
  for (unsigned shift = 32; shift < 64; shift += 8) {
    uint32_t count[256] = {};
    for (size_t l = 0; l < L; ++l) ++count[(a[l] >> shift) & 255];
    if (count[(a[0] >> shift) & 255] == L) continue;  // one digit for all: order unchanged
    uint32_t sum = 0;
    for (uint32_t& c : count) {
      const uint32_t n = c;
      c = sum;
      sum += n;
    }
    for (size_t l = 0; l < L; ++l) b[count[(a[l] >> shift) & 255]++] = a[l];
    std::swap(a, b);
  }
  grow(s.leaf_order, L);
  for (size_t l = 0; l < L; ++l) s.leaf_order[l] = static_cast<uint32_t>(a[l]);
}

// How select_leaves orders the leaves it selects. Which leaves are selected never depends
// on it: only the order they are scanned in. That order decides the results only where
// a search may stop before scanning them all (filtered searches: kExact); elsewhere the
// candidate buffer's result is the same in any order (topk.h), and the order only decides
// how soon the threshold rises, i.e. how many points are offered.
enum class LeafOrder {
  kExact,      // by (score desc, index asc)
  kRough,      // best first by score bucket (1/64 of the selection's score range), index
               // order within a bucket: one counting pass instead of a sort
  kBestFirst,  // the best leaf first, the others in no particular order (search_chunk)
};

// The selected leaves s.leaf_keys[0, first) into s.leaf_order[0, first) in LeafOrder::kRough
// order. Keys are not NaN; infinite keys, or a range that is not finite, take the end
// buckets or all one bucket (then index order), which is still a valid order.
void rough_order_selected(size_t first, Scratch& s) {
  constexpr size_t kBuckets = 64;
  const LeafKey* keys = s.leaf_keys.data();
  float lo = keys[0].s, hi = keys[0].s;
  for (size_t l = 1; l < first; ++l) {
    lo = std::min(lo, keys[l].s);
    hi = std::max(hi, keys[l].s);
  }
  const float range = hi - lo;
  const float scale = range > 0 && std::isfinite(range) ? static_cast<float>(kBuckets - 1) / range : 0.f;
  grow(s.leaf_bucket, s.leaf_keys.size());  // all leaves' worth: grows once
  uint8_t* bucket = s.leaf_bucket.data();
  uint32_t start[kBuckets] = {};
  for (size_t l = 0; l < first; ++l) {
    float f = (hi - keys[l].s) * scale;
    f = f > 0.f ? f : 0.f;  // NaN (inf - inf, or inf * 0): the first bucket
    f = f < static_cast<float>(kBuckets - 1) ? f : static_cast<float>(kBuckets - 1);
    bucket[l] = static_cast<uint8_t>(f);
    ++start[bucket[l]];
  }
  uint32_t sum = 0;
  for (uint32_t& c : start) {
    const uint32_t n = c;
    c = sum;
    sum += n;
  }
  for (size_t l = 0; l < first; ++l) s.leaf_order[start[bucket[l]]++] = keys[l].l;
}

// Returns the number of leaves to search first: `first`, or fewer when an upper tree
// scored fewer leaves than that (the rest come by widening), in s.leaf_order[0, first)
// as `order` says. The leaves past them follow, sorted when LeafOrder::kExact sorted all
// leaves, else in index order (sort_remaining_leaves sorts them if ever needed).
size_t select_leaves(const IndexView& ix, const Kernels& kn, const float* q,
                     const float* precomputed, size_t first, size_t upper, Scratch& s,
                     LeafOrder order) {
  const size_t L = ix.num_leaves;
  grow(s.leaf_scores, L);
  float* sc = s.leaf_scores.data();
  if (ix.ranks_by_spread()) {
    grow(s.leaf_rank, L);
    const float qq = kn.dot(q, q, ix.d);  // |q|^2 by the dispatched dot kernel
    // Finite and >= 0 (an inf or NaN query ranks by score alone; its scores say little).
    const float w = ix.spread_weight * std::sqrt(qq);
    s.rank_w = std::isfinite(w) ? w : 0.f;
    s.rank_qq = std::isfinite(w) ? qq : 0.f;
  }
  if (precomputed == nullptr && ix.num_upper > 0) {
    first = std::min(first, score_upper_tree(ix, kn, q, upper, s));
  } else if (precomputed != nullptr) {
    for (size_t l = 0; l < L; ++l) sc[l] = no_nan(precomputed[l]);
  } else if (ix.quantized_centroids()) {
    quantized_dots(ix.centroids_i8, ix.centroids_bf16, ix.centroid_scales, ix.centroid_row_scales, L,
                   ix.d, kn, q, s, sc);
    for (size_t l = 0; l < L; ++l) sc[l] = no_nan(sc[l]);
  } else {
    kn.dots(q, 1, ix.centroids, L, ix.d, sc);
    for (size_t l = 0; l < L; ++l) sc[l] = no_nan(sc[l]);
  }
  if (precomputed != nullptr || ix.num_upper == 0) rank_leaf_range(ix, kn, q, 0, L, s);
  // From here on the keys hold no NaN (-inf instead), so they are totally ordered:
  // the selection, the sorts and the widening below see a consistent order.
  const float* key = leaf_keys_of(ix, s);
  if (order == LeafOrder::kExact && first * 8 >= L && L <= (size_t{1} << 31)) {
    // A sizeable share of the leaves: sort them all (the order below, with the
    // unselected ones sorted already; sort_remaining_leaves sorts them again if needed).
    radix_order_leaves(key, L, s);
    return first;
  }
  // The first-th best score (kth_largest: a histogram, then nth_element on one bin); then
  // the leaves above it, and ties at it by leaf index, are the selection, sorted by
  // (score desc, index asc). The unselected leaves follow in index order (sorted only if
  // ever needed).
  grow(s.leaf_keys, L);
  size_t w = 0;
  if (first < L) {
    const float kth = kth_largest(key, L, first, s.leaf_bins, s.leaf_edge);
    size_t above = 0;
    for (size_t l = 0; l < L; ++l) above += key[l] > kth;
    size_t ties = first - above;
    size_t rest = first;
    for (size_t l = 0; l < L; ++l) {
      const float v = key[l];
      const LeafKey lk{v, static_cast<uint32_t>(l)};
      // Exactly `first` keys qualify; the bounds on w and rest are only a guard that keeps
      // every write inside leaf_keys (and leaf_order a permutation) whatever happens.
      if (((v > kth || (v == kth && ties > 0)) && w < first) || rest == L) {
        if (v == kth && ties > 0) --ties;
        s.leaf_keys[w++] = lk;
      } else {
        s.leaf_keys[rest++] = lk;
      }
    }
  } else {
    for (size_t l = 0; l < L; ++l) s.leaf_keys[l] = {key[l], static_cast<uint32_t>(l)};
  }
  grow(s.leaf_order, L);
  if (order == LeafOrder::kExact) {
    std::sort(s.leaf_keys.begin(), s.leaf_keys.begin() + first,
              [](const LeafKey& a, const LeafKey& b) { return better(a.s, a.l, b.s, b.l); });
  } else if (order == LeafOrder::kBestFirst) {
    size_t best = 0;
    for (size_t l = 1; l < first; ++l)
      if (better(s.leaf_keys[l].s, s.leaf_keys[l].l, s.leaf_keys[best].s, s.leaf_keys[best].l)) best = l;
    std::swap(s.leaf_keys[0], s.leaf_keys[best]);
  }
  const bool rough = order == LeafOrder::kRough && first > 1;
  if (rough) rough_order_selected(first, s);
  for (size_t l = rough ? first : 0; l < L; ++l) s.leaf_order[l] = s.leaf_keys[l].l;
  return first;
}

// Sorts the leaves past `first` (only needed when the searched ones held too few points).
// With an upper tree, the leaves not scored yet are scored first.
void sort_remaining_leaves(const IndexView& ix, const Kernels& kn, const float* q,
                           const float* precomputed, size_t first, Scratch& s) {
  if (ix.num_upper > 0 && precomputed == nullptr) {
    for (size_t l = 0; l < ix.num_leaves; ++l)
      if (!s.scored[l]) score_leaf_range(ix, kn, q, l, l + 1, s);
  }
  const float* sc = leaf_keys_of(ix, s);
  std::sort(s.leaf_order.begin() + first, s.leaf_order.end(),
            [sc](uint32_t a, uint32_t b) { return better(sc[a], a, sc[b], b); });
}

inline bool bit_set(const uint64_t* bits, uint32_t row) {
  return ((bits[row >> 6] >> (row & 63)) & 1u) != 0;
}

inline bool is_dead(const IndexView& ix, uint32_t row) { return bit_set(ix.dead, row); }

// One query's filter (FilterSpec, resolved): a row may enter when allowed by `allow` (null:
// all) and not named by `deny` (null: none). Dead rows are the live layout's business.
struct QueryFilter {
  const uint64_t* allow = nullptr;
  const uint64_t* deny = nullptr;
  bool ok(uint32_t row) const {
    return (allow == nullptr || bit_set(allow, row)) && (deny == nullptr || !bit_set(deny, row));
  }
};

// The result handler's half of filtering: per group of kGroup entries of a leaf, the mask
// of its eligible entries (allowed, and live in a live index); returns how many there are.
// The scan's candidate masks are ANDed with these, so an ineligible entry is never offered.
template <class RowAt>
size_t allow_masks(const IndexView& ix, const QueryFilter& f, size_t count, RowAt row_at,
                   Scratch& s) {
  const size_t groups = num_groups(count);
  if (s.allow.size() < groups) grow(s.allow, groups);
  // Branch-free per entry (a random filter would mispredict every other branch): a set
  // bit of `allow` and clear bits of `deny` and `dead`; an absent bitset reads a constant.
  static const uint64_t kOnes = ~uint64_t{0}, kZero = 0;
  const uint64_t* A = f.allow != nullptr ? f.allow : &kOnes;
  const uint64_t* D = f.deny != nullptr ? f.deny : &kZero;
  const uint64_t* X = ix.dead != nullptr ? ix.dead : &kZero;
  const uint32_t ma = f.allow != nullptr ? ~0u : 0u;  // word index masks: 0 reads the constant
  const uint32_t md = f.deny != nullptr ? ~0u : 0u;
  const uint32_t mx = ix.dead != nullptr ? ~0u : 0u;
  size_t total = 0;
  for (size_t g = 0; g < groups; ++g) {
    const size_t lim = std::min(kGroup, count - g * kGroup);
    uint64_t m = 0;
    for (size_t j = 0; j < lim; ++j) {
      const uint32_t row = row_at(g * kGroup + j);
      const uint32_t w = row >> 6, b = row & 63;
      const uint64_t ok = (A[w & ma] & ~D[w & md] & ~X[w & mx]) >> b;
      m |= (ok & 1u) << j;
    }
    s.allow[g] = m;
    total += popcount64(m);
  }
  return total;
}

// Scans return the number of eligible entries of the leaf when kF (filtered), else 0.
template <bool kF>
size_t scan_leaf_ah(const IndexView& ix, const Kernels& kn, size_t leaf, float base,
                  const QuantLut& ql, Scratch& s, TopKBuffer& top, const QueryFilter& f) {
  const size_t bytes = group_bytes(ix.num_blocks);
  const int64_t g0 = ix.leaf_groups[leaf], g1 = ix.leaf_groups[leaf + 1];
  const int64_t slot0 = ix.leaf_offsets[leaf];
  const size_t count = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - slot0);
  if (count == 0) return 0;
  size_t eligible = 0;
  if constexpr (kF) {
    const uint32_t* ids = ix.slot_ids + slot0;
    eligible = allow_masks(ix, f, count, [ids](size_t i) { return ids[i]; }, s);
    if (eligible == 0) return 0;
  }
  const size_t groups = static_cast<size_t>(g1 - g0);
  if (s.sums.size() < groups * kGroup || s.masks.size() < groups) {
    grow(s.sums, groups * kGroup);
    grow(s.masks, groups);
  }
  // Integer filter: the kernel flags the points whose sum reaches the cut (lut16_cut:
  // exactly those whose score reaches the threshold). The threshold changes only when a
  // push prunes the buffer, and the kernel's masks are made with the cut at the start of
  // each chunk of kChunk groups, so each flagged point is checked against the buffer
  // (admits) as it is offered.
  constexpr size_t kChunk = 32;
  const uint8_t* codes = ix.packed_codes + static_cast<size_t>(g0) * bytes;
  uint16_t* sums = s.sums.data();
  for (size_t c0 = 0, c1 = 0; c0 < groups; c0 = c1) {
    // While nothing bounds the scores yet (no threshold), scan a few groups at a time so
    // the first threshold arrives early.
    c1 = std::min(groups, c0 + (top.threshold() > -INFINITY ? kChunk : 1));
    kn.scan_lut16(codes + c0 * bytes, c1 - c0, ix.num_blocks, s.lut_u8.data(),
                  lut16_cut(top.threshold(), base, ql), sums + c0 * kGroup, s.masks.data() + c0);
    for (size_t g = c0; g < c1; ++g) {
      uint64_t m = s.masks[g];
      if constexpr (kF) m &= s.allow[g];
      if (m == 0) continue;
      if (g + 1 == groups && count % kGroup != 0) {
        m &= (uint64_t{1} << (count % kGroup)) - 1;  // not the padding points
      }
      const uint32_t id0 = static_cast<uint32_t>(slot0 + static_cast<int64_t>(g * kGroup));
      top.append(kGroup, [&](float* ds, uint32_t* di) {
        return kn.collect_group(sums + g * kGroup, m, base, ql.inv_scale, id0, top.threshold(),
                                top.threshold_id(), ds, di);
      });
    }
  }
  return eligible;
}

// The first leaf searched, when it alone holds more than k points: instead of offering
// all of them (and pruning the buffer repeatedly), find the k-th largest integer sum with
// a histogram and offer only the points at or above it. Its score then bounds the final
// k-th score from below and becomes the threshold for every later leaf.
void scan_first_leaf_ah(const IndexView& ix, const Kernels& kn, size_t leaf, float base,
                        const QuantLut& ql, Scratch& s, TopKBuffer& top) {
  const int64_t g0 = ix.leaf_groups[leaf];
  const int64_t slot0 = ix.leaf_offsets[leaf];
  const size_t count = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - slot0);
  const size_t groups = num_groups(count);
  if (s.sums.size() < groups * kGroup || s.masks.size() < groups) {
    grow(s.sums, groups * kGroup);
    grow(s.masks, groups);
  }
  kn.scan_lut16(ix.packed_codes + static_cast<size_t>(g0) * group_bytes(ix.num_blocks),
                groups, ix.num_blocks, s.lut_u8.data(), 0, s.sums.data(), s.masks.data());
  const uint16_t* sums = s.sums.data();
  // The histogram spans only the sums present ([low, top], usually far narrower than
  // 0 .. 63 * num_blocks), and the walk starts at the top.
  uint16_t top_sum = 0, low_sum = 65535;
  for (size_t i = 0; i < count; ++i) {
    top_sum = std::max(top_sum, sums[i]);
    low_sum = std::min(low_sum, sums[i]);
  }
  grow_fill(s.histogram, size_t{top_sum} - low_sum + 1, 0u);
  uint32_t* hist = s.histogram.data();  // hist[v - low_sum]: how many points sum to v
  for (size_t i = 0; i < count; ++i) ++hist[sums[i] - low_sum];
  size_t above = 0, t = top_sum;  // count > k: the walk stops at or above low_sum
  while (above + hist[t - low_sum] < top.k()) above += hist[t-- - low_sum];
  // The points at or above t: the kernel again, now with cut t, for its masks (the same
  // sums again). Walking the set bits beats testing every sum with a branch that
  // mispredicts about once per pushed point (seed candidates: 2,700 points, ~250 pushed).
  kn.scan_lut16(ix.packed_codes + static_cast<size_t>(g0) * group_bytes(ix.num_blocks),
                groups, ix.num_blocks, s.lut_u8.data(), static_cast<uint16_t>(t), s.sums.data(),
                s.masks.data());
  for (size_t g = 0; g < groups; ++g) {
    for (uint64_t m = s.masks[g]; m != 0; m &= m - 1) {
      const size_t i = g * kGroup + static_cast<size_t>(ctz64(m));
      if (i >= count) break;  // padding points of the last group
      top.push(base + static_cast<float>(sums[i]) * ql.inv_scale,
               static_cast<uint32_t>(slot0 + static_cast<int64_t>(i)));
    }
  }
  top.raise_threshold(base + (static_cast<float>(t) - 0.5f) * ql.inv_scale);
}

// Indexes with more than kMaxLut16Blocks blocks (lut16.h): each point's score exactly,
// base + the sum (in double, block order) of its codewords' dot products with the query.
template <bool kF>
size_t scan_leaf_ah_exact(const IndexView& ix, size_t leaf, float base, const Scratch& s,
                        TopKBuffer& top, const QueryFilter& f) {
  const size_t nb = ix.num_blocks, bytes = group_bytes(nb);
  const int64_t slot0 = ix.leaf_offsets[leaf];
  const size_t count = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - slot0);
  const uint8_t* codes = ix.packed_codes + static_cast<size_t>(ix.leaf_groups[leaf]) * bytes;
  const float* lut = s.lut_f.data();
  size_t eligible = 0;
  for (size_t i = 0; i < count; ++i) {
    if constexpr (kF) {
      if (!f.ok(ix.slot_ids[slot0 + static_cast<int64_t>(i)])) continue;
      ++eligible;
    }
    const uint8_t* grp = codes + (i / kGroup) * bytes;
    double sum = 0;
    for (size_t b = 0; b < nb; ++b) sum += lut[b * 16 + code_at(grp, b, i % kGroup)];
    const float v = static_cast<float>(base + sum);
    const uint32_t slot = static_cast<uint32_t>(slot0 + static_cast<int64_t>(i));
    top.offer(v, slot);
  }
  return eligible;
}

template <bool kF>
size_t scan_leaf_float(const IndexView& ix, const Kernels& kn, size_t leaf, const float* q,
                       TopKBuffer& top, const QueryFilter& f) {
  const int64_t a = ix.leaf_offsets[leaf], b = ix.leaf_offsets[leaf + 1];
  const size_t d = ix.d;
  auto scan = [&](auto dot_at) {  // dot_at(slot)
    size_t eligible = 0;
    for (int64_t slot = a; slot < b; ++slot) {
      if constexpr (kF) {
        if (!f.ok(ix.slot_ids[slot])) continue;
        ++eligible;
      }
      const float v = dot_at(static_cast<size_t>(slot));
      const uint32_t id = static_cast<uint32_t>(slot);
      top.offer(v, id);
    }
    return eligible;
  };
  // With int8 slots, q is the query folded with their scales (search_one).
  if (ix.slot_i8 != nullptr) {
    return scan([&](size_t i) { return kn.dot_i8(q, ix.slot_i8 + i * d, d) * ix.slot_row_scales[i]; });
  }
  if (ix.slot_bf16 != nullptr) return scan([&](size_t i) { return kn.dot_bf16(q, ix.slot_bf16 + i * d, d); });
  return scan([&](size_t i) { return kn.dot(q, ix.slot_rows + i * d, d); });
}

// ---- Live index (IndexView's live fields, live.h): leaves are segments, candidates are
// rows, and dead rows are skipped where candidates are offered (the result handling, not
// the scan kernels), so a tombstoned entry never takes a slot.
inline uint32_t row_of(const IndexView& ix, uint32_t id) {
  return ix.leaf_rows != nullptr ? id : ix.slot_ids[id];
}

template <bool kF>
size_t scan_leaf_ah_live(const IndexView& ix, const Kernels& kn, size_t leaf, float base,
                       const QuantLut& ql, Scratch& s, TopKBuffer& top, const QueryFilter& f) {
  const size_t bytes = group_bytes(ix.num_blocks);
  const size_t count = ix.leaf_sizes[leaf];
  if (ix.leaf_live[leaf] == 0) return 0;
  size_t eligible = 0;
  if constexpr (kF) {
    const uint32_t* lrows = ix.leaf_rows[leaf];
    eligible = allow_masks(ix, f, count, [lrows](size_t i) { return lrows[i]; }, s);
    if (eligible == 0) return 0;
  }
  const size_t groups = num_groups(count);
  if (s.sums.size() < groups * kGroup || s.masks.size() < groups) {
    grow(s.sums, groups * kGroup);
    grow(s.masks, groups);
  }
  // As scan_leaf_ah (same integer cut, same chunking), offering rows.
  constexpr size_t kChunk = 32;
  const uint8_t* codes = ix.leaf_codes[leaf];
  const uint32_t* rows = ix.leaf_rows[leaf];
  uint16_t* sums = s.sums.data();
  for (size_t c0 = 0, c1 = 0; c0 < groups; c0 = c1) {
    c1 = std::min(groups, c0 + (top.threshold() > -INFINITY ? kChunk : 1));
    kn.scan_lut16(codes + c0 * bytes, c1 - c0, ix.num_blocks, s.lut_u8.data(),
                  lut16_cut(top.threshold(), base, ql), sums + c0 * kGroup, s.masks.data() + c0);
    for (size_t g = c0; g < c1; ++g) {
      uint64_t m = s.masks[g];
      if constexpr (kF) m &= s.allow[g];  // eligible: allowed and live
      while (m != 0) {
        const size_t i = g * kGroup + static_cast<size_t>(ctz64(m));
        m &= m - 1;
        if (i >= count) break;
        if (!kF && is_dead(ix, rows[i])) continue;
        const float v = base + static_cast<float>(sums[i]) * ql.inv_scale;
        top.offer(v, rows[i]);
      }
    }
  }
  return eligible;
}

template <bool kF>
size_t scan_leaf_ah_exact_live(const IndexView& ix, size_t leaf, float base, const Scratch& s,
                             TopKBuffer& top, const QueryFilter& f) {
  const size_t nb = ix.num_blocks, bytes = group_bytes(nb);
  const size_t count = ix.leaf_sizes[leaf];
  const uint8_t* codes = ix.leaf_codes[leaf];
  const uint32_t* rows = ix.leaf_rows[leaf];
  const float* lut = s.lut_f.data();
  size_t eligible = 0;
  for (size_t i = 0; i < count; ++i) {
    if (is_dead(ix, rows[i])) continue;
    if constexpr (kF) {
      if (!f.ok(rows[i])) continue;
      ++eligible;
    }
    const uint8_t* grp = codes + (i / kGroup) * bytes;
    double sum = 0;
    for (size_t b = 0; b < nb; ++b) sum += lut[b * 16 + code_at(grp, b, i % kGroup)];
    const float v = static_cast<float>(base + sum);
    top.offer(v, rows[i]);
  }
  return eligible;
}

template <bool kF>
size_t scan_leaf_float_live(const IndexView& ix, const Kernels& kn, size_t leaf, const float* q,
                          TopKBuffer& top, const QueryFilter& f) {
  const size_t count = ix.leaf_sizes[leaf];
  const uint32_t* rows = ix.leaf_rows[leaf];
  size_t eligible = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint32_t row = rows[i];
    if (is_dead(ix, row)) continue;
    if constexpr (kF) {
      if (!f.ok(row)) continue;
      ++eligible;
    }
    const float v = kn.dot(q, ix.row_data + size_t{row} * ix.d, ix.d);
    top.offer(v, row);
  }
  return eligible;
}

// Spilled indexes hold a datapoint in two leaves, so the candidates (slots) may name a
// row twice. Keeps each row once, with its best approximate score: rows[0, u) and
// row_scores[0, u); returns u. Open addressing on the row id, sized to the candidates.
size_t unique_rows(const IndexView& ix, const TopKBuffer& cand, size_t nc, Scratch& s) {
  grow(s.rows, nc);
  grow(s.row_scores, nc);
  size_t cap = 16;
  while (cap < 2 * nc) cap *= 2;
  grow_fill(s.hash, cap, 0u);  // 0 = empty, else position + 1 in rows
  size_t u = 0;
  for (size_t i = 0; i < nc; ++i) {
    const uint32_t row = row_of(ix, cand.id(i));
    const float v = cand.score(i);
    size_t h = (static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> 40;
    for (;; ++h) {
      uint32_t& e = s.hash[h & (cap - 1)];
      if (e == 0) {
        e = static_cast<uint32_t>(u + 1);
        s.rows[u] = row;
        s.row_scores[u] = v;
        ++u;
        break;
      }
      if (s.rows[e - 1] == row) {
        s.row_scores[e - 1] = std::max(s.row_scores[e - 1], v);
        break;
      }
    }
  }
  return u;
}

// Keeps the best k of the nr candidate rows (by approximate score) in rows[0, k).
size_t keep_best_rows(size_t k, size_t nr, Scratch& s) {
  grow(s.pairs, nr);
  for (size_t i = 0; i < nr; ++i) s.pairs[i] = {s.row_scores[i], s.rows[i]};
  std::nth_element(s.pairs.begin(), s.pairs.begin() + (k - 1), s.pairs.end(),
                   [](const auto& a, const auto& b) { return better(a.first, a.second, b.first, b.second); });
  for (size_t i = 0; i < k; ++i) {
    s.row_scores[i] = s.pairs[i].first;
    s.rows[i] = s.pairs[i].second;
  }
  return k;
}

// Completes a result that holds only nf < k rows (possible only when scores were NaN or
// -inf, which no candidate buffer accepts): first with the candidate rows it lacks, then
// with the smallest rows it lacks, each scored -inf and ordered by id, so that it holds k
// distinct rows < n (k <= n). Returns k.
size_t complete_result(const IndexView& ix, size_t k, size_t nf, size_t nr, Scratch& s,
                       uint32_t* out_ids, float* out_scores) {
  // A hash set of the rows taken (row + 1; 0 = empty), sized for the k it will hold.
  size_t cap = 16;
  while (cap < 2 * k) cap *= 2;
  grow_fill(s.taken, cap, uint64_t{0});
  auto insert = [&](uint32_t row) {  // false when already taken
    size_t h = (static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> 40;
    for (;; ++h) {
      uint64_t& e = s.taken[h & (cap - 1)];
      if (e == 0) {
        e = uint64_t{row} + 1;
        return true;
      }
      if (e == uint64_t{row} + 1) return false;
    }
  };
  for (size_t i = 0; i < nf; ++i) insert(out_ids[i]);
  const size_t start = nf;
  for (size_t i = 0; i < nr && nf < k; ++i) {
    if (insert(s.rows[i])) out_ids[nf++] = s.rows[i];
  }
  const bool live = ix.leaf_rows != nullptr;
  for (size_t row = 0; row < (live ? ix.num_rows : ix.n) && nf < k; ++row) {
    if (live && is_dead(ix, static_cast<uint32_t>(row))) continue;
    if (insert(static_cast<uint32_t>(row))) out_ids[nf++] = static_cast<uint32_t>(row);
  }
  std::sort(out_ids + start, out_ids + nf);
  for (size_t i = start; i < nf; ++i) out_scores[i] = -INFINITY;
  return nf;
}

// Gives the scratch the capacity any query of these parameters may need, so that it stops
// growing after its first query instead of reallocating at random later ones (which would
// fragment the heap of whichever thread happened to run that query). A capacity check per
// buffer once it is warm.
void reserve_for(const IndexView& ix, size_t keep, Scratch& s) {
  if (s.rows.capacity() >= keep && s.leaf_edge.capacity() >= ix.num_leaves + kCompactSlack &&
      (ix.num_blocks == 0 || s.masks.capacity() >= num_groups(ix.max_leaf_size))) {
    return;
  }
  fault::alloc();
  s.leaf_edge.reserve(ix.num_leaves + kCompactSlack);
  s.leaf_bins.reserve(ix.num_leaves);
  s.rows.reserve(keep);
  s.row_scores.reserve(keep);
  if (ix.num_slots > ix.n) {
    size_t cap = 16;
    while (cap < 2 * keep) cap *= 2;
    s.hash.reserve(cap);
    s.pairs.reserve(keep);
  }
  if (ix.num_blocks != 0) {
    s.sums.reserve(num_groups(ix.max_leaf_size) * kGroup);
    s.masks.reserve(num_groups(ix.max_leaf_size));
  }
}

// Exact scores of rows against a query: from float32 rows, or from an int8 (with the
// query folded by its scales, reorder.h) or bfloat16 copy. One of f32 / i8 / bf16 is set.
struct RowScorer {
  const Kernels* kn = nullptr;
  const float* q = nullptr;  // the folded query for int8
  size_t d = 0;
  const float* f32 = nullptr;
  const int8_t* i8 = nullptr;
  const uint16_t* bf16 = nullptr;
  const float* row_scales = nullptr;  // with i8

  // For the reorder of a static index: its reorder rows, whichever type they are.
  static RowScorer reorder(const IndexView& ix, const Kernels& kn, const float* q, Scratch& s) {
    RowScorer r{&kn, q, ix.d, ix.reorder_rows, ix.reorder_i8, ix.reorder_bf16, ix.reorder_row_scales};
    if (r.i8 != nullptr) r.fold(ix.reorder_scales, s);
    return r;
  }
  void fold(const float* scales, Scratch& s) {
    grow(s.qfold, d);
    fold_scales(q, scales, d, s.qfold.data());
    q = s.qfold.data();
  }
  size_t row_bytes() const { return d * (f32 != nullptr ? sizeof(float) : i8 != nullptr ? 1 : 2); }
  const char* at(uint32_t row) const {
    const char* base = f32 != nullptr ? reinterpret_cast<const char*>(f32)
                       : i8 != nullptr ? reinterpret_cast<const char*>(i8)
                                       : reinterpret_cast<const char*>(bf16);
    return base + size_t{row} * row_bytes();
  }
  float operator()(uint32_t row) const {
    if (f32 != nullptr) return kn->dot(q, f32 + size_t{row} * d, d);
    if (i8 != nullptr) return kn->dot_i8(q, i8 + size_t{row} * d, d) * row_scales[row];
    return kn->dot_bf16(q, bf16 + size_t{row} * d, d);
  }
};

// Rows the exact plan requests ahead of the one it scores.
constexpr size_t kExactAhead = 8;

// Requests every cache line of a row (the last byte too: a row that is not line aligned
// may end in one more line).
inline void prefetch_row(const RowScorer& score, uint32_t row) {
  const size_t row_bytes = score.row_bytes();
  const char* r = score.at(row);
  for (size_t off = 0; off < row_bytes; off += 64) prefetch(r + off);
  prefetch(r + row_bytes - 1);
}

// A filtered query's plan for search_one<true>: its filter, its eligible row count.
struct QueryPlan {
  QueryFilter f;
  size_t eligible = 0;
  float leaf_exponent = 0.5f;
};

// How deep a query searches, given the rows it may return (avail >= 1): its results,
// the candidates to take (distinct datapoints), and the slots to keep: with spilling, a
// row may fill two slots, so 2 * cand_k slots are kept to be sure of cand_k distinct rows.
struct Depth {
  size_t final_k, cand_k, keep;
};
Depth depth(const IndexView& ix, const SearchParams& p, size_t avail) {
  const size_t final_k = std::min(p.final_k, avail);
  const size_t cand_k = std::min(avail, ix.reorders() ? std::max(p.pre_reorder_k, final_k) : final_k);
  const size_t keep =
      ix.num_slots > ix.n
          ? std::min(ix.num_slots, std::max(static_cast<size_t>(std::ceil(p.overretrieve * double(cand_k))),
                                            2 * final_k))
          : cand_k;
  return {final_k, cand_k, keep};
}

// Returns the results written: final_k, or (filtered) min(final_k, eligible rows).
template <bool kF>
size_t search_one(const IndexView& ix, const Kernels& kn, const float* q,
                const float* precomputed, const SearchParams& p, Scratch& s,
                uint32_t* out_ids, float* out_scores, const QueryPlan* plan,
                TopKBuffer* given = nullptr) {
  const bool reorder = ix.reorders();
  // Rows that may be returned: all (n) or the eligible ones.
  const size_t avail = kF ? std::min(ix.n, plan->eligible) : ix.n;
  if (kF && avail == 0) return 0;
  const Depth dp = depth(ix, p, avail);
  const size_t final_k = dp.final_k, cand_k = dp.cand_k, keep = dp.keep;
  const bool spilled = ix.num_slots > ix.n;
  const size_t L = ix.num_leaves;
  size_t first = std::min(std::max<size_t>(p.leaves_to_search, 1), L);  // scored first
  const size_t need = keep;  // entries to have offered before stopping (eligible ones if kF)
  size_t seen = 0;  // entries scanned so far (eligible ones if kF): every one was offered
  QueryFilter f;
  // Filtered: leaves count by their eligible share (eff: the sum over scanned leaves of
  // eligible entries / entries), and the search goes on until eff reaches
  // leaves_to_search * frac^(1 - exponent) (frac: the eligible share of all rows). A
  // random filter then scans leaves_to_search * frac^-exponent leaves (its eligible rows
  // are spread thinly); a filter whose rows sit in a few leaves far from the query scans
  // past the leaves without eligible rows and then about as many eligible-rich leaves as
  // an unfiltered search would: what keeps recall when allowed rows are far away.
  double eff = 0, eff_target = 0;
  if constexpr (kF) {
    f = plan->f;
    const double frac = static_cast<double>(avail) / static_cast<double>(ix.n);
    const double a = static_cast<double>(plan->leaf_exponent);
    eff_target = static_cast<double>(first) * std::pow(frac, 1.0 - a);
    const double scaled = std::ceil(static_cast<double>(first) * std::pow(frac, -a));
    first = !(scaled < static_cast<double>(L)) ? L : std::max(first, static_cast<size_t>(scaled));
  }
  auto done = [&](size_t r) {
    return kF ? (seen >= need && eff >= eff_target) : (r + 1 >= first && seen >= need);
  };
  reserve_for(ix, keep, s);
  TopKBuffer& cand = s.candidates;
  if (given != nullptr) {  // scored already (score_all_slots): keep of them
    std::swap(cand, *given);
  } else {
    first = select_leaves(ix, kn, q, precomputed, first, p.upper_to_search, s,
                          kF ? LeafOrder::kExact : LeafOrder::kRough);

    cand.reset(keep);
    QuantLut ql;
    const bool ah = ix.packed_codes != nullptr || (ix.leaf_codes != nullptr && ix.num_blocks > 0);
    const bool live = ix.leaf_rows != nullptr;
    if (ah) ql = build_lut(ix, q, s);
    // The query the float scan scores with: folded with the int8 slot scales (reorder.h).
    const float* q_scan = q;
    if (!ah && ix.slot_i8 != nullptr) {
      grow(s.qfold, ix.d);
      fold_scales(q, ix.slot_scales, ix.d, s.qfold.data());
      q_scan = s.qfold.data();
    }
    for (size_t r = 0; r < L; ++r) {
      if (r == first) {
        if (kF ? done(r) : seen >= need) break;
        sort_remaining_leaves(ix, kn, q, precomputed, first, s);  // too few so far: widen
      }
      const uint32_t leaf = s.leaf_order[r];
      if (live) {  // widening counts live (and eligible) entries only: k such rows give k results
        const float base = no_nan(s.leaf_scores[leaf] + ql.bias);
        size_t e;
        if (!ah) {
          e = scan_leaf_float_live<kF>(ix, kn, leaf, q, cand, f);
        } else if (ql.exact) {
          e = scan_leaf_ah_exact_live<kF>(ix, leaf, base, s, cand, f);
        } else {
          e = scan_leaf_ah_live<kF>(ix, kn, leaf, base, ql, s, cand, f);
        }
        seen += kF ? e : ix.leaf_live[leaf];
        if constexpr (kF) {
          if (ix.leaf_sizes[leaf] > 0) eff += static_cast<double>(e) / ix.leaf_sizes[leaf];
        }
        if (done(r)) break;
        continue;
      }
      const size_t size = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - ix.leaf_offsets[leaf]);
      // No NaN may reach a TopKBuffer (topk.h). The AH scans push base + sum * inv_scale
      // unchecked: with base not NaN (inf + -inf is, hence no_nan) and inv_scale finite and
      // >= 0 (build_lut), no score is NaN. The float and exact scans, and the final loop
      // below, push only scores the buffer admits, which NaN never is.
      const float base = no_nan(s.leaf_scores[leaf] + ql.bias);
      size_t e = 0;
      if (!ah) {
        e = scan_leaf_float<kF>(ix, kn, leaf, q_scan, cand, f);
      } else if (ql.exact) {
        e = scan_leaf_ah_exact<kF>(ix, leaf, base, s, cand, f);
      } else if (!kF && r == 0 && size > keep && ql.scale > 0) {
        scan_first_leaf_ah(ix, kn, leaf, base, ql, s, cand);
      } else {
        e = scan_leaf_ah<kF>(ix, kn, leaf, base, ql, s, cand, f);
      }
      seen += kF ? e : size;
      if constexpr (kF) {
        if (size > 0) eff += static_cast<double>(e) / static_cast<double>(size);
      }
      if (done(r)) break;
    }
  }
  const size_t nc = cand.finish_unsorted();
  size_t nr = nc;  // candidate rows: s.rows / s.row_scores
  if (spilled) {
    nr = unique_rows(ix, cand, nc, s);
    if (nr > cand_k) nr = keep_best_rows(cand_k, nr, s);
  } else {
    grow(s.rows, nc);
    grow(s.row_scores, nc);
    for (size_t i = 0; i < nc; ++i) {
      s.rows[i] = row_of(ix, cand.id(i));
      s.row_scores[i] = cand.score(i);
    }
  }

  TopKBuffer& fin = s.final_;
  fin.reset(final_k);
  if (reorder) {
    // The reorder rows are random accesses: request every row first, so that many cache
    // misses are in flight at once, then rescore. (The last byte too: a row that is not
    // line aligned may end in one more line.)
    const RowScorer score = RowScorer::reorder(ix, kn, q, s);
    for (size_t i = 0; i < nr; ++i) prefetch_row(score, s.rows[i]);
    if (score.f32 != nullptr) {
      // Float32 rows: every exact score first, several rows at a time (dot_rows gives
      // each exactly as kn.dot does), into row_scores (the approximate scores are not
      // needed any more); then the same pushes in the same order.
      kn.dot_rows(score.q, score.f32, ix.d, s.rows.data(), nr, s.row_scores.data());
      for (size_t i = 0; i < nr; ++i) {
        const float v = s.row_scores[i];
        fin.offer(v, s.rows[i]);
      }
    } else {
      for (size_t i = 0; i < nr; ++i) {
        const uint32_t row = s.rows[i];
        const float v = score(row);
        fin.offer(v, row);
      }
    }
  } else {
    for (size_t i = 0; i < nr; ++i) {
      const float v = s.row_scores[i];
      fin.offer(v, s.rows[i]);
    }
  }
  const size_t nf = fin.finish_sorted();
  for (size_t i = 0; i < nf; ++i) {
    out_ids[i] = fin.id(i);
    out_scores[i] = fin.score(i);
  }
  if (!kF && nf < p.final_k) return complete_result(ix, p.final_k, nf, nr, s, out_ids, out_scores);
  return nf;
}

// Whether search_chunk can take a chunk of this index's queries: a static index scored by
// the LUT16 scan, unfiltered.
bool chunk_scans(const IndexView& ix) {
  return ix.packed_codes != nullptr && ix.leaf_rows == nullptr && ix.num_blocks > 0 &&
         ix.num_blocks <= kMaxLut16Blocks;
}

// Searches nq queries of a static AH index (chunk_scans) together, with the results of
// search_one for each (search_batch): each query's leaves are chosen as search_one would
// (the same selection and widening), then every leaf any of them searches is scanned
// once for all the queries that search it (kn.scan_lut16_multi, up to kMultiQueries per
// pass over its codes), and each query's candidates are finished by search_one. That
// the candidates are the same whatever order the leaves come in is TopKBuffer's
// guarantee (topk.h), and the integer cut is exact (lut16_cut); so the leaves are
// selected unsorted (select_leaves' ordered = false: no sort of the selection, measured
// 3-10% faster here on GloVe) and scanned in rounds, round r taking the r-th leaf of each
// query not scanned yet. Each query's best leaf comes first (scanned alone when larger
// than its candidates: scan_first_leaf_ah's histogram), so its threshold rises early.
// pre: the chunk's centroid scores (nq * L) or null; axes: the chunk's leaf axes
// products or null.
void search_chunk(const IndexView& ix, const Kernels& kn, const float* qs, size_t nq,
                  const float* pre, const float* axes, const SearchParams& p, Scratch& s,
                  uint32_t* out_ids, float* out_scores) {
  const size_t L = ix.num_leaves, d = ix.d, nb = ix.num_blocks, bytes = group_bytes(nb);
  const size_t lb = lut16_double_bytes(nb);
  const size_t keep = depth(ix, p, ix.n).keep;
  const size_t first0 = std::min(std::max<size_t>(p.leaves_to_search, 1), L);
  if (s.chunk_top.size() < nq) {
    fault::alloc();
    s.chunk_top.resize(nq);
  }
  ChunkScratch& c = s.chunk;
  grow(c.plan_start, nq + 1);
  grow(c.luts2, nq * lb);
  grow(c.quant, nq);
  size_t np = 0;  // plan entries
  c.plan_start[0] = 0;
  for (size_t i = 0; i < nq; ++i) {
    const float* q = qs + i * d;
    const float* pre_i = pre != nullptr ? pre + i * L : nullptr;
    s.pre_axes = axes != nullptr ? axes + i * L * ix.axes_rank : nullptr;
    const QuantLut ql = build_lut(ix, q, s);
    lut16_double(s.lut_u8.data(), nb, c.luts2.data() + i * lb);
    c.quant[i] = ql;
    TopKBuffer& top = s.chunk_top[i];
    top.reset(keep);
    // search_one's leaves: the first ones, then more (best first) until keep entries.
    const size_t first = select_leaves(ix, kn, q, pre_i, first0, p.upper_to_search, s,
                                       LeafOrder::kBestFirst);
    size_t seen = 0;
    for (size_t r = 0; r < L; ++r) {
      if (r == first) {
        if (seen >= keep) break;
        sort_remaining_leaves(ix, kn, q, pre_i, first, s);
      }
      const uint32_t leaf = s.leaf_order[r];
      const size_t size = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - ix.leaf_offsets[leaf]);
      const float base = no_nan(s.leaf_scores[leaf] + ql.bias);
      if (r == 0 && size > keep && ql.scale > 0) {
        scan_first_leaf_ah(ix, kn, leaf, base, ql, s, top);
      } else {
        if (c.plan_leaf.size() <= np) {
          grow(c.plan_leaf, std::max<size_t>(2 * np, 64));
          grow(c.plan_base, c.plan_leaf.size());
        }
        c.plan_leaf[np] = leaf;
        c.plan_base[np] = base;
        ++np;
      }
      seen += size;
      if (r + 1 >= first && seen >= keep) break;
    }
    c.plan_start[i + 1] = np;
  }
  s.pre_axes = nullptr;
  // Each leaf's entries (query, base), by leaf, and the order the leaves are scanned in.
  grow_fill(c.leaf_start, L + 1, 0u);
  grow(c.job_query, np);
  grow(c.job_base, np);
  grow(c.scan_order, std::min(np, L));
  size_t nl = 0;  // leaves to scan
  for (size_t r = 0, more = 1; more != 0; ++r) {
    more = 0;
    for (size_t i = 0; i < nq; ++i) {
      const size_t at = c.plan_start[i] + r;
      if (at >= c.plan_start[i + 1]) continue;
      more = 1;
      const uint32_t leaf = c.plan_leaf[at];
      if (c.leaf_start[leaf + 1]++ == 0) c.scan_order[nl++] = leaf;
    }
  }
  for (size_t l = 0; l < L; ++l) c.leaf_start[l + 1] += c.leaf_start[l];
  for (size_t i = 0; i < nq; ++i) {  // fill, moving leaf_start[l] to the end of leaf l - 1's
    for (size_t at = c.plan_start[i]; at < c.plan_start[i + 1]; ++at) {
      const uint32_t j = c.leaf_start[c.plan_leaf[at]]++;
      c.job_query[j] = static_cast<uint32_t>(i);
      c.job_base[j] = c.plan_base[at];
    }
  }
  // leaf_start[l] is now the end of leaf l's entries, and leaf l's begin is leaf_start[l - 1].
  constexpr size_t kChunkGroups = 32;  // at most 32: one bit per group in a uint32_t below
  grow(c.sums, kMultiQueries * kChunkGroups * kGroup);
  grow(c.masks, kMultiQueries * kChunkGroups);
  for (size_t o = 0; o < nl; ++o) {
    const uint32_t leaf = c.scan_order[o];
    const size_t j0 = leaf == 0 ? 0 : c.leaf_start[leaf - 1], j1 = c.leaf_start[leaf];
    const int64_t slot0 = ix.leaf_offsets[leaf];
    const size_t count = static_cast<size_t>(ix.leaf_offsets[leaf + 1] - slot0);
    const size_t groups = num_groups(count);
    const uint8_t* codes = ix.packed_codes + static_cast<size_t>(ix.leaf_groups[leaf]) * bytes;
    for (size_t j = j0; j < j1; j += kMultiQueries) {
      const size_t nt = std::min(kMultiQueries, j1 - j);
      const uint8_t* luts[kMultiQueries];
      uint16_t cuts[kMultiQueries];
      uint16_t* sums[kMultiQueries];
      uint64_t* masks[kMultiQueries];
      for (size_t t = 0; t < nt; ++t) {
        luts[t] = c.luts2.data() + c.job_query[j + t] * lb;
        sums[t] = c.sums.data() + t * kChunkGroups * kGroup;
        masks[t] = c.masks.data() + t * kChunkGroups;
      }
      for (size_t c0 = 0; c0 < groups; c0 += kChunkGroups) {
        const size_t c1 = std::min(groups, c0 + kChunkGroups);
        for (size_t t = 0; t < nt; ++t) {
          const uint32_t i = c.job_query[j + t];
          cuts[t] = lut16_cut(s.chunk_top[i].threshold(), c.job_base[j + t], c.quant[i]);
        }
        kn.scan_lut16_multi(codes + c0 * bytes, c1 - c0, nb, nt, luts, cuts, sums, masks);
        // Each query's flagged points, group by group: the groups with any (most have
        // none) found branch-free first, then each group's admitted points appended to
        // the buffer at once (kn.collect_group, TopKBuffer::append: no capacity check
        // per point).
        for (size_t t = 0; t < nt; ++t) {
          const uint32_t i = c.job_query[j + t];
          TopKBuffer& top = s.chunk_top[i];
          const float base = c.job_base[j + t], inv = c.quant[i].inv_scale;
          const uint64_t* mk = masks[t];
          uint32_t any = 0;
          for (size_t g = 0; g < c1 - c0; ++g) any |= static_cast<uint32_t>(mk[g] != 0) << g;
          for (; any != 0; any &= any - 1) {
            const size_t gc = ctz32(any), g = c0 + gc;
            uint64_t m = mk[gc];
            if (g + 1 == groups && count % kGroup != 0) {
              m &= (uint64_t{1} << (count % kGroup)) - 1;  // not the padding points
            }
            const uint16_t* gs = sums[t] + gc * kGroup;
            const uint32_t id0 = static_cast<uint32_t>(slot0 + static_cast<int64_t>(g * kGroup));
            top.append(kGroup, [&](float* ds, uint32_t* di) {
              return kn.collect_group(gs, m, base, inv, id0, top.threshold(), top.threshold_id(),
                                      ds, di);
            });
          }
        }
      }
    }
  }
  for (size_t i = 0; i < nq; ++i) {
    search_one<false>(ix, kn, qs + i * d, nullptr, p, s, out_ids + i * p.final_k,
                      out_scores + i * p.final_k, nullptr, &s.chunk_top[i]);
  }
}

// score_brute_force without a tree, in float32 (a static index): every slot is scored
// for a chunk of queries at once, tile by tile, by kn.dots, which reads each row once
// per four queries and gives the same values as kn.dot one query at a time (so results
// do not depend on chunking: search_one then finishes each query from its buffer).
bool scores_all_slots(const IndexView& ix) {
  return ix.num_leaves == 1 && ix.packed_codes == nullptr && ix.slot_rows != nullptr &&
         ix.leaf_rows == nullptr && ix.num_slots == ix.n;
}

// Fills s.chunk_top[0, nq) with each query's best `keep` slots.
void score_all_slots(const IndexView& ix, const Kernels& kn, const float* qs, size_t nq,
                     size_t keep, Scratch& s) {
  constexpr size_t kTile = 256;
  if (s.chunk_top.size() < nq) {
    fault::alloc();
    s.chunk_top.resize(nq);
  }
  for (size_t i = 0; i < nq; ++i) s.chunk_top[i].reset(keep);
  grow(s.tile, nq * kTile);
  const size_t d = ix.d;
  for (size_t r0 = 0; r0 < ix.num_slots; r0 += kTile) {
    const size_t m = std::min(kTile, ix.num_slots - r0);
    kn.dots(qs, nq, ix.slot_rows + r0 * d, m, d, s.tile.data());
    for (size_t i = 0; i < nq; ++i) {
      TopKBuffer& top = s.chunk_top[i];
      const float* sc = s.tile.data() + i * m;
      for (size_t r = 0; r < m; ++r) {
        const uint32_t slot = static_cast<uint32_t>(r0 + r);
        top.offer(sc[r], slot);
      }
    }
  }
}

// The exact plan: every eligible row scored exactly by `score` (rows in row order), the
// best final_k kept. Eligible: with an allow list (list), the list's rows
// marked in `deny` (here: the marks of its eligible rows); otherwise the rows of the row
// space passing allow and not in deny. Dead rows never.
size_t search_exact(const IndexView& ix, const RowScorer& score, const uint64_t* allow, const uint64_t* deny, const uint32_t* list,
                    size_t list_n, const uint32_t* shared_rows, size_t shared_n, size_t final_k,
                    Scratch& s, uint32_t* out_ids, float* out_scores) {
  if (final_k == 0) return 0;
  TopKBuffer& fin = s.final_;
  fin.reset(final_k);
  const uint64_t* dead = ix.dead;
  if (list != nullptr) {
    // marks: the list's eligible rows as a bitset (search_batch_filtered); each is cleared
    // when scored, so a row named twice is scored once and the bitset ends all zero.
    uint64_t* marks = const_cast<uint64_t*>(deny);
    // Random rows: keep several cache misses in flight, for every line of the row (a
    // 50-float row spans four; prefetching only the first left three misses per row:
    // 120 ns a row on GloVe-50).
    for (size_t i = 0; i < std::min(list_n, kExactAhead); ++i) prefetch_row(score, list[i]);
    for (size_t i = 0; i < list_n; ++i) {
      if (i + kExactAhead < list_n) prefetch_row(score, list[i + kExactAhead]);
      const uint32_t row = list[i];
      if (!bit_set(marks, row)) continue;
      marks[row >> 6] &= ~(uint64_t{1} << (row & 63));
      const float v = score(row);
      fin.offer(v, row);
    }
  } else if (shared_rows != nullptr) {  // the rows of allow, listed: skip the bitset walk
    for (size_t i = 0; i < std::min(shared_n, kExactAhead); ++i) prefetch_row(score, shared_rows[i]);
    for (size_t i = 0; i < shared_n; ++i) {
      if (i + kExactAhead < shared_n) prefetch_row(score, shared_rows[i + kExactAhead]);
      const uint32_t row = shared_rows[i];
      if ((dead != nullptr && bit_set(dead, row)) || (deny != nullptr && bit_set(deny, row))) continue;
      const float v = score(row);
      fin.offer(v, row);
    }
  } else {
    const size_t space = dead != nullptr ? ix.num_rows : ix.n;
    for (size_t w = 0; w * 64 < space; ++w) {
      uint64_t m = allow != nullptr ? allow[w] : ~uint64_t{0};
      if (dead != nullptr) m &= ~dead[w];
      if (deny != nullptr) m &= ~deny[w];
      if (space - w * 64 < 64) m &= (uint64_t{1} << (space - w * 64)) - 1;
      while (m != 0) {
        const uint32_t row = static_cast<uint32_t>(w * 64 + ctz64(m));
        m &= m - 1;
        const float v = score(row);
        fin.offer(v, row);
      }
    }
  }
  const size_t nf = fin.finish_sorted();
  for (size_t i = 0; i < nf; ++i) {
    out_ids[i] = fin.id(i);
    out_scores[i] = fin.score(i);
  }
  return nf;
}

}  // namespace

void search_batch(const IndexView& index, ScratchCache& cache, const Kernels& kn,
                  const float* queries, size_t nq, const float* leaf_scores,
                  const SearchParams& params, int num_threads, uint32_t* out_ids,
                  float* out_scores) {
  // Chunks of 8 queries handed out dynamically: query costs vary (leaf sizes, widening)
  // and so does the speed of the cores. Where queries are scanned together (search_chunk)
  // chunks are larger, up to 32 while each thread still gets two: more queries then share
  // each leaf. Each working thread leases a scratch from the index's cache on its first
  // chunk and returns it when the call ends.
  // The candidate buffers of a chunk scanned together take up to kMultiBytes, so a deep
  // search (pre_reorder_k in the tens of thousands) scans fewer queries together, and one
  // whose buffers alone exceed it searches one query at a time.
  constexpr size_t kChunk = 8, kMultiChunk = 32, kMultiBytes = size_t{4} << 20;
  const size_t per_query = TopKBuffer::capacity_for(depth(index, params, index.n).keep) * 20;
  const size_t sub = std::min(kMultiChunk, kMultiBytes / per_query);
  const bool multi = chunk_scans(index) && sub >= 2;
  const size_t threads = static_cast<size_t>(num_threads > 0 ? num_threads : hardware_threads());
  const size_t grain = multi ? std::clamp<size_t>(nq / (2 * threads), kChunk, sub) : kChunk;
  const size_t parts = dynamic_parts(nq, num_threads, grain);
  ScratchLease first(cache);       // part 0: the calling thread
  std::vector<ScratchLease> more;  // parts 1.. (none for one query: no allocation)
  if (parts > 1) {
    fault::alloc();
    more.reserve(parts - 1);
    for (size_t w = 1; w < parts; ++w) more.emplace_back(cache);
  }
  const size_t L = index.num_leaves;
  const bool all_slots = scores_all_slots(index);
  // Slots kept per query there: the candidates search_one would keep (no spilling).
  const size_t all_keep = std::min(index.n, index.reorders() ? std::max(params.pre_reorder_k, params.final_k)
                                                             : params.final_k);
  // One sub-chunk [b, e) of a thread's queries.
  auto search_sub = [&](size_t b, size_t e, Scratch& s) {
    const float* chunk_scores = leaf_scores ? leaf_scores + b * L : nullptr;
    if (chunk_scores == nullptr && e - b > 1 && !index.quantized_centroids() && index.num_upper == 0) {
      // The chunk's centroid scores in one pass over the centroids (the same values the
      // per-query kernel gives, so results do not depend on how queries are chunked).
      grow(s.chunk_scores, (e - b) * L);
      kn.dots(queries + b * index.d, e - b, index.centroids, L, index.d, s.chunk_scores.data());
      chunk_scores = s.chunk_scores.data();
    }
    // The leaf axes' products too (the same values per query: one read of the axes per
    // chunk instead of one per query).
    const size_t r = index.axes_rank;
    const bool chunk_axes = e - b > 1 && index.ranks_by_axes() && index.num_upper == 0;
    if (chunk_axes) {
      grow(s.chunk_axes, (e - b) * L * r);
      kn.dots(queries + b * index.d, e - b, index.leaf_axes, L * r, index.d, s.chunk_axes.data());
    }
    if (multi && e - b > 1) {
      search_chunk(index, kn, queries + b * index.d, e - b, chunk_scores,
                   chunk_axes ? s.chunk_axes.data() : nullptr, params, s,
                   out_ids + b * params.final_k, out_scores + b * params.final_k);
      return;
    }
    for (size_t i = b; i < e; ++i) {
      s.pre_axes = chunk_axes ? s.chunk_axes.data() + (i - b) * L * r : nullptr;
      search_one<false>(index, kn, queries + i * index.d,
                        chunk_scores ? chunk_scores + (i - b) * L : nullptr, params, s,
                        out_ids + i * params.final_k, out_scores + i * params.final_k, nullptr);
    }
    s.pre_axes = nullptr;
  };
  parallel_for_dynamic(nq, num_threads, grain, [&](size_t b, size_t e, int w) {
    Scratch& s = w == 0 ? first.get() : more[static_cast<size_t>(w - 1)].get();
    if (all_slots && e - b > 1) {
      score_all_slots(index, kn, queries + b * index.d, e - b, all_keep, s);
      for (size_t i = b; i < e; ++i) {
        search_one<false>(index, kn, queries + i * index.d, nullptr, params, s,
                          out_ids + i * params.final_k, out_scores + i * params.final_k, nullptr,
                          &s.chunk_top[i - b]);
      }
      return;
    }
    // A thread's range in sub-chunks (one thread gets the whole batch as its range): the
    // chunk's buffers (centroid scores, candidates, LUTs) then stay small, in cache and
    // within the scratch cache's bound, whatever the batch.
    const size_t step = multi ? sub : kMultiChunk;
    for (size_t c0 = b; c0 < e; c0 += step) search_sub(c0, std::min(e, c0 + step), s);
  });
}

void filter_bitsets(size_t nq, size_t space, const uint64_t* allow, const uint64_t* dead,
                    const int64_t* list_offsets, const uint32_t* list_rows, bool list_excludes,
                    uint64_t* out, int64_t* out_counts, int num_threads) {
  const size_t words = (space + 63) / 64;
  parallel_for(nq, num_threads, 8, [&](size_t b, size_t e, int) {
    for (size_t i = b; i < e; ++i) {
      uint64_t* o = out + i * words;
      const uint32_t* list = list_rows + list_offsets[i];
      const size_t list_n = static_cast<size_t>(list_offsets[i + 1] - list_offsets[i]);
      if (list_excludes) {
        for (size_t w = 0; w < words; ++w) o[w] = allow != nullptr ? allow[w] : ~uint64_t{0};
        for (size_t j = 0; j < list_n; ++j) o[list[j] >> 6] &= ~(uint64_t{1} << (list[j] & 63));
      } else {
        std::fill(o, o + words, uint64_t{0});
        for (size_t j = 0; j < list_n; ++j) o[list[j] >> 6] |= uint64_t{1} << (list[j] & 63);
        if (allow != nullptr) {
          for (size_t w = 0; w < words; ++w) o[w] &= allow[w];
        }
      }
      size_t count = 0;
      for (size_t w = 0; w < words; ++w) {
        if (dead != nullptr) o[w] &= ~dead[w];
        if (space - w * 64 < 64) o[w] &= (uint64_t{1} << (space - w * 64)) - 1;
        count += popcount64(o[w]);
      }
      out_counts[i] = static_cast<int64_t>(count);
    }
  });
}

void search_batch_filtered(const IndexView& index, ScratchCache& cache, const Kernels& kn,
                           const float* queries, size_t nq, const float* leaf_scores,
                           const SearchParams& params, const FilterSpec& spec,
                           const float* exact_rows, int num_threads, uint32_t* out_ids,
                           float* out_scores, uint32_t* out_counts) {
  constexpr size_t kChunk = 8;
  const size_t parts = dynamic_parts(nq, num_threads, kChunk);
  ScratchLease first(cache);
  std::vector<ScratchLease> more;
  if (parts > 1) {
    fault::alloc();
    more.reserve(parts - 1);
    for (size_t w = 1; w < parts; ++w) more.emplace_back(cache);
  }
  const size_t L = index.num_leaves;
  const size_t space = index.dead != nullptr ? index.num_rows : index.n;
  const size_t words = (space + 63) / 64;
  // Eligible rows before any list: live rows the shared bitset allows.
  size_t base = index.n;
  if (spec.allow != nullptr || index.dead != nullptr) {
    base = 0;
    for (size_t w = 0; w < words; ++w) {
      uint64_t m = spec.allow != nullptr ? spec.allow[w] : ~uint64_t{0};
      if (index.dead != nullptr) m &= ~index.dead[w];
      if (space - w * 64 < 64) m &= (uint64_t{1} << (space - w * 64)) - 1;
      base += popcount64(m);
    }
  }
  parallel_for_dynamic(nq, num_threads, kChunk, [&](size_t b, size_t e, int w) {
    Scratch& s = w == 0 ? first.get() : more[static_cast<size_t>(w - 1)].get();
    const float* chunk_scores = leaf_scores ? leaf_scores + b * L : nullptr;
    for (size_t i = b; i < e; ++i) {
      const size_t k = params.final_k;
      uint32_t* ids = out_ids + i * k;
      float* scores = out_scores + i * k;
      const float* q = queries + i * index.d;
      const uint32_t* list = nullptr;
      size_t list_n = 0;
      if (spec.list_offsets != nullptr) {
        list = spec.list_rows + spec.list_offsets[i];
        list_n = static_cast<size_t>(spec.list_offsets[i + 1] - spec.list_offsets[i]);
      }
      const bool exact = spec.exact != nullptr && spec.exact[i] != 0 &&
                         (exact_rows != nullptr || index.reorders());
      // The query's list as a bitset in the scratch (all zero between queries): the
      // eligible rows it names (allowed by the shared bitset and live), or every row it
      // excludes; a row named twice counts once.
      size_t eligible = spec.eligible != nullptr ? static_cast<size_t>(spec.eligible[i]) : base;
      const bool bits = list != nullptr;
      if (bits) {
        if (s.qbits.size() < words) grow(s.qbits, words);  // new words are 0
        uint64_t* qb = s.qbits.data();
        size_t named = 0;  // distinct named rows that are live and pass the shared bitset
        for (size_t j = 0; j < list_n; ++j) {
          const uint32_t row = list[j];
          const bool pass = (spec.allow == nullptr || bit_set(spec.allow, row)) &&
                            (index.dead == nullptr || !bit_set(index.dead, row));
          if (!pass && !spec.list_excludes) continue;
          if (bit_set(qb, row)) continue;
          qb[row >> 6] |= uint64_t{1} << (row & 63);
          named += pass;
        }
        if (spec.eligible == nullptr) eligible = spec.list_excludes ? base - named : named;
      }
      size_t nf;
      if (exact) {
        RowScorer score = RowScorer::reorder(index, kn, q, s);
        if (exact_rows != nullptr) score = RowScorer{&kn, q, index.d, exact_rows};
        nf = search_exact(index, score, spec.allow, bits ? s.qbits.data() : nullptr,
                          spec.list_excludes ? nullptr : list, list_n, spec.shared_rows,
                          spec.shared_count, std::min(k, eligible), s, ids, scores);
      } else {
        QueryPlan plan;
        plan.eligible = eligible;
        plan.leaf_exponent = spec.leaf_exponent;
        if (list == nullptr) {
          plan.f = QueryFilter{spec.allow, nullptr};
        } else if (spec.list_excludes) {
          plan.f = QueryFilter{spec.allow, s.qbits.data()};
        } else {
          plan.f = QueryFilter{s.qbits.data(), nullptr};
        }
        nf = search_one<true>(index, kn, q, chunk_scores ? chunk_scores + (i - b) * L : nullptr,
                              params, s, ids, scores, &plan);
      }
      if (bits) {
        for (size_t j = 0; j < list_n; ++j) s.qbits[list[j] >> 6] = 0;
      }
      for (size_t j = nf; j < k; ++j) {
        ids[j] = UINT32_MAX;
        scores[j] = -INFINITY;
      }
      out_counts[i] = static_cast<uint32_t>(nf);
    }
  });
}

}  // namespace mipscan
