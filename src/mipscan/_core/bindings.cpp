// The one nanobind module. Thin on purpose: convert arrays, check the invariants that
// protect memory, release the GIL, allocate outputs. Argument checking with user-facing
// messages lives in mipscan/_validation.py, before anything gets here.
//
// The memory checks are the cross-array shape checks (O(1)), plus O(n) passes over the
// integer arrays whose values index other arrays: the `sizes` of the top-k heaps (O(nq)
// per call) and, once per Index, leaf_offsets, leaf_groups and slot_ids (O(num_leaves +
// n)). Float values are never checked here: the core is memory-safe whatever they are
// (search.h). Exceptions: std::invalid_argument -> ValueError, std::bad_alloc ->
// MemoryError, anything else from the core -> RuntimeError (nanobind's translation).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.h"
#include "fault.h"
#include "filtered.h"
#include "live.h"
#include "lut16.h"
#include "parallel.h"
#include "reorder.h"
#include "search.h"
#include "topk.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <class T, size_t Dim>
using In = nb::ndarray<const T, nb::ndim<Dim>, nb::c_contig, nb::device::cpu>;
template <class T, size_t Dim>
using Out = nb::ndarray<nb::numpy, T, nb::ndim<Dim>>;

// Output arrays (a fault-injection build fails these allocations at random).
template <class T>
Out<T, 1> new_array(size_t n0) {
  mipscan::fault::alloc();
  T* data = new T[n0 > 0 ? n0 : 1]();
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return Out<T, 1>(data, {n0}, owner);
}
template <class T>
Out<T, 2> new_array(size_t n0, size_t n1) {
  mipscan::fault::alloc();
  T* data = new T[n0 * n1 > 0 ? n0 * n1 : 1]();
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return Out<T, 2>(data, {n0, n1}, owner);
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// The scan kernels' contract (lut16.h): every LUT entry <= lut_cap(num_blocks); above it
// the SIMD kernels' 8-bit sums wrap.
void require_lut_cap(const uint8_t* lut, size_t num_blocks, size_t entries, const std::string& call) {
  const unsigned cap = mipscan::lut_cap(num_blocks);
  for (size_t i = 0; i < entries; ++i) {
    if (lut[i] > cap)
      throw std::invalid_argument(call + ": lut entries must be <= lut_cap(num_blocks) = min(63, 65535 // num_blocks)");
  }
}

// The kernels of a named level (tests reach every level this way, without global state).
mipscan::Kernels kernels_at(const std::string& level, const char* call) {
  mipscan::SimdLevel l{};
  std::string allowed;
  for (const auto& name : mipscan::known_simd_levels()) allowed += (allowed.empty() ? "'" : ", '") + name + "'";
  if (!mipscan::parse_simd_level(level, &l))
    throw std::invalid_argument(std::string(call) + ": level must be one of " + allowed + "; got '" + level + "'");
  mipscan::Kernels k{};
  if (!mipscan::kernels_for(l, &k))
    throw std::invalid_argument(std::string(call) + ": this CPU or build cannot run '" + level + "'");
  return k;
}

// For tests: out[i, r] = fn(queries[i], rows[r]), a quantized dot kernel (reorder.h).
template <class T, class Fn>
Out<float, 2> quantized_dot_table(const In<float, 2>& qs, const In<T, 2>& rows, Fn fn, const char* call) {
  const size_t nq = qs.shape(0), m_ = rows.shape(0), d = qs.shape(1);
  if (rows.shape(1) != d) throw std::invalid_argument(std::string(call) + ": queries and rows must have the same width");
  auto out = new_array<float>(nq, m_);
  for (size_t i = 0; i < nq; ++i)
    for (size_t r = 0; r < m_; ++r) out.data()[i * m_ + r] = fn(qs.data() + i * d, rows.data() + r * d, d);
  return out;
}

// The search knobs of a call, checked against the index (call: the message prefix).
mipscan::SearchParams search_params(const mipscan::IndexView& v, size_t leaves_to_search,
                                    size_t pre_reorder_k, size_t final_k, double overretrieve,
                                    size_t upper_to_search, const char* call) {
  auto check = [call](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string(call) + ": " + what);
  };
  check(leaves_to_search >= 1 && leaves_to_search <= v.num_leaves, "leaves_to_search out of range");
  check(pre_reorder_k >= 1, "pre_reorder_k must be >= 1");
  check(overretrieve >= 1.0 && overretrieve <= 1e6, "overretrieve must be in [1, 1e6]");
  check(v.num_upper == 0 || (upper_to_search >= 1 && upper_to_search <= v.num_upper),
        "upper_to_search must be in [1, num_upper]");
  return mipscan::SearchParams{leaves_to_search, pre_reorder_k, final_k, overretrieve, upper_to_search};
}

// search_batch_filtered for either layout: checks what protects memory (array shapes,
// list offsets and rows inside the row space), then searches with the GIL released.
// Returns (ids, scores, counts).
nb::tuple filtered_search(const mipscan::IndexView& v, mipscan::ScratchCache& cache, const mipscan::Kernels& kn,
                          const In<float, 2>& queries, const std::optional<In<float, 2>>& leaf_scores,
                          size_t leaves_to_search, size_t pre_reorder_k, size_t final_k,
                          double overretrieve, size_t upper_to_search, int num_threads,
                          const std::optional<In<uint64_t, 1>>& allow, const std::optional<In<int64_t, 1>>& list_offsets,
                          const std::optional<In<uint32_t, 1>>& list_rows, bool list_excludes,
                          const std::optional<In<int64_t, 1>>& eligible, const std::optional<In<uint8_t, 1>>& exact,
                          float leaf_exponent, const std::optional<In<uint32_t, 1>>& shared_rows) {
  const size_t nq = queries.shape(0);
  const size_t space = v.dead != nullptr ? v.num_rows : v.n;
  require(queries.shape(1) == v.d, "search_batch_filtered: queries have the wrong dimension");
  require(final_k >= 1 && final_k <= v.n, "search_batch_filtered: final_k must be in [1, n]");
  const mipscan::SearchParams p = search_params(v, leaves_to_search, pre_reorder_k, final_k, overretrieve,
                                                upper_to_search, "search_batch_filtered");
  require(!leaf_scores || (leaf_scores->shape(0) == nq && leaf_scores->shape(1) == v.num_leaves),
          "search_batch_filtered: leaf_scores must be (nq, num_leaves)");
  require(!allow || allow->shape(0) * 64 >= space, "search_batch_filtered: allow must hold one bit per row");
  if (eligible) {
    require(eligible->shape(0) == nq, "search_batch_filtered: eligible must have one entry per query");
    for (size_t i = 0; i < nq; ++i) require(eligible->data()[i] >= 0, "search_batch_filtered: eligible must be >= 0");
  }
  require(!exact || exact->shape(0) == nq, "search_batch_filtered: exact must have one entry per query");
  require(bool(list_offsets) == bool(list_rows), "search_batch_filtered: list_offsets and list_rows go together");
  if (list_offsets) {
    const int64_t* off = list_offsets->data();
    require(list_offsets->shape(0) == nq + 1 && off[0] == 0 && off[nq] == int64_t(list_rows->shape(0)),
            "search_batch_filtered: list_offsets must run from 0 to len(list_rows), nq + 1 entries");
    for (size_t i = 0; i < nq; ++i) require(off[i] <= off[i + 1], "search_batch_filtered: list_offsets must not decrease");
    for (size_t j = 0; j < list_rows->shape(0); ++j)
      require(list_rows->data()[j] < space, "search_batch_filtered: list_rows out of range");
  }
  if (shared_rows) {
    for (size_t j = 0; j < shared_rows->shape(0); ++j)
      require(shared_rows->data()[j] < space, "search_batch_filtered: shared_rows out of range");
  }
  require(std::isfinite(leaf_exponent) && leaf_exponent >= 0 && leaf_exponent <= 4,
          "search_batch_filtered: leaf_exponent must be in [0, 4]");
  auto ids = new_array<uint32_t>(nq, final_k);
  auto scores = new_array<float>(nq, final_k);
  auto counts = new_array<uint32_t>(nq);
  {
    nb::gil_scoped_release release;
    mipscan::FilterSpec spec;
    spec.allow = allow ? allow->data() : nullptr;
    spec.list_offsets = list_offsets ? list_offsets->data() : nullptr;
    spec.list_rows = list_rows ? list_rows->data() : nullptr;
    spec.list_excludes = list_excludes;
    spec.eligible = eligible ? eligible->data() : nullptr;
    spec.exact = exact ? exact->data() : nullptr;
    spec.leaf_exponent = leaf_exponent;
    spec.shared_rows = shared_rows ? shared_rows->data() : nullptr;
    spec.shared_count = shared_rows ? shared_rows->shape(0) : 0;
    const float* rows = v.dead != nullptr ? v.row_data : v.reorder_rows;
    mipscan::search_batch_filtered(v, cache, kn, queries.data(), nq, leaf_scores ? leaf_scores->data() : nullptr,
                                   p, spec, rows, num_threads, ids.data(), scores.data(), counts.data());
  }
  return nb::make_tuple(ids, scores, counts);
}

// The arrays are not owned (the keep_alive policies below keep each one alive with the
// view); the search scratch is, and is freed with the Index.
struct Index {
  mipscan::IndexView view;
  mipscan::ScratchCache scratch;
};

// One snapshot of a live index (live.h): its leaf segments (shared with the snapshots
// before and after it), the search scratch (shared by all snapshots of one searcher) and
// a view whose float arrays, tombstones and live counts belong to the Python snapshot
// (kept alive with it by keep_alive). Immutable: an update makes a new Live.
struct Live {
  std::shared_ptr<const mipscan::LiveLeaves> leaves;
  std::shared_ptr<mipscan::ScratchCache> scratch;
  mipscan::IndexView view;
  // The leaf order's spreads (search.h, leaf_spread), a copy owned by every snapshot
  // derived from the first (null: ranked by centroid score).
  std::shared_ptr<const std::vector<float>> spread;
  std::shared_ptr<const std::vector<float>> axes;  // search.h, leaf_axes (or null)

  void set_spread(std::shared_ptr<const std::vector<float>> s, float weight,
                  std::shared_ptr<const std::vector<float>> a, size_t rank) {
    spread = std::move(s);
    axes = spread ? std::move(a) : nullptr;
    view.leaf_spread = spread ? spread->data() : nullptr;
    view.spread_weight = spread ? weight : 0.f;
    view.leaf_axes = axes ? axes->data() : nullptr;
    view.axes_rank = axes ? rank : 0;
  }
};

// The view's non-segment fields; checks what protects memory (O(num_leaves)).
mipscan::IndexView live_view(const mipscan::LiveLeaves& lv, const In<float, 2>& centroids,
                             const std::optional<In<float, 3>>& codebooks, const In<float, 2>& row_data,
                             size_t num_rows, const In<uint64_t, 1>& dead, const In<uint32_t, 1>& leaf_live,
                             bool reorder) {
  mipscan::IndexView v;
  v.num_leaves = centroids.shape(0);
  v.d = centroids.shape(1);
  require(v.num_leaves == lv.num_leaves(), "Live: centroids and leaves differ in count");
  require(row_data.shape(1) == v.d && row_data.shape(0) >= num_rows, "Live: row_data must be (>= num_rows, d)");
  require(dead.shape(0) * 64 >= num_rows, "Live: dead must hold num_rows bits");
  require(leaf_live.shape(0) == v.num_leaves, "Live: leaf_live must have num_leaves entries");
  lv.fill(v);
  size_t live_slots = 0;
  for (size_t l = 0; l < v.num_leaves; ++l) {
    require(leaf_live.data()[l] <= v.leaf_sizes[l], "Live: leaf_live exceeds a leaf's size");
    live_slots += leaf_live.data()[l];
  }
  v.num_slots = live_slots;
  v.num_rows = num_rows;
  v.centroids = centroids.data();
  v.dead = dead.data();
  v.leaf_live = leaf_live.data();
  v.row_data = row_data.data();
  if (reorder) v.reorder_rows = row_data.data();
  if (lv.num_blocks() > 0) {
    require(codebooks.has_value() && codebooks->shape(0) == lv.num_blocks() && codebooks->shape(1) == 16 &&
                codebooks->shape(0) * codebooks->shape(2) >= v.d && (codebooks->shape(0) - 1) * codebooks->shape(2) < v.d,
            "Live: codebooks do not cover d");
    v.num_blocks = codebooks->shape(0);
    v.dims_per_block = codebooks->shape(2);
    v.codebooks = codebooks->data();
  }
  return v;
}

// The unfiltered batched search of a view (a static Index's or a Live snapshot's): the
// O(1) shape checks that protect memory, then the core with the GIL released.
std::pair<Out<uint32_t, 2>, Out<float, 2>> search_view(
    const mipscan::IndexView& v, mipscan::ScratchCache& scratch, const mipscan::Kernels& kn,
    const In<float, 2>& queries, const std::optional<In<float, 2>>& leaf_scores,
    size_t leaves_to_search, size_t pre_reorder_k, size_t final_k, double overretrieve,
    size_t upper_to_search, int num_threads, const char* final_k_error) {
  const size_t nq = queries.shape(0);
  require(queries.shape(1) == v.d, "search_batch: queries have the wrong dimension");
  require(final_k >= 1 && final_k <= v.n, final_k_error);
  const mipscan::SearchParams p = search_params(v, leaves_to_search, pre_reorder_k, final_k, overretrieve,
                                                upper_to_search, "search_batch");
  require(!leaf_scores || (leaf_scores->shape(0) == nq && leaf_scores->shape(1) == v.num_leaves),
          "search_batch: leaf_scores must be (nq, num_leaves)");
  auto ids = new_array<uint32_t>(nq, final_k);
  auto scores = new_array<float>(nq, final_k);
  {
    nb::gil_scoped_release release;
    mipscan::search_batch(v, scratch, kn, queries.data(), nq,
                          leaf_scores ? leaf_scores->data() : nullptr, p, num_threads,
                          ids.data(), scores.data());
  }
  return std::make_pair(ids, scores);
}


// Every ids[i] a row of a table of num_rows, every leaves[i] one of num_leaves.
void check_slots(size_t num_rows, const In<int64_t, 1>& ids, size_t num_leaves,
                 const In<int64_t, 1>& leaves, const char* call) {
  for (size_t i = 0; i < ids.shape(0); ++i) {
    if (ids.data()[i] < 0 || static_cast<size_t>(ids.data()[i]) >= num_rows)
      throw std::invalid_argument(std::string(call) + ": a row id is out of range");
    if (leaves.data()[i] < 0 || static_cast<size_t>(leaves.data()[i]) >= num_leaves)
      throw std::invalid_argument(std::string(call) + ": a leaf is out of range");
  }
}

// max |x| over n floats, NaN if any is NaN: the input check's one pass (cheaper than
// numpy's max and min, which matters for single queries). On the bit patterns with the
// sign cleared, which order non-negative floats as their values do and put every NaN
// above +inf: an unsigned maximum, which compilers vectorise at any SIMD level (the
// float form, with a separate NaN flag, ran at a third of the memory's speed).
float max_abs_of(const float* p, size_t n) {
  constexpr uint32_t kInf = 0x7f800000u;
  uint32_t hi[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (size_t t = 0; t < 16; ++t) {
      uint32_t b;
      std::memcpy(&b, p + i + t, sizeof b);
      b &= 0x7fffffffu;
      hi[t] = b > hi[t] ? b : hi[t];
    }
  }
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, p + i, sizeof b);
    b &= 0x7fffffffu;
    hi[0] = b > hi[0] ? b : hi[0];
  }
  uint32_t best = 0;
  for (uint32_t h : hi) best = h > best ? h : best;
  if (best > kInf) return std::numeric_limits<float>::quiet_NaN();
  float out;
  std::memcpy(&out, &best, sizeof out);
  return out;
}

// Searcher.search()'s common case in one call: one float32 query of an unfiltered
// dot-product index (or a cosine one, its query normalised by search() as the checked
// path normalises it), knobs that are None or plain ints. Made per snapshot (mipscan._live.
// State) with the snapshot's defaults. It returns None, never raising, whenever anything
// is not plainly valid (another dtype, a NaN, a bool or numpy int, a value out of range):
// the Python path then converts or names the error, so there is one set of messages. The
// values it returns equal search_batch's for the same (1, d) query: the same core call.
struct OneQuery {
  nb::object engine;  // the Index or Live the view and scratch belong to (kept alive)
  const mipscan::IndexView* view = nullptr;
  mipscan::ScratchCache* scratch = nullptr;
  size_t n_live = 0, reorder_k = 0 /* 0: none */, leaves = 1, configured_leaves = 1;
  double overretrieve = 2.0;
  size_t upper_to_search = 1;
  float max_abs = 0;

  // A plain int in [1, high] (None: dflt); false for anything else.
  static bool count(nb::handle h, size_t dflt, size_t high, size_t& out) {
    if (h.is_none()) {
      out = dflt;
      return true;
    }
    if (!PyLong_CheckExact(h.ptr())) return false;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow != 0 || v < 1 || static_cast<unsigned long long>(v) > high) return false;
    out = static_cast<size_t>(v);
    return true;
  }

  nb::object operator()(nb::handle q, nb::handle final_k, nb::handle pre_k, nb::handle leaves_h) {
    const mipscan::IndexView& v = *view;
    constexpr size_t kAny = std::numeric_limits<size_t>::max();
    size_t k = 0, pre = 0, nl = 0;
    if (!count(final_k, 0, kAny, k) || k == 0 || !count(pre_k, 0, kAny, pre) ||
        !count(leaves_h, leaves, configured_leaves, nl))
      return nb::none();
    In<float, 1> x;
    if (!nb::try_cast(q, x, /*convert=*/false) || x.shape(0) != v.d) return nb::none();
    const float* p = x.data();
    if (!(max_abs_of(p, v.d) <= max_abs)) return nb::none();  // NaN fails too
    k = std::min(k, n_live);
    if (pre == 0) pre = reorder_k != 0 ? reorder_k : k;
    pre = std::max<size_t>(1, std::min(pre, n_live));
    nl = std::min(nl, v.num_leaves);
    const mipscan::SearchParams sp = search_params(v, nl, pre, k, overretrieve, upper_to_search, "search");
    auto ids = new_array<uint32_t>(k);
    auto scores = new_array<float>(k);
    {
      nb::gil_scoped_release release;
      mipscan::search_batch(v, *scratch, mipscan::kernels(), p, 1, nullptr, sp, 1, ids.data(), scores.data());
    }
    return nb::make_tuple(ids, scores);
  }
};

}  // namespace

NB_MODULE(_mipscan, m) {
  mipscan::init_kernels_from_env();  // throws (ImportError) on a bad MIPSCAN_SIMD

  m.def("simd_level", [] { return std::string(mipscan::simd_level_name(mipscan::kernels().level)); });
  // The levels this CPU and build can run, lowest first (tests parametrise over them).
  m.def("simd_levels", &mipscan::runnable_simd_levels);
  m.def("cpu_has_avx2", &mipscan::cpu_has_avx2);
  m.def("cpu_has_avx512", &mipscan::cpu_has_avx512);
  m.def("cpu_has_gfni", &mipscan::cpu_has_gfni);
  m.def("disabled_cpu_features", &mipscan::disabled_cpu_features);
  m.def("fault_injection", [] { return mipscan::fault::kEnabled; });
  // The worker pool's bound on its threads (parallel.h).
  m.def("max_pool_workers", &mipscan::max_pool_workers);
  // max_abs_of over a float32 array (as_float_array's check).
  m.def("max_abs", [](nb::ndarray<const float, nb::c_contig, nb::device::cpu> x) {
    const float* p = x.data();
    const size_t n = x.size();
    nb::gil_scoped_release release;
    return max_abs_of(p, n);
  });

  m.def("pack_codes", [](In<uint8_t, 2> codes) {
    const size_t n = codes.shape(0), nb_ = codes.shape(1);
    auto out = new_array<uint8_t>(mipscan::num_groups(n) * mipscan::group_bytes(nb_));
    {
      nb::gil_scoped_release release;
      mipscan::pack_codes(codes.data(), n, nb_, out.data());
    }
    return out;
  }, "codes"_a.noconvert());

  m.def("unpack_codes", [](In<uint8_t, 1> packed, size_t n, size_t num_blocks) {
    require(n <= (size_t{1} << 40) && num_blocks <= (size_t{1} << 20),
            "unpack_codes: n or num_blocks too large");
    require(packed.shape(0) >= mipscan::num_groups(n) * mipscan::group_bytes(num_blocks),
            "unpack_codes: packed array too small for n and num_blocks");
    auto out = new_array<uint8_t>(n, num_blocks);
    nb::gil_scoped_release release;
    mipscan::unpack_codes(packed.data(), n, num_blocks, out.data());
    return out;
  }, "packed"_a.noconvert(), "n"_a, "num_blocks"_a);

  m.def("scan_lut16", [](In<uint8_t, 1> packed, size_t num_blocks, In<uint8_t, 2> lut,
                         const std::string& level, uint16_t cut) {
    const size_t bytes = mipscan::group_bytes(num_blocks);
    require(num_blocks >= 1 && packed.shape(0) % bytes == 0,
            "scan_lut16: packed size is not a whole number of groups");
    require(lut.shape(0) == num_blocks && lut.shape(1) == 16, "scan_lut16: lut must be (num_blocks, 16)");
    require_lut_cap(lut.data(), num_blocks, num_blocks * 16, "scan_lut16");
    const size_t groups = packed.shape(0) / bytes;
    const mipscan::ScanLut16Fn fn = kernels_at(level, "scan_lut16").scan_lut16;
    auto out = new_array<uint16_t>(groups * mipscan::kGroup);
    auto masks = new_array<uint64_t>(groups);
    {
      nb::gil_scoped_release release;
      fn(packed.data(), groups, num_blocks, lut.data(), cut, out.data(), masks.data());
    }
    return std::make_pair(out, masks);
  }, "packed"_a.noconvert(), "num_blocks"_a, "lut"_a.noconvert(), "level"_a, "cut"_a = 0);

  m.def("scan_lut16_multi", [](In<uint8_t, 1> packed, size_t num_blocks, In<uint8_t, 3> luts,
                               In<uint16_t, 1> cuts, const std::string& level) {
    const size_t bytes = mipscan::group_bytes(num_blocks);
    const size_t nq = luts.shape(0);
    require(num_blocks >= 1 && packed.shape(0) % bytes == 0,
            "scan_lut16_multi: packed size is not a whole number of groups");
    require(nq >= 1 && nq <= mipscan::kMultiQueries,
            "scan_lut16_multi: luts must hold 1 to kMultiQueries = 4 queries");
    require(luts.shape(1) == num_blocks && luts.shape(2) == 16 && cuts.shape(0) == nq,
            "scan_lut16_multi: luts must be (nq, num_blocks, 16) and cuts (nq,)");
    require_lut_cap(luts.data(), num_blocks, nq * num_blocks * 16, "scan_lut16_multi");
    const size_t groups = packed.shape(0) / bytes, lb = mipscan::lut16_double_bytes(num_blocks);
    const mipscan::ScanLut16MultiFn fn = kernels_at(level, "scan_lut16_multi").scan_lut16_multi;
    auto out = new_array<uint16_t>(nq, groups * mipscan::kGroup);
    auto masks = new_array<uint64_t>(nq, groups);
    std::vector<uint8_t> doubled(nq * lb);
    {
      nb::gil_scoped_release release;
      const uint8_t* lp[mipscan::kMultiQueries];
      uint16_t* sp[mipscan::kMultiQueries];
      uint64_t* mp[mipscan::kMultiQueries];
      for (size_t t = 0; t < nq; ++t) {
        mipscan::lut16_double(luts.data() + t * num_blocks * 16, num_blocks, doubled.data() + t * lb);
        lp[t] = doubled.data() + t * lb;
        sp[t] = out.data() + t * groups * mipscan::kGroup;
        mp[t] = masks.data() + t * groups;
      }
      fn(packed.data(), groups, num_blocks, nq, lp, cuts.data(), sp, mp);
    }
    return std::make_pair(out, masks);
  }, "packed"_a.noconvert(), "num_blocks"_a, "luts"_a.noconvert(), "cuts"_a.noconvert(), "level"_a);

  m.def("topk_update_rows", [](In<float, 2> scores, std::optional<In<float, 1>> col_bias,
                               uint32_t col_offset, nb::ndarray<float, nb::ndim<2>, nb::c_contig> heap_s,
                               nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig> heap_id,
                               nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig> sizes, int num_threads) {
    const size_t nq = scores.shape(0), m_ = scores.shape(1), k = heap_s.shape(1);
    require(k >= 1 && heap_s.shape(0) == nq && heap_id.shape(0) == nq && heap_id.shape(1) == k &&
                sizes.shape(0) == nq, "topk_update_rows: heap arrays do not match the scores");
    require(!col_bias || col_bias->shape(0) == m_, "topk_update_rows: col_bias length != columns");
    require(uint64_t(col_offset) + m_ <= (uint64_t(1) << 32), "topk_update_rows: ids exceed uint32");
    for (size_t r = 0; r < nq; ++r)
      require(sizes.data()[r] >= 0 && size_t(sizes.data()[r]) <= k, "topk_update_rows: bad sizes");
    const float* bias = col_bias ? col_bias->data() : nullptr;
    nb::gil_scoped_release release;
    mipscan::topk_update_rows(scores.data(), nq, m_, m_, bias, col_offset, k, heap_s.data(),
                              heap_id.data(), sizes.data(), num_threads);
  }, "scores"_a.noconvert(), "col_bias"_a.noconvert().none(), "col_offset"_a, "heap_s"_a.noconvert(),
     "heap_id"_a.noconvert(), "sizes"_a.noconvert(), "num_threads"_a);

  m.def("topk_update_rows_masked", [](In<float, 2> scores, In<uint64_t, 2> bits, uint32_t col_offset,
                                      nb::ndarray<float, nb::ndim<2>, nb::c_contig> heap_s,
                                      nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig> heap_id,
                                      nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig> sizes, int num_threads) {
    const size_t nq = scores.shape(0), m_ = scores.shape(1), k = heap_s.shape(1), words = bits.shape(1);
    require(k >= 1 && heap_s.shape(0) == nq && heap_id.shape(0) == nq && heap_id.shape(1) == k &&
                sizes.shape(0) == nq && bits.shape(0) == nq,
            "topk_update_rows_masked: heap arrays or bits do not match the scores");
    require(col_offset % 64 == 0 && uint64_t(col_offset) + m_ <= 64 * uint64_t(words),
            "topk_update_rows_masked: columns outside the bitsets");
    for (size_t r = 0; r < nq; ++r)
      require(sizes.data()[r] >= 0 && size_t(sizes.data()[r]) <= k, "topk_update_rows_masked: bad sizes");
    nb::gil_scoped_release release;
    mipscan::topk_update_rows_masked(scores.data(), nq, m_, m_, bits.data(), words, col_offset, k,
                                     heap_s.data(), heap_id.data(), sizes.data(), num_threads);
  }, "scores"_a.noconvert(), "bits"_a.noconvert(), "col_offset"_a, "heap_s"_a.noconvert(),
     "heap_id"_a.noconvert(), "sizes"_a.noconvert(), "num_threads"_a);

  m.def("exact_bitsets", [](In<float, 2> queries, In<float, 2> rows, In<uint64_t, 2> bits,
                            nb::ndarray<float, nb::ndim<2>, nb::c_contig> heap_s,
                            nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig> heap_id,
                            nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig> sizes, size_t block_rows,
                            int num_threads) {
    const size_t nq = queries.shape(0), d = queries.shape(1), space = rows.shape(0);
    const size_t k = heap_s.shape(1), words = bits.shape(1);
    require(rows.shape(1) == d, "exact_bitsets: rows and queries differ in width");
    require(bits.shape(0) == nq && words * 64 >= space, "exact_bitsets: bits must be (nq, words covering the rows)");
    require(k >= 1 && heap_s.shape(0) == nq && heap_id.shape(0) == nq && heap_id.shape(1) == k &&
                sizes.shape(0) == nq,
            "exact_bitsets: heap arrays do not match the queries");
    require(space <= (uint64_t(1) << 32), "exact_bitsets: row ids exceed uint32");
    for (size_t r = 0; r < nq; ++r)
      require(sizes.data()[r] >= 0 && size_t(sizes.data()[r]) <= k, "exact_bitsets: bad sizes");
    nb::gil_scoped_release release;
    mipscan::exact_bitsets(mipscan::kernels(), queries.data(), nq, d, rows.data(), space, bits.data(),
                           words, k, heap_s.data(), heap_id.data(), sizes.data(), block_rows, num_threads);
  }, "queries"_a.noconvert(), "rows"_a.noconvert(), "bits"_a.noconvert(), "heap_s"_a.noconvert(),
     "heap_id"_a.noconvert(), "sizes"_a.noconvert(), "block_rows"_a, "num_threads"_a);

  m.def("exact_rows", [](In<float, 2> queries, In<float, 2> rows, In<int64_t, 1> offsets,
                         In<uint32_t, 1> list, nb::ndarray<float, nb::ndim<2>, nb::c_contig> heap_s,
                         nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig> heap_id,
                         nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig> sizes, size_t block_rows,
                         int num_threads) {
    const size_t nq = queries.shape(0), d = queries.shape(1), space = rows.shape(0);
    const size_t k = heap_s.shape(1);
    require(rows.shape(1) == d, "exact_rows: rows and queries differ in width");
    require(offsets.shape(0) == nq + 1, "exact_rows: offsets needs nq + 1 entries");
    require(k >= 1 && heap_s.shape(0) == nq && heap_id.shape(0) == nq && heap_id.shape(1) == k &&
                sizes.shape(0) == nq,
            "exact_rows: heap arrays do not match the queries");
    require(space <= (uint64_t(1) << 32), "exact_rows: row ids exceed uint32");
    const int64_t* off = offsets.data();
    require(off[0] == 0 && off[nq] == int64_t(list.shape(0)), "exact_rows: offsets must run from 0 to len(list)");
    const uint32_t* l = list.data();
    for (size_t i = 0; i < nq; ++i) {
      require(off[i] <= off[i + 1], "exact_rows: offsets must not decrease");
      for (int64_t j = off[i]; j < off[i + 1]; ++j)
        require(l[j] < space && (j == off[i] || l[j - 1] < l[j]), "exact_rows: each list must ascend, within the rows");
    }
    for (size_t r = 0; r < nq; ++r)
      require(sizes.data()[r] >= 0 && size_t(sizes.data()[r]) <= k, "exact_rows: bad sizes");
    nb::gil_scoped_release release;
    mipscan::exact_rows(mipscan::kernels(), queries.data(), nq, d, rows.data(), space, off, l, k,
                        heap_s.data(), heap_id.data(), sizes.data(), block_rows, num_threads);
  }, "queries"_a.noconvert(), "rows"_a.noconvert(), "offsets"_a.noconvert(), "list"_a.noconvert(),
     "heap_s"_a.noconvert(), "heap_id"_a.noconvert(), "sizes"_a.noconvert(), "block_rows"_a,
     "num_threads"_a);

  m.def("sorted_lists", [](In<int64_t, 1> offsets, In<uint32_t, 1> rows) {
    require(offsets.shape(0) >= 1, "sorted_lists: offsets needs nq + 1 entries");
    const size_t nq = offsets.shape(0) - 1;
    const int64_t* off = offsets.data();
    require(off[0] == 0 && off[nq] == int64_t(rows.shape(0)), "sorted_lists: offsets must run from 0 to len(rows)");
    for (size_t i = 0; i < nq; ++i) require(off[i] <= off[i + 1], "sorted_lists: offsets must not decrease");
    auto out_off = new_array<int64_t>(nq + 1);
    auto out_rows = new_array<uint32_t>(rows.shape(0));
    size_t n;
    {
      nb::gil_scoped_release release;
      n = mipscan::sorted_lists(nq, off, rows.data(), out_off.data(), out_rows.data());
    }
    return std::make_tuple(out_off, out_rows, n);
  }, "offsets"_a.noconvert(), "rows"_a.noconvert());

  m.def("topk_columns", [](In<float, 2> scores_t, size_t k, const std::string& level) {
    const size_t m_ = scores_t.shape(0), nq = scores_t.shape(1);
    require(k >= 1 && k <= m_, "topk_columns: k must be in [1, rows of scores_t]");
    const mipscan::TopkColumnsFn fn = level.empty() ? mipscan::kernels().topk_columns
                                                    : kernels_at(level, "topk_columns").topk_columns;
    auto s = new_array<float>(nq, k);
    auto id = new_array<uint32_t>(nq, k);
    {
      nb::gil_scoped_release release;
      fn(scores_t.data(), m_, nq, k, s.data(), id.data());
    }
    return std::make_pair(s, id);
  }, "scores_t"_a.noconvert(), "k"_a, "level"_a = "");

  m.def("filter_bitsets", [](size_t space, std::optional<In<uint64_t, 1>> allow,
                             std::optional<In<uint64_t, 1>> dead, In<int64_t, 1> list_offsets,
                             In<uint32_t, 1> list_rows, bool list_excludes, int num_threads) {
    const size_t words = (space + 63) / 64;
    require(list_offsets.shape(0) >= 1, "filter_bitsets: list_offsets needs nq + 1 entries");
    const size_t nq = list_offsets.shape(0) - 1;
    const int64_t* off = list_offsets.data();
    require(off[0] == 0 && off[nq] == int64_t(list_rows.shape(0)),
            "filter_bitsets: list_offsets must run from 0 to len(list_rows)");
    for (size_t i = 0; i < nq; ++i) require(off[i] <= off[i + 1], "filter_bitsets: list_offsets must not decrease");
    for (size_t j = 0; j < list_rows.shape(0); ++j)
      require(list_rows.data()[j] < space, "filter_bitsets: list_rows out of range");
    require(!allow || allow->shape(0) >= words, "filter_bitsets: allow must hold one bit per row");
    require(!dead || dead->shape(0) >= words, "filter_bitsets: dead must hold one bit per row");
    auto out = new_array<uint64_t>(nq, words);
    auto counts = new_array<int64_t>(nq);
    {
      nb::gil_scoped_release release;
      mipscan::filter_bitsets(nq, space, allow ? allow->data() : nullptr, dead ? dead->data() : nullptr,
                              off, list_rows.data(), list_excludes, out.data(), counts.data(), num_threads);
    }
    return std::make_pair(out, counts);
  }, "space"_a, "allow"_a.noconvert().none(), "dead"_a.noconvert().none(), "list_offsets"_a.noconvert(),
     "list_rows"_a.noconvert(), "list_excludes"_a, "num_threads"_a);

  m.def("topk_finish_rows", [](nb::ndarray<float, nb::ndim<2>, nb::c_contig> heap_s,
                               nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig> heap_id,
                               In<int64_t, 1> sizes, int num_threads) {
    const size_t nq = heap_s.shape(0), k = heap_s.shape(1);
    require(heap_id.shape(0) == nq && heap_id.shape(1) == k && sizes.shape(0) == nq,
            "topk_finish_rows: shapes do not match");
    for (size_t r = 0; r < nq; ++r)
      require(sizes.data()[r] >= 0 && size_t(sizes.data()[r]) <= k, "topk_finish_rows: bad sizes");
    nb::gil_scoped_release release;
    mipscan::topk_finish_rows(nq, k, heap_s.data(), heap_id.data(), sizes.data(), num_threads);
  }, "heap_s"_a.noconvert(), "heap_id"_a.noconvert(), "sizes"_a.noconvert(), "num_threads"_a);

  m.def("gather_residuals", [](In<float, 2> rows, In<int64_t, 1> ids, In<int64_t, 1> leaves,
                               In<float, 2> centroids, size_t dp, int num_threads) {
    const size_t n = ids.shape(0), width = rows.shape(1);
    require(leaves.shape(0) == n && centroids.shape(1) == width && dp >= width,
            "gather_residuals: ids and leaves differ in length, centroids and rows in width, or dp < width");
    check_slots(rows.shape(0), ids, centroids.shape(0), leaves, "gather_residuals");
    auto out = new_array<float>(n, dp);
    nb::gil_scoped_release release;
    mipscan::gather_residuals(rows.data(), width, ids.data(), leaves.data(), centroids.data(), n,
                              dp, num_threads, out.data());
    return out;
  }, "rows"_a.noconvert(), "ids"_a.noconvert(), "leaves"_a.noconvert(), "centroids"_a.noconvert(),
     "dp"_a, "num_threads"_a);

  // The encoder and the codebook trainer take an optional SIMD level (tests compare them).
  m.def("encode_anisotropic_rows", [](In<float, 2> rows, In<int64_t, 1> ids, In<int64_t, 1> leaves,
                                      In<float, 2> centroids, In<float, 3> codebooks, float threshold,
                                      int max_iterations, int num_threads,
                                      std::optional<std::string> level) {
    const mipscan::Kernels kn = level ? kernels_at(*level, "encode_anisotropic_rows") : mipscan::kernels();
    const size_t n = ids.shape(0), width = rows.shape(1);
    const size_t nb_ = codebooks.shape(0), dpb = codebooks.shape(2);
    require(codebooks.shape(1) == 16 && nb_ * dpb >= width && nb_ * dpb < width + std::max<size_t>(dpb, 1),
            "encode_anisotropic_rows: codebooks must be (num_blocks, 16, dims_per_block) covering the row width");
    require(leaves.shape(0) == n && centroids.shape(1) == width,
            "encode_anisotropic_rows: ids and leaves differ in length, or centroids and rows in width");
    check_slots(rows.shape(0), ids, centroids.shape(0), leaves, "encode_anisotropic_rows");
    auto out = new_array<uint8_t>(n, nb_);
    nb::gil_scoped_release release;
    mipscan::encode_anisotropic_rows(kn, rows.data(), width, ids.data(), leaves.data(), centroids.data(),
                                     n, nb_, dpb, codebooks.data(), threshold, width,
                                     max_iterations, num_threads, out.data());
    return out;
  }, "rows"_a.noconvert(), "ids"_a.noconvert(), "leaves"_a.noconvert(), "centroids"_a.noconvert(),
     "codebooks"_a.noconvert(), "threshold"_a, "max_iterations"_a, "num_threads"_a,
     "level"_a = nb::none());

  m.def("train_block_codebooks", [](In<float, 2> data, In<float, 3> init, int iterations, int num_threads,
                                    std::optional<std::string> level) {
    const mipscan::Kernels kn = level ? kernels_at(*level, "train_block_codebooks") : mipscan::kernels();
    const size_t m_ = data.shape(0), nb_ = init.shape(0), dpb = init.shape(2);
    require(m_ >= 1 && init.shape(1) == 16 && nb_ * dpb == data.shape(1),
            "train_block_codebooks: init must be (num_blocks, 16, dims_per_block) covering the data width");
    float* books = new float[nb_ * 16 * dpb];
    std::copy(init.data(), init.data() + nb_ * 16 * dpb, books);
    nb::capsule owner(books, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    Out<float, 3> out(books, {nb_, 16, dpb}, owner);
    nb::gil_scoped_release release;
    mipscan::train_block_codebooks(kn, data.data(), m_, nb_, dpb, iterations, num_threads, books);
    return out;
  }, "data"_a.noconvert(), "init"_a.noconvert(), "iterations"_a, "num_threads"_a,
     "level"_a = nb::none());

  m.def("dots", [](In<float, 2> qs, In<float, 2> rows, const std::string& level) {
    // For tests: the centroid-scoring kernel of one SIMD level.
    const size_t nq = qs.shape(0), m_ = rows.shape(0), d = qs.shape(1);
    require(rows.shape(1) == d, "dots: queries and rows must have the same width");
    const mipscan::DotsFn fn = kernels_at(level, "dots").dots;
    auto out = new_array<float>(nq, m_);
    fn(qs.data(), nq, rows.data(), m_, d, out.data());
    return out;
  }, "queries"_a.noconvert(), "rows"_a.noconvert(), "level"_a);

  m.def("dot_rows", [](In<float, 1> q, In<float, 2> rows, In<uint32_t, 1> ids, const std::string& level) {
    // For tests: the float32 reorder kernel of one SIMD level, out[t] = q . rows[ids[t]].
    const size_t d = q.shape(0), m_ = ids.shape(0);
    require(rows.shape(1) == d, "dot_rows: the query and rows must have the same width");
    for (size_t t = 0; t < m_; ++t) require(ids.data()[t] < rows.shape(0), "dot_rows: an id is out of range");
    const mipscan::DotRowsFn fn = kernels_at(level, "dot_rows").dot_rows;
    auto out = new_array<float>(m_);
    fn(q.data(), rows.data(), d, ids.data(), m_, out.data());
    return out;
  }, "query"_a.noconvert(), "rows"_a.noconvert(), "ids"_a.noconvert(), "level"_a);

  // For tests: the quantized dot products of one SIMD level (reorder.h), out[i, r] =
  // dot(queries[i], rows[r]) with int8 rows (scales already folded into the queries) or
  // bfloat16 rows (uint16 bit patterns).
  m.def("dot_i8", [](In<float, 2> qs, In<int8_t, 2> rows, const std::string& level) {
    return quantized_dot_table(qs, rows, kernels_at(level, "dot_i8").dot_i8, "dot_i8");
  }, "queries"_a.noconvert(), "rows"_a.noconvert(), "level"_a);
  m.def("dot_bf16", [](In<float, 2> qs, In<uint16_t, 2> rows, const std::string& level) {
    return quantized_dot_table(qs, rows, kernels_at(level, "dot_bf16").dot_bf16, "dot_bf16");
  }, "queries"_a.noconvert(), "rows"_a.noconvert(), "level"_a);

  m.def("cluster_sums", [](In<float, 2> x, In<int64_t, 1> labels, size_t k) {
    const size_t n = x.shape(0), d = x.shape(1);
    require(labels.shape(0) == n && k >= 1, "cluster_sums: labels must have one entry per row, k >= 1");
    auto sums = new_array<double>(k, d);
    auto counts = new_array<int64_t>(k);
    nb::gil_scoped_release release;
    mipscan::cluster_sums(x.data(), n, d, labels.data(), k, sums.data(), counts.data());
    return std::make_pair(sums, counts);
  }, "x"_a.noconvert(), "labels"_a.noconvert(), "k"_a);

  // argmax(s - h, axis=1) in one pass (k-means assignment); level None: the loaded one.
  m.def("nearest_centroids", [](In<float, 2> x, In<float, 2> centroids_t, In<float, 1> h,
                                int num_threads, std::optional<std::string> level) {
    const mipscan::Kernels kn = level ? kernels_at(*level, "nearest_centroids") : mipscan::kernels();
    const size_t n = x.shape(0), d = x.shape(1), L = centroids_t.shape(1);
    require(centroids_t.shape(0) == d && L >= 1 && h.shape(0) == L,
            "nearest_centroids: centroids_t must be (d, L) with L >= 1 and h of length L");
    auto out = new_array<int64_t>(n);
    nb::gil_scoped_release release;
    mipscan::nearest_centroids(kn, x.data(), n, d, centroids_t.data(), h.data(), L, num_threads,
                               out.data());
    return out;
  }, "x"_a.noconvert(), "centroids_t"_a.noconvert(), "h"_a.noconvert(), "num_threads"_a,
     "level"_a = nb::none());

  m.def("argmax_shifted", [](In<float, 2> s, In<float, 1> h, std::optional<std::string> level) {
    const size_t m_ = s.shape(0), k = s.shape(1);
    require(k >= 1 && h.shape(0) == k, "argmax_shifted: h must have one entry per column");
    const mipscan::ArgmaxShiftedFn fn =
        level ? kernels_at(*level, "argmax_shifted").argmax_shifted : mipscan::kernels().argmax_shifted;
    auto out = new_array<int64_t>(m_);
    nb::gil_scoped_release release;
    fn(s.data(), m_, k, h.data(), out.data());
    return out;
  }, "s"_a.noconvert(), "h"_a.noconvert(), "level"_a = nb::none());

  nb::class_<Index>(m, "Index")
      .def("__init__",
           [](Index* self, In<float, 2> centroids, In<int64_t, 1> leaf_offsets, In<uint32_t, 1> slot_ids,
              std::optional<In<float, 3>> codebooks, std::optional<In<uint8_t, 1>> packed_codes,
              std::optional<In<int64_t, 1>> leaf_groups, std::optional<In<float, 2>> slot_rows,
              std::optional<In<float, 2>> reorder_rows, std::optional<In<int8_t, 2>> reorder_int8,
              std::optional<In<uint16_t, 2>> reorder_bf16, std::optional<In<float, 1>> reorder_scales,
              std::optional<In<int8_t, 2>> slot_int8, std::optional<In<uint16_t, 2>> slot_bf16,
              std::optional<In<float, 1>> slot_scales, std::optional<In<int8_t, 2>> centroids_int8,
              std::optional<In<uint16_t, 2>> centroids_bf16, std::optional<In<float, 1>> centroid_scales,
              std::optional<In<float, 2>> upper_centroids, std::optional<In<int64_t, 1>> upper_offsets,
              std::optional<In<float, 1>> reorder_row_scales, std::optional<In<float, 1>> slot_row_scales,
              std::optional<In<float, 1>> centroid_row_scales, std::optional<size_t> n,
              std::optional<In<float, 1>> leaf_spread, float spread_weight,
              std::optional<In<float, 3>> leaf_axes) {
             mipscan::IndexView v;
             v.num_leaves = centroids.shape(0);
             v.d = centroids.shape(1);
             v.num_slots = slot_ids.shape(0);
             v.n = n ? *n : v.num_slots;
             require(v.num_leaves >= 1 && v.n >= 1, "Index: empty index");
             require(v.num_slots >= v.n && v.num_slots <= 2 * v.n, "Index: slot_ids must hold n to 2n slots");
             require(leaf_offsets.shape(0) == v.num_leaves + 1, "Index: leaf_offsets must have num_leaves + 1 entries");
             const int64_t* off = leaf_offsets.data();
             require(off[0] == 0 && off[v.num_leaves] == int64_t(v.num_slots), "Index: leaf_offsets must run from 0 to the slot count");
             for (size_t l = 0; l < v.num_leaves; ++l) {
               require(off[l] <= off[l + 1], "Index: leaf_offsets must not decrease");
               v.max_leaf_size = std::max(v.max_leaf_size, size_t(off[l + 1] - off[l]));
             }
             {
               // Every datapoint in one or two slots: what the k-results guarantee rests on.
               mipscan::fault::alloc();
               std::vector<uint8_t> times(v.n, 0);
               for (size_t i = 0; i < v.num_slots; ++i) {
                 const uint32_t row = slot_ids.data()[i];
                 require(row < v.n, "Index: slot_ids out of range");
                 require(++times[row] <= 2, "Index: a datapoint is in more than two slots");
               }
               for (size_t r = 0; r < v.n; ++r) require(times[r] >= 1, "Index: a datapoint is in no slot");
             }
             v.centroids = centroids.data();
             v.leaf_offsets = off;
             v.slot_ids = slot_ids.data();
             if (codebooks || packed_codes || leaf_groups) {
               require(codebooks && packed_codes && leaf_groups, "Index: AH needs codebooks, packed_codes and leaf_groups");
               v.num_blocks = codebooks->shape(0);
               v.dims_per_block = codebooks->shape(2);
               require(codebooks->shape(1) == 16 && v.num_blocks * v.dims_per_block >= v.d &&
                           (v.num_blocks - 1) * v.dims_per_block < v.d, "Index: codebooks do not cover d");
               require(leaf_groups->shape(0) == v.num_leaves + 1, "Index: leaf_groups must have num_leaves + 1 entries");
               const int64_t* g = leaf_groups->data();
               require(g[0] == 0, "Index: leaf_groups must start at 0");
               for (size_t l = 0; l < v.num_leaves; ++l)
                 require(g[l + 1] - g[l] == int64_t(mipscan::num_groups(size_t(off[l + 1] - off[l]))),
                         "Index: leaf_groups do not match leaf sizes");
               require(size_t(g[v.num_leaves]) * mipscan::group_bytes(v.num_blocks) == packed_codes->shape(0),
                       "Index: packed_codes size does not match leaf_groups");
               v.codebooks = codebooks->data();
               v.packed_codes = packed_codes->data();
               v.leaf_groups = g;
             } else {
               require(slot_rows || slot_int8 || slot_bf16, "Index: needs AH arrays or slot rows");
             }
             if (slot_rows) {
               require(slot_rows->shape(0) == v.num_slots && slot_rows->shape(1) == v.d, "Index: slot_rows must be (slots, d)");
               v.slot_rows = slot_rows->data();
             }
             if (reorder_rows) {
               require(reorder_rows->shape(0) == v.n && reorder_rows->shape(1) == v.d, "Index: reorder_rows must be (n, d)");
               v.reorder_rows = reorder_rows->data();
             }
             // Quantized copies (reorder.h): each (rows, d) with the float32 rows' row count,
             // int8 ones with d scales, at most one of float32 / int8 / bf16 per role.
             auto rows_of = [&](const auto& a, size_t rows, const char* what) {
               if (a) require(a->shape(0) == rows && a->shape(1) == v.d, what);
               return a ? a->data() : nullptr;
             };
             auto scales_of = [&](bool need, const std::optional<In<float, 1>>& a, const char* what) {
               require(need == a.has_value() && (!a || a->shape(0) == v.d), what);
               return a ? a->data() : nullptr;
             };
             // Row scales in (0, 1] (the int8 codes stay within the per-dimension bounds).
             auto row_scales_of = [&](bool need, const std::optional<In<float, 1>>& a, size_t rows, const char* what) {
               require(need == a.has_value() && (!a || a->shape(0) == rows), what);
               if (a)
                 for (size_t i = 0; i < rows; ++i) require(a->data()[i] > 0 && a->data()[i] <= 1, what);
               return a ? a->data() : nullptr;
             };
             v.reorder_i8 = rows_of(reorder_int8, v.n, "Index: reorder_int8 must be (n, d)");
             v.reorder_bf16 = rows_of(reorder_bf16, v.n, "Index: reorder_bf16 must be (n, d)");
             v.reorder_scales = scales_of(reorder_int8.has_value(), reorder_scales,
                                          "Index: reorder_scales must be (d,), given with reorder_int8 only");
             v.reorder_row_scales = row_scales_of(reorder_int8.has_value(), reorder_row_scales, v.n,
                                                  "Index: reorder_row_scales must be (n,) in (0, 1], given with reorder_int8 only");
             require(int(reorder_rows.has_value()) + int(reorder_int8.has_value()) + int(reorder_bf16.has_value()) <= 1,
                     "Index: at most one kind of reorder rows");
             v.slot_i8 = rows_of(slot_int8, v.num_slots, "Index: slot_int8 must be (slots, d)");
             v.slot_bf16 = rows_of(slot_bf16, v.num_slots, "Index: slot_bf16 must be (slots, d)");
             v.slot_scales = scales_of(slot_int8.has_value(), slot_scales,
                                       "Index: slot_scales must be (d,), given with slot_int8 only");
             v.slot_row_scales = row_scales_of(slot_int8.has_value(), slot_row_scales, v.num_slots,
                                               "Index: slot_row_scales must be (slots,) in (0, 1], given with slot_int8 only");
             require(int(slot_rows.has_value()) + int(slot_int8.has_value()) + int(slot_bf16.has_value()) <= 1 &&
                         !(v.packed_codes && (slot_int8 || slot_bf16)),
                     "Index: at most one kind of slot rows, and none with AH");
             v.centroids_i8 = rows_of(centroids_int8, v.num_leaves, "Index: centroids_int8 must be (num_leaves, d)");
             v.centroids_bf16 = rows_of(centroids_bf16, v.num_leaves, "Index: centroids_bf16 must be (num_leaves, d)");
             v.centroid_scales = scales_of(centroids_int8.has_value(), centroid_scales,
                                           "Index: centroid_scales must be (d,), given with centroids_int8 only");
             v.centroid_row_scales = row_scales_of(centroids_int8.has_value(), centroid_row_scales, v.num_leaves,
                                                   "Index: centroid_row_scales must be (num_leaves,) in (0, 1], given with centroids_int8 only");
             require(!(centroids_int8 && centroids_bf16), "Index: at most one kind of quantized centroids");
             if (upper_centroids || upper_offsets) {
               // Upper tree: every node has at least one child; the children cover the leaves.
               require(upper_centroids && upper_offsets, "Index: an upper tree needs upper_centroids and upper_offsets");
               const size_t U = upper_centroids->shape(0);
               require(U >= 1 && upper_centroids->shape(1) == v.d && upper_offsets->shape(0) == U + 1,
                       "Index: upper_centroids must be (num_upper, d), upper_offsets num_upper + 1");
               const int64_t* uo = upper_offsets->data();
               require(uo[0] == 0 && uo[U] == int64_t(v.num_leaves), "Index: upper_offsets must run from 0 to num_leaves");
               for (size_t u = 0; u < U; ++u) require(uo[u] < uo[u + 1], "Index: upper_offsets must increase");
               v.num_upper = U;
               v.upper_centroids = upper_centroids->data();
               v.upper_offsets = uo;
             }
             // Leaf order by spread (search.h): its values are not trusted (the search
             // takes NaN sums as -inf), only its size and the weight's range.
             require(std::isfinite(spread_weight) && spread_weight >= 0,
                     "Index: spread_weight must be a finite number >= 0");
             if (leaf_spread) {
               require(leaf_spread->shape(0) == v.num_leaves, "Index: leaf_spread must be (num_leaves,)");
               v.leaf_spread = leaf_spread->data();
               v.spread_weight = spread_weight;
             }
             if (leaf_axes) {
               require(leaf_spread.has_value() && leaf_axes->shape(0) == v.num_leaves && leaf_axes->shape(2) == v.d,
                       "Index: leaf_axes must be (num_leaves, rank, d), with leaf_spread");
               v.leaf_axes = leaf_axes->data();
               v.axes_rank = leaf_axes->shape(1);
             }
             new (self) Index{v, {}};
           },
           "centroids"_a.noconvert(), "leaf_offsets"_a.noconvert(), "slot_ids"_a.noconvert(),
           "codebooks"_a.noconvert().none(), "packed_codes"_a.noconvert().none(),
           "leaf_groups"_a.noconvert().none(), "slot_rows"_a.noconvert().none(),
           "reorder_rows"_a.noconvert().none(), "reorder_int8"_a.noconvert().none() = nb::none(),
           "reorder_bf16"_a.noconvert().none() = nb::none(), "reorder_scales"_a.noconvert().none() = nb::none(),
           "slot_int8"_a.noconvert().none() = nb::none(), "slot_bf16"_a.noconvert().none() = nb::none(),
           "slot_scales"_a.noconvert().none() = nb::none(), "centroids_int8"_a.noconvert().none() = nb::none(),
           "centroids_bf16"_a.noconvert().none() = nb::none(), "centroid_scales"_a.noconvert().none() = nb::none(),
           "upper_centroids"_a.noconvert().none() = nb::none(), "upper_offsets"_a.noconvert().none() = nb::none(),
           "reorder_row_scales"_a.noconvert().none() = nb::none(), "slot_row_scales"_a.noconvert().none() = nb::none(),
           "centroid_row_scales"_a.noconvert().none() = nb::none(), "n"_a.none() = nb::none(),
           "leaf_spread"_a.noconvert().none() = nb::none(), "spread_weight"_a = 0.0f,
           "leaf_axes"_a.noconvert().none() = nb::none(),
           nb::keep_alive<1, 2>(), nb::keep_alive<1, 3>(), nb::keep_alive<1, 4>(), nb::keep_alive<1, 5>(),
           nb::keep_alive<1, 6>(), nb::keep_alive<1, 7>(), nb::keep_alive<1, 8>(), nb::keep_alive<1, 9>(),
           nb::keep_alive<1, 10>(), nb::keep_alive<1, 11>(), nb::keep_alive<1, 12>(), nb::keep_alive<1, 13>(),
           nb::keep_alive<1, 14>(), nb::keep_alive<1, 15>(), nb::keep_alive<1, 16>(), nb::keep_alive<1, 17>(),
           nb::keep_alive<1, 18>(), nb::keep_alive<1, 19>(), nb::keep_alive<1, 20>(), nb::keep_alive<1, 21>(),
           nb::keep_alive<1, 22>(), nb::keep_alive<1, 23>(), nb::keep_alive<1, 25>(),
           nb::keep_alive<1, 27>())
      .def_prop_ro("n", [](const Index& ix) { return ix.view.n; })
      .def_prop_ro("num_slots", [](const Index& ix) { return ix.view.num_slots; })
      .def_prop_ro("d", [](const Index& ix) { return ix.view.d; })
      .def_prop_ro("num_leaves", [](const Index& ix) { return ix.view.num_leaves; })
      // Search scratch kept by this index between searches: (count, bytes).
      .def_prop_ro("cached_scratch", [](Index& ix) {
        return std::make_pair(ix.scratch.cached_count(), ix.scratch.cached_bytes());
      })
      .def("search_batch",
           [](Index& ix, In<float, 2> queries, std::optional<In<float, 2>> leaf_scores,
              size_t leaves_to_search, size_t pre_reorder_k, size_t final_k, int num_threads,
              std::optional<std::string> level, double overretrieve, size_t upper_to_search) {
             // level: run this call at another SIMD level (tests); None = the one fixed at load.
             const mipscan::Kernels kn = level ? kernels_at(*level, "search_batch") : mipscan::kernels();
             return search_view(ix.view, ix.scratch, kn, queries, leaf_scores, leaves_to_search,
                                pre_reorder_k, final_k, overretrieve, upper_to_search, num_threads,
                                "search_batch: final_k must be in [1, n]");
           },
           "queries"_a.noconvert(), "leaf_scores"_a.noconvert().none(), "leaves_to_search"_a,
           "pre_reorder_k"_a, "final_k"_a, "num_threads"_a, "level"_a.none() = nb::none(),
           "overretrieve"_a = 2.0, "upper_to_search"_a = 1)
      .def("search_batch_filtered",
           [](Index& ix, In<float, 2> queries, std::optional<In<float, 2>> leaf_scores,
              size_t leaves_to_search, size_t pre_reorder_k, size_t final_k, int num_threads,
              const std::optional<In<uint64_t, 1>>& allow, const std::optional<In<int64_t, 1>>& list_offsets,
              const std::optional<In<uint32_t, 1>>& list_rows, bool list_excludes, const std::optional<In<int64_t, 1>>& eligible,
              const std::optional<In<uint8_t, 1>>& exact, float leaf_exponent,
              const std::optional<In<uint32_t, 1>>& shared_rows, double overretrieve, size_t upper_to_search) {
             return filtered_search(ix.view, ix.scratch, mipscan::kernels(), queries, leaf_scores, leaves_to_search,
                                    pre_reorder_k, final_k, overretrieve, upper_to_search, num_threads, allow, list_offsets, list_rows,
                                    list_excludes, eligible, exact, leaf_exponent, shared_rows);
           },
           "queries"_a.noconvert(), "leaf_scores"_a.noconvert().none(), "leaves_to_search"_a,
           "pre_reorder_k"_a, "final_k"_a, "num_threads"_a, "allow"_a.noconvert().none(), "list_offsets"_a.noconvert().none(), "list_rows"_a.noconvert().none(),
           "list_excludes"_a, "eligible"_a.noconvert().none(), "exact"_a.noconvert().none(), "leaf_exponent"_a,
           "shared_rows"_a.noconvert().none() = nb::none(), "overretrieve"_a = 2.0, "upper_to_search"_a = 1)
      .def_prop_ro("has_exact_rows", [](const Index& ix) { return ix.view.reorders(); });

  // Live index snapshots (live.h). n (live rows) is given by the caller, who counts them;
  // the rows of the segments and the tombstones must agree with it (Python's _live.py).
  nb::class_<Live>(m, "Live")
      .def_static("from_flat",
           [](In<float, 2> centroids, std::optional<In<float, 3>> codebooks, In<float, 2> row_data, size_t num_rows,
              In<uint64_t, 1> dead, In<uint32_t, 1> leaf_live, size_t n_live, bool reorder,
              In<int64_t, 1> leaf_offsets, In<uint32_t, 1> slot_ids, std::optional<In<uint8_t, 1>> packed,
              std::optional<In<int64_t, 1>> leaf_groups, std::optional<In<float, 1>> leaf_spread,
              float spread_weight, std::optional<In<float, 3>> leaf_axes) {
             const size_t L = centroids.shape(0);
             require(!leaf_spread || leaf_spread->shape(0) == L, "Live: leaf_spread must be (num_leaves,)");
             require(!leaf_axes || (leaf_spread && leaf_axes->shape(0) == L && leaf_axes->shape(2) == centroids.shape(1)),
                     "Live: leaf_axes must be (num_leaves, rank, d), with leaf_spread");
             require(std::isfinite(spread_weight) && spread_weight >= 0,
                     "Live: spread_weight must be a finite number >= 0");
             require(L >= 1 && leaf_offsets.shape(0) == L + 1, "Live: leaf_offsets must have num_leaves + 1 entries");
             const int64_t* off = leaf_offsets.data();
             require(off[0] == 0 && off[L] == int64_t(slot_ids.shape(0)), "Live: leaf_offsets must run from 0 to the slot count");
             for (size_t l = 0; l < L; ++l) require(off[l] <= off[l + 1], "Live: leaf_offsets must not decrease");
             for (size_t i = 0; i < slot_ids.shape(0); ++i) require(slot_ids.data()[i] < num_rows, "Live: slot_ids out of range");
             size_t nb_ = 0;
             if (packed) {
               require(codebooks && leaf_groups && leaf_groups->shape(0) == L + 1, "Live: AH needs codebooks and leaf_groups");
               nb_ = codebooks->shape(0);
               const int64_t* g = leaf_groups->data();
               require(g[0] == 0, "Live: leaf_groups must start at 0");
               for (size_t l = 0; l < L; ++l)
                 require(g[l + 1] - g[l] == int64_t(mipscan::num_groups(size_t(off[l + 1] - off[l]))), "Live: leaf_groups do not match leaf sizes");
               require(size_t(g[L]) * mipscan::group_bytes(nb_) == packed->shape(0), "Live: packed_codes size does not match leaf_groups");
             }
             auto lv = std::make_shared<const mipscan::LiveLeaves>(L, nb_, off, slot_ids.data(),
                                                                   packed ? packed->data() : nullptr,
                                                                   leaf_groups ? leaf_groups->data() : nullptr);
             Live out{lv, std::make_shared<mipscan::ScratchCache>(), {}, nullptr, nullptr};
             out.view = live_view(*lv, centroids, codebooks, row_data, num_rows, dead, leaf_live, reorder);
             out.view.n = n_live;
             if (leaf_spread && spread_weight > 0) {
               mipscan::fault::alloc();
               auto copy = [](const float* p, size_t count) {
                 return std::make_shared<const std::vector<float>>(p, p + count);
               };
               out.set_spread(copy(leaf_spread->data(), L), spread_weight,
                              leaf_axes ? copy(leaf_axes->data(), leaf_axes->size()) : nullptr,
                              leaf_axes ? leaf_axes->shape(1) : 0);
             }
             return out;
           },
           "centroids"_a.noconvert(), "codebooks"_a.noconvert().none(), "row_data"_a.noconvert(), "num_rows"_a,
           "dead"_a.noconvert(), "leaf_live"_a.noconvert(), "n_live"_a, "reorder"_a, "leaf_offsets"_a.noconvert(),
           "slot_ids"_a.noconvert(), "packed_codes"_a.noconvert().none(), "leaf_groups"_a.noconvert().none(),
           "leaf_spread"_a.noconvert().none() = nb::none(), "spread_weight"_a = 0.0f,
           "leaf_axes"_a.noconvert().none() = nb::none(),
           nb::keep_alive<0, 1>(), nb::keep_alive<0, 2>(), nb::keep_alive<0, 3>(), nb::keep_alive<0, 5>(),
           nb::keep_alive<0, 6>())
      .def("derive",
           [](const Live& base, In<float, 2> centroids, std::optional<In<float, 3>> codebooks, In<float, 2> row_data,
              size_t num_rows, In<uint64_t, 1> dead, In<uint32_t, 1> leaf_live, size_t n_live, bool reorder,
              In<int64_t, 1> reset, In<int64_t, 1> leaves, In<uint32_t, 1> rows, std::optional<In<uint8_t, 2>> codes) {
             const size_t L = base.leaves->num_leaves(), m_ = leaves.shape(0), nb_ = base.leaves->num_blocks();
             require(rows.shape(0) == m_, "Live.derive: leaves and rows differ in length");
             require(nb_ == 0 || (codes && codes->shape(0) == m_ && codes->shape(1) == nb_), "Live.derive: codes must be (m, num_blocks)");
             for (size_t i = 0; i < m_; ++i)
               require(leaves.data()[i] >= 0 && size_t(leaves.data()[i]) < L && rows.data()[i] < num_rows, "Live.derive: leaf or row out of range");
             for (size_t i = 0; i < reset.shape(0); ++i)
               require(reset.data()[i] >= 0 && size_t(reset.data()[i]) < L, "Live.derive: reset leaf out of range");
             std::shared_ptr<const mipscan::LiveLeaves> lv;
             {
               nb::gil_scoped_release release;  // searches go on meanwhile: nothing they see changes
               lv = std::make_shared<const mipscan::LiveLeaves>(*base.leaves, reset.shape(0), reset.data(), m_, leaves.data(),
                                                                rows.data(), nb_ ? codes->data() : nullptr);
             }
             Live out{lv, base.scratch, {}, nullptr, nullptr};
             out.view = live_view(*lv, centroids, codebooks, row_data, num_rows, dead, leaf_live, reorder);
             out.view.n = n_live;
             out.set_spread(base.spread, base.view.spread_weight, base.axes, base.view.axes_rank);  // the same leaves
             return out;
           },
           "centroids"_a.noconvert(), "codebooks"_a.noconvert().none(), "row_data"_a.noconvert(), "num_rows"_a,
           "dead"_a.noconvert(), "leaf_live"_a.noconvert(), "n_live"_a, "reorder"_a, "reset"_a.noconvert(),
           "leaves"_a.noconvert(), "rows"_a.noconvert(), "codes"_a.noconvert().none(),
           nb::keep_alive<0, 2>(), nb::keep_alive<0, 3>(), nb::keep_alive<0, 4>(), nb::keep_alive<0, 6>(),
           nb::keep_alive<0, 7>())
      .def_prop_ro("n", [](const Live& lv) { return lv.view.n; })
      .def_prop_ro("num_leaves", [](const Live& lv) { return lv.view.num_leaves; })
      // Entries per leaf segment, tombstoned ones included (uint32, a copy).
      .def("leaf_sizes", [](const Live& lv) {
        auto out = new_array<uint32_t>(lv.view.num_leaves);
        std::copy(lv.view.leaf_sizes, lv.view.leaf_sizes + lv.view.num_leaves, out.data());
        return out;
      })
      // Leaf l's entries: (rows, packed codes), copies.
      .def("leaf", [](const Live& lv, size_t l) {
        require(l < lv.view.num_leaves, "Live.leaf: leaf out of range");
        const mipscan::LiveSegment& seg = lv.leaves->segment(l);
        auto rows = new_array<uint32_t>(seg.rows.size());
        std::copy(seg.rows.begin(), seg.rows.end(), rows.data());
        auto codes = new_array<uint8_t>(seg.codes.size());
        std::copy(seg.codes.begin(), seg.codes.end(), codes.data());
        return std::make_pair(rows, codes);
      })
      .def("search_batch",
           [](Live& lv, In<float, 2> queries, std::optional<In<float, 2>> leaf_scores,
              size_t leaves_to_search, size_t pre_reorder_k, size_t final_k, int num_threads,
              double overretrieve) {
             return search_view(lv.view, *lv.scratch, mipscan::kernels(), queries, leaf_scores,
                                leaves_to_search, pre_reorder_k, final_k, overretrieve, 1, num_threads,
                                "search_batch: final_k must be in [1, live rows]");
           },
           "queries"_a.noconvert(), "leaf_scores"_a.noconvert().none(), "leaves_to_search"_a,
           "pre_reorder_k"_a, "final_k"_a, "num_threads"_a, "overretrieve"_a = 2.0)
      .def("search_batch_filtered",
           [](Live& lv, In<float, 2> queries, std::optional<In<float, 2>> leaf_scores,
              size_t leaves_to_search, size_t pre_reorder_k, size_t final_k, int num_threads,
              const std::optional<In<uint64_t, 1>>& allow, const std::optional<In<int64_t, 1>>& list_offsets,
              const std::optional<In<uint32_t, 1>>& list_rows, bool list_excludes, const std::optional<In<int64_t, 1>>& eligible,
              const std::optional<In<uint8_t, 1>>& exact, float leaf_exponent,
              const std::optional<In<uint32_t, 1>>& shared_rows, double overretrieve) {
             return filtered_search(lv.view, *lv.scratch, mipscan::kernels(), queries, leaf_scores, leaves_to_search,
                                    pre_reorder_k, final_k, overretrieve, 1, num_threads, allow, list_offsets, list_rows,
                                    list_excludes, eligible, exact, leaf_exponent, shared_rows);
           },
           "queries"_a.noconvert(), "leaf_scores"_a.noconvert().none(), "leaves_to_search"_a,
           "pre_reorder_k"_a, "final_k"_a, "num_threads"_a, "allow"_a.noconvert().none(), "list_offsets"_a.noconvert().none(), "list_rows"_a.noconvert().none(),
           "list_excludes"_a, "eligible"_a.noconvert().none(), "exact"_a.noconvert().none(), "leaf_exponent"_a,
           "shared_rows"_a.noconvert().none() = nb::none(), "overretrieve"_a = 2.0)
      .def_prop_ro("has_exact_rows", [](const Live& lv) { return lv.view.row_data != nullptr; });

  nb::class_<OneQuery>(m, "OneQuery")
      .def("__init__",
           [](OneQuery* self, nb::object engine, size_t n_live, size_t reorder_k, size_t leaves,
              size_t configured_leaves, double overretrieve, size_t upper_to_search, float max_abs) {
             const mipscan::IndexView* v = nullptr;
             mipscan::ScratchCache* cache = nullptr;
             if (nb::isinstance<Index>(engine)) {
               Index& ix = nb::cast<Index&>(engine);
               v = &ix.view;
               cache = &ix.scratch;
             } else if (nb::isinstance<Live>(engine)) {
               Live& lv = nb::cast<Live&>(engine);
               v = &lv.view;
               cache = lv.scratch.get();
             } else {
               throw std::invalid_argument("OneQuery: engine must be an Index or a Live");
             }
             require(n_live >= 1 && n_live <= v->n, "OneQuery: n_live must be in [1, n]");
             require(leaves >= 1 && leaves <= v->num_leaves, "OneQuery: leaves must be in [1, num_leaves]");
             require(configured_leaves >= v->num_leaves, "OneQuery: configured_leaves < num_leaves");
             search_params(*v, leaves, 1, 1, overretrieve, upper_to_search, "OneQuery");  // checks
             new (self) OneQuery{engine, v, cache, n_live, reorder_k, leaves, configured_leaves,
                                 overretrieve, upper_to_search, max_abs};
           },
           "engine"_a, "n_live"_a, "reorder_k"_a, "leaves_to_search"_a, "configured_leaves"_a,
           "overretrieve"_a, "upper_to_search"_a, "max_abs"_a)
      .def("__call__", &OneQuery::operator(), "q"_a.none(), "final_k"_a.none(), "pre_k"_a.none(),
           "leaves"_a.none());
}
