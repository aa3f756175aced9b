#include "filtered.h"

#include <algorithm>
#include <vector>

#include "fault.h"
#include "parallel.h"
#include "portable.h"
#include "topk.h"

namespace mipscan {

namespace {

// Rows requested ahead of the one scored (every line of each: a 50-float row spans 4).
constexpr size_t kAhead = 8;

inline void prefetch_rows(const float* row, size_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (size_t off = 0; off < bytes; off += 64) prefetch(p + off);
  prefetch(p + bytes - 1);
}

}  // namespace

namespace {

// A query's eligible rows in one block, ascending.
struct Seg {
  const uint32_t* p;
  size_t n;
};

// Scores the segments of queries [b, e) (segs[i - b]) into their heaps. Rows are requested
// kAhead ahead across query boundaries, so a query with a few rows in the block does not
// wait for each of them.
void score_segments(const Kernels& kn, const float* queries, size_t d,
                    const float* rows, size_t b, size_t e, const Seg* segs, size_t k,
                    float* heap_s, uint32_t* heap_id, int64_t* sizes, float* sc) {
  const size_t row_bytes = d * sizeof(float);
  size_t pf_q = 0, pf_j = 0, pf_g = 0;  // the next row to request: segs[pf_q].p[pf_j], pf_g-th
  size_t g = 0;                         // rows of the earlier segments
  auto request_to = [&](size_t want) {
    while (pf_g < want && pf_q < e - b) {
      if (pf_j < segs[pf_q].n) {
        prefetch_rows(rows + size_t{segs[pf_q].p[pf_j]} * d, row_bytes);
        ++pf_j;
        ++pf_g;
      } else {
        ++pf_q;
        pf_j = 0;
      }
    }
  };
  for (size_t i = b; i < e; ++i) {
    const Seg sg = segs[i - b];
    if (sg.n == 0) continue;
    HeapView h{heap_s + i * k, heap_id + i * k, k, static_cast<size_t>(sizes[i])};
    const float* q = queries + i * d;
    float thr = h.threshold();
    for (size_t j0 = 0; j0 < sg.n; j0 += kAhead) {
      const size_t j1 = std::min(sg.n, j0 + kAhead);
      request_to(g + j1 + kAhead);
      kn.dot_rows(q, rows, d, sg.p + j0, j1 - j0, sc);
      for (size_t j = j0; j < j1; ++j) {
        const float v = sc[j - j0];
        // Rows ascend, so an equal score loses to the kept (smaller) ids.
        if (h.size < k || v > thr) {
          h.push(v, sg.p[j]);
          thr = h.threshold();
        }
      }
    }
    g += sg.n;
    sizes[i] = static_cast<int64_t>(h.size);
  }
}

size_t default_block(size_t block_rows, size_t d) {
  if (block_rows == 0) {  // about 512 KB of rows: a quarter of a 2 MB L2
    block_rows = std::max<size_t>(64, (size_t{512} << 10) / std::max<size_t>(1, d * sizeof(float)));
  }
  return (block_rows + 63) / 64 * 64;
}

}  // namespace

void exact_bitsets(const Kernels& kn, const float* queries, size_t nq, size_t d,
                   const float* rows, size_t space, const uint64_t* bits, size_t words,
                   size_t k, float* heap_s, uint32_t* heap_id, int64_t* sizes,
                   size_t block_rows, int num_threads) {
  if (nq == 0 || space == 0) return;
  block_rows = default_block(block_rows, d);
  parallel_for(nq, num_threads, 8, [&](size_t b, size_t e, int) {
    fault::alloc();
    // The rows of the queries [b, e) in one block, query after query (sel).
    std::vector<uint32_t> sel;
    std::vector<size_t> from(e - b + 1);
    std::vector<Seg> segs(e - b);
    float sc[kAhead];
    for (size_t r0 = 0; r0 < space; r0 += block_rows) {
      const size_t r1 = std::min(space, r0 + block_rows);
      const size_t w0 = r0 / 64, w1 = (r1 + 63) / 64;
      size_t n = 0;  // rows in sel
      for (size_t i = b; i < e; ++i) {
        from[i - b] = n;
        const uint64_t* qb = bits + i * words;
        // The bitsets of a batch outgrow L2 (300 queries x 90,000 rows: 3.4 MB) and each
        // query's words of this block are a short run of its own: request the run of the
        // query after next while this one is read (it was 27 % of the time unrequested).
        if (i + 2 < e) {
          const char* nb = reinterpret_cast<const char*>(qb + 2 * words + w0);
          for (size_t off = 0; off < (w1 - w0) * 8; off += 64) prefetch(nb + off);
        }
        if (sel.size() < n + (w1 - w0) * 64) sel.resize(2 * (n + (w1 - w0) * 64));
        uint32_t* out = sel.data() + n;  // a raw cursor: push_back kept reloading its end
        for (size_t w = w0; w < w1; ++w) {
          uint64_t m = qb[w];
          if (r1 - w * 64 < 64) m &= (uint64_t{1} << (r1 - w * 64)) - 1;
          const uint32_t base = static_cast<uint32_t>(w * 64);
          while (m != 0) {
            *out++ = base + static_cast<uint32_t>(ctz64(m));
            m &= m - 1;
          }
        }
        n = static_cast<size_t>(out - sel.data());
      }
      from[e - b] = n;
      for (size_t i = b; i < e; ++i) segs[i - b] = Seg{sel.data() + from[i - b], from[i - b + 1] - from[i - b]};
      score_segments(kn, queries, d, rows, b, e, segs.data(), k, heap_s, heap_id, sizes, sc);
    }
  });
}

void exact_rows(const Kernels& kn, const float* queries, size_t nq, size_t d, const float* rows,
                size_t space, const int64_t* offsets, const uint32_t* list, size_t k,
                float* heap_s, uint32_t* heap_id, int64_t* sizes, size_t block_rows,
                int num_threads) {
  if (nq == 0 || space == 0) return;
  block_rows = default_block(block_rows, d);
  parallel_for(nq, num_threads, 8, [&](size_t b, size_t e, int) {
    fault::alloc();
    std::vector<size_t> at(e - b);  // each query's next row in list
    for (size_t i = b; i < e; ++i) at[i - b] = static_cast<size_t>(offsets[i]);
    std::vector<Seg> segs(e - b);
    float sc[kAhead];
    for (size_t r0 = 0; r0 < space; r0 += block_rows) {
      const size_t r1 = std::min(space, r0 + block_rows);
      for (size_t i = b; i < e; ++i) {
        const size_t s0 = at[i - b], end = static_cast<size_t>(offsets[i + 1]);
        size_t s1 = s0;
        while (s1 < end && list[s1] < r1) ++s1;
        segs[i - b] = Seg{list + s0, s1 - s0};
        at[i - b] = s1;
      }
      score_segments(kn, queries, d, rows, b, e, segs.data(), k, heap_s, heap_id, sizes, sc);
    }
  });
}

size_t sorted_lists(size_t nq, const int64_t* offsets, const uint32_t* rows, int64_t* out_offsets,
                    uint32_t* out_rows) {
  size_t n = 0;
  out_offsets[0] = 0;
  for (size_t i = 0; i < nq; ++i) {
    uint32_t* o = out_rows + n;
    const size_t len = static_cast<size_t>(offsets[i + 1] - offsets[i]);
    std::copy(rows + offsets[i], rows + offsets[i + 1], o);
    std::sort(o, o + len);
    n += static_cast<size_t>(std::unique(o, o + len) - o);
    out_offsets[i + 1] = static_cast<int64_t>(n);
  }
  return n;
}

}  // namespace mipscan
