// The searcher's query path: leaf selection, LUT16 (or exact float) scoring of the
// searched leaves, top-k, exact reorder.
//
// Everything is in "MIPS space": larger inner product = better. The Python layer maps
// each metric into it (cosine: unit rows and queries; squared_l2: rows [x, -|x|^2/2],
// queries [q, 1]) and maps scores back afterwards.
//
// Ownership: an IndexView holds raw pointers only. The arrays belong to the Python
// Searcher, which keeps them alive (and may memory-map them) for the view's lifetime.
// The search's working memory (Scratch) belongs to a ScratchCache, which the bindings'
// Index owns next to its view: it is freed with the searcher, and bounded (see below).
//
// Floats. Nothing here trusts the float arrays to be finite: another thread may write a
// NaN into a query after the Python layer checked it, and a loaded folder may hold one.
// With NaN, +-inf or huge values anywhere (queries, centroids, codebooks, slot or reorder
// rows), a search stays within its arrays and still returns final_k distinct ids < n per
// query; only the ranking (and scores, NaN reported as -inf) is then meaningless. The
// integer arrays (leaf_offsets, slot_ids, leaf_groups) are checked once, when the Index
// is made, and must not change afterwards.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu.h"

namespace mipscan {

struct IndexView {
  size_t n = 0;           // datapoints (rows of reorder_rows; ids returned are < n)
  size_t num_slots = 0;   // leaf entries: n, or up to 2n when points are spilled (SOAR)
  size_t d = 0;           // MIPS-space dimension of queries, centroids and float rows
  size_t num_leaves = 0;  // >= 1; a searcher without a tree has one leaf, centroid 0
  const float* centroids = nullptr;       // num_leaves * d
  const int64_t* leaf_offsets = nullptr;  // num_leaves + 1: slots of leaf l are [o[l], o[l+1])
  const uint32_t* slot_ids = nullptr;     // num_slots: datapoint row of each slot
  size_t max_leaf_size = 0;               // max over l of o[l+1] - o[l] (sizes scratch buffers)

  // Asymmetric hashing (present when packed_codes != nullptr).
  size_t num_blocks = 0;        // blocks of dims_per_block dimensions covering d (zero padded)
  size_t dims_per_block = 0;
  const float* codebooks = nullptr;           // num_blocks * 16 * dims_per_block
  const uint8_t* packed_codes = nullptr;      // per leaf, ceil(size/64) groups (lut16.h)
  const int64_t* leaf_groups = nullptr;       // num_leaves + 1: group offsets of each leaf

  // Exact float scoring of the searched leaves (score_brute_force): num_slots * d, slot order.
  const float* slot_rows = nullptr;
  // Exact reorder: n * d, datapoint-row order (nullptr: no reorder).
  const float* reorder_rows = nullptr;

  // Live index (live.h), set when leaf_rows != nullptr; a static index leaves these null
  // and pays one predictable branch per offered candidate. Leaf l is then a segment of
  // leaf_sizes[l] entries: its packed codes (AH, groups of 64 as lut16.h) at
  // leaf_codes[l], the row of each entry at leaf_rows[l][i], and leaf_live[l] of them
  // live. Candidates are rows (not slots; slot_ids and leaf_offsets / leaf_groups are
  // unused); a row whose bit is set in dead (num_rows bits) is skipped where candidates
  // are offered, so it never takes a slot. n is the live row count, num_slots the live
  // entry count (> n when spilled), num_rows the row space (rows < num_rows, dead or
  // not). Float scoring (score_brute_force) reads row_data (num_rows * d).
  const uint8_t* const* leaf_codes = nullptr;
  const uint32_t* const* leaf_rows = nullptr;
  const uint32_t* leaf_sizes = nullptr;
  const uint32_t* leaf_live = nullptr;
  const uint64_t* dead = nullptr;
  const float* row_data = nullptr;
  size_t num_rows = 0;
  // Quantized copies (reorder.h), each instead of its float32 counterpart above (at most
  // one of float32 / int8 / bf16 is set per role). int8 ones come with d per-dimension
  // scales > 0 and one scale in (0, 1] per row: x[i][j] = row_scales[i] * scales[j] *
  // c[i][j]. Reorder: n * d, row order; slots: num_slots * d, slot order; centroids:
  // num_leaves * d, used for the leaf scores instead of `centroids` when set.
  const int8_t* reorder_i8 = nullptr;
  const uint16_t* reorder_bf16 = nullptr;
  const float* reorder_scales = nullptr;
  const float* reorder_row_scales = nullptr;
  const int8_t* slot_i8 = nullptr;
  const uint16_t* slot_bf16 = nullptr;
  const float* slot_scales = nullptr;
  const float* slot_row_scales = nullptr;
  const int8_t* centroids_i8 = nullptr;
  const uint16_t* centroids_bf16 = nullptr;
  const float* centroid_scales = nullptr;
  const float* centroid_row_scales = nullptr;

  // Upper tree (ScaNN's upper_tree, present when num_upper > 0): the leaves are grouped
  // by upper node, node u's children being leaves [upper_offsets[u], upper_offsets[u+1])
  // (every node has at least one); a query scores the num_upper upper_centroids
  // (num_upper * d) first and then only the children of its best upper nodes.
  size_t num_upper = 0;
  const float* upper_centroids = nullptr;
  const int64_t* upper_offsets = nullptr;

  // Leaf order (optional): leaves are searched by q . c_l + spread_weight * |q| *
  // leaf_spread[l] (leaf_spread: num_leaves RMS per-dimension residuals of the leaf's
  // entries, >= 0) instead of q . c_l alone: the isotropic form of ranking by the
  // expected best score in the leaf, mean + z * std of q . x. The scores the AH scan adds
  // to stay q . c_l. Null or spread_weight 0: ScaNN's order, by centroid score only.
  const float* leaf_spread = nullptr;
  float spread_weight = 0;
  // The anisotropic form (optional): leaf_axes holds axes_rank scaled principal axes of
  // each leaf's residuals (num_leaves * axes_rank * d; row j of leaf l is sqrt(lambda_j -
  // rest_l) v_j), and leaf_spread[l] is then sqrt(rest_l), the RMS residual left outside
  // them. Leaves are searched by q . c_l + spread_weight * sqrt(sum_j (a_lj . q)^2 +
  // |q|^2 leaf_spread[l]^2): the mean plus spread_weight standard deviations of q . x,
  // with the leaf's covariance approximated by its top axes plus an isotropic rest.
  // Costs axes_rank * d multiply-adds per leaf and query: built only where that is small
  // beside the scan (mipscan._schema.resolve_leaf_axes).
  const float* leaf_axes = nullptr;
  size_t axes_rank = 0;

  bool ranks_by_axes() const { return ranks_by_spread() && leaf_axes != nullptr && axes_rank > 0; }
  bool ranks_by_spread() const { return leaf_spread != nullptr && spread_weight > 0; }
  bool reorders() const { return reorder_rows || reorder_i8 || reorder_bf16; }
  bool quantized_centroids() const { return centroids_i8 || centroids_bf16; }
};

struct SearchParams {
  size_t leaves_to_search = 1;  // 1..num_leaves
  size_t pre_reorder_k = 1;     // approximate candidates kept (>= final_k when reordering)
  size_t final_k = 1;           // 1..n
  // Spilled indexes (SOAR): candidate slots kept per distinct row to take, >= 1 (ScaNN's
  // overretrieve_factor); at least 2 * final_k slots are kept whatever it is.
  double overretrieve = 2.0;
  // Upper nodes whose children are scored (1..num_upper; used when num_upper > 0). If
  // their children are fewer than leaves_to_search, or hold too few points, the other
  // leaves are scored and searched after them, best first.
  size_t upper_to_search = 1;
};

// Filtered search (DESIGN.md "Filters"). A row is eligible when it is live, allowed by
// the shared bitset (if any) and by the query's own list (if any). Eligibility is decided
// where candidates are offered (the result handling: a per-group mask ANDed with the scan
// kernel's mask), never in the kernels, so a filtered-out row never takes a candidate or
// a reorder slot. An unfiltered search takes the unfiltered instantiation and pays
// nothing. Rows are internal rows (< n for a static index, < num_rows for a live one).
struct FilterSpec {
  const uint64_t* allow = nullptr;       // shared by all queries: bit set = allowed (null: all)
  // Per-query lists (CSR, may be null): query i names rows
  // list_rows[list_offsets[i], list_offsets[i+1]), distinct; allowed rows, or excluded
  // ones when list_excludes.
  const int64_t* list_offsets = nullptr;
  const uint32_t* list_rows = nullptr;
  bool list_excludes = false;
  // nq: eligible rows of each query, or null: counted here (live rows passing the shared
  // bitset, and the list: its distinct named rows, or all but them).
  const int64_t* eligible = nullptr;
  const uint8_t* exact = nullptr;        // nq or null: 1 = score the eligible rows exactly
  // The rows `allow` sets, ascending (optional): the exact plan of a query without a list
  // walks these instead of the whole bitset.
  const uint32_t* shared_rows = nullptr;
  size_t shared_count = 0;
  // Index plan: the searched leaves are scaled to ceil(leaves_to_search * f^-exponent)
  // (f = eligible / n), and leaves are added until the eligible entries seen reach both
  // the candidates needed and eligible * leaves_to_search / num_leaves (the share of the
  // eligible set an unfiltered search would cover; this is what keeps recall when the
  // allowed rows sit far from the query).
  float leaf_exponent = 0.5f;
};

// Per-query eligibility as bitsets over `space` rows (out: nq * words, words =
// ceil(space / 64), bit r of word r / 64): the rows `allow` sets (null: all) that `dead`
// does not (null: none), and then query i's list rows list_rows[list_offsets[i],
// list_offsets[i+1]): only those (allowed lists) or all but those (list_excludes); a row
// named twice counts once. out_counts[i] = query i's eligible rows. Rows must be < space.
void filter_bitsets(size_t nq, size_t space, const uint64_t* allow, const uint64_t* dead,
                    const int64_t* list_offsets, const uint32_t* list_rows, bool list_excludes,
                    uint64_t* out, int64_t* out_counts, int num_threads);

struct Scratch;  // one working thread's buffers (search.cpp)

// Scratches kept between searches, for one index. Each working thread of a search takes
// one (or makes one, when none is free) and gives it back when the search ends. Taking and
// giving are O(1) under a mutex, and allocate nothing once warm (a single-query search
// would otherwise spend ~8 us allocating and first-touching ~100 KB of buffers). Bounds:
// at most kMaxCached scratches are kept, and a scratch that grew past kKeepBytes (a huge k,
// reorder depth or leaf count) is freed when given back rather than kept.
class ScratchCache {
 public:
  static constexpr size_t kMaxCached = 8;
  static constexpr size_t kKeepBytes = size_t{16} << 20;

  ScratchCache();  // may throw std::bad_alloc
  ~ScratchCache();
  ScratchCache(const ScratchCache&) = delete;
  ScratchCache& operator=(const ScratchCache&) = delete;

  std::unique_ptr<Scratch> take();              // may throw std::bad_alloc
  void give(std::unique_ptr<Scratch> s) noexcept;
  // Kept scratches and the bytes they hold (for tests and inspection).
  size_t cached_count();
  size_t cached_bytes();

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Scratch>> free_;  // capacity kMaxCached: give() never allocates
};

// Searches nq queries (nq * d, row-major). leaf_scores, when non-null, holds
// precomputed query-centroid inner products (nq * num_leaves); otherwise they are
// computed here. Writes nq * final_k ids (datapoint rows) and scores, best first.
//
// Guarantee: exactly final_k distinct results per query (final_k <= n is a precondition).
// When the searched leaves hold fewer than the needed candidates, further leaves are
// searched in order of their centroid score until there are enough. A row spilled into
// two searched leaves counts once, with the better of its two approximate scores. (With
// garbage floats, rows whose scores are NaN or -inf may be missing from the candidates;
// the results are then completed with other distinct rows, scored -inf.)
//
// Threads: up to num_threads working threads (<= 0: all hardware threads) from the worker
// pool (parallel.h), the calling thread among them. kernels: the SIMD level to use
// (normally kernels(), the one fixed at load). Throws std::bad_alloc when memory runs out
// in any working thread (after all of them stopped; the outputs are then incomplete).
void search_batch(const IndexView& index, ScratchCache& cache, const Kernels& kernels,
                  const float* queries, size_t nq, const float* leaf_scores,
                  const SearchParams& params, int num_threads, uint32_t* out_ids,
                  float* out_scores);

// Filtered search: as above, but each query's results are the best of its eligible rows
// (FilterSpec): out_counts[i] = min(final_k, eligible[i]) results, the rest of the row
// padded with id UINT32_MAX and score -inf. A query marked exact scores its eligible rows
// exactly (from exact_rows, num_rows * d floats in row order, or else from the index's
// reorder rows of any type; a query marked exact without either searches the index),
// the others search the index with the filter in the result handling.
void search_batch_filtered(const IndexView& index, ScratchCache& cache, const Kernels& kernels,
                           const float* queries, size_t nq, const float* leaf_scores,
                           const SearchParams& params, const FilterSpec& filter,
                           const float* exact_rows, int num_threads, uint32_t* out_ids,
                           float* out_scores, uint32_t* out_counts);

// Anisotropic AH encoding (Guo et al., ICML 2020). For each of n points, picks the code
// of each block minimising |e|^2 + (eta - 1) * (e . x_hat)^2, e = residual - decoded,
// by coordinate descent over blocks starting from the nearest codewords. Point i is row
// ids[i] of rows (width floats each) in leaf leaves[i]: its residual is that row less
// centroids[leaves[i]], its direction x_hat the row over its norm (float64 sums), both
// zero-padded to num_blocks * dims_per_block. eta comes from the threshold T as for a
// unit-norm row, whatever the row's scale: t = min(T, 0.5), eta = max(1, (d_eff - 1) t^2 /
// (1 - t^2)); T <= 0, or a zero row, means eta = 1 (plain nearest-codeword encoding).
// codebooks as in IndexView; codes: n * num_blocks bytes. Preconditions: ids < the row
// count, leaves < the centroid count, width <= num_blocks * dims_per_block.
void encode_anisotropic_rows(const Kernels& kernels, const float* rows, size_t width, const int64_t* ids,
                             const int64_t* leaves, const float* centroids, size_t n,
                             size_t num_blocks, size_t dims_per_block, const float* codebooks,
                             float threshold, size_t d_eff, int max_iterations,
                             int num_threads, uint8_t* codes);

// out[i] = rows[ids[i]] - centroids[leaves[i]] (width floats), zero-padded to dp >= width:
// the codebooks' training residuals, in one pass. Preconditions as encode_anisotropic_rows.
void gather_residuals(const float* rows, size_t width, const int64_t* ids, const int64_t* leaves,
                      const float* centroids, size_t n, size_t dp, int num_threads, float* out);

// k-means with 16 centres per block, blocks in parallel. data: m * (num_blocks *
// dims_per_block) floats; books: num_blocks * 16 * dims_per_block, holding the initial
// codewords on entry and the trained ones on exit. Preconditions: m >= 1.
void train_block_codebooks(const Kernels& kernels, const float* data, size_t m, size_t num_blocks,
                           size_t dims_per_block, int iterations, int num_threads, float* books);

// The nearest centroid of each of the n rows of x (n x d): the first j maximising
// x . c_j - h[j] (h = |c_j|^2 / 2), the dot products as assign.h sums them (fused at
// the AVX2 and AVX-512 levels). ct: the L
// centroids transposed (d x L). Rows in parallel; NaN scores as argmax_shifted treats them.
void nearest_centroids(const Kernels& kernels, const float* x, size_t n, size_t d,
                       const float* ct, const float* h, size_t L, int num_threads, int64_t* out);

// Per-cluster sums (k * d, float64) and sizes of the rows of x (n * d) under labels in
// [0, k): the update step of Lloyd's k-means for the tree.
void cluster_sums(const float* x, size_t n, size_t d, const int64_t* labels, size_t k,
                  double* sums, int64_t* counts);

}  // namespace mipscan
