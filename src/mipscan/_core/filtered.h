// The exact plan of a batch of per-query filters given as bitsets (mipscan/_filters.py).
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu.h"

namespace mipscan {

// For each query i < nq, offers every row r < space whose bit is set in its bitset
// bits[i * words, (i + 1) * words) (bit r % 64 of word r / 64), scored exactly by
// kn.dot(queries + i * d, rows + r * d, d), to its heap (heap_s/heap_id: nq * k arrays,
// sizes: nq, as topk_update_rows; a row of equal score enters after smaller ids).
//
// Rows are walked in blocks of about a quarter of an L2 cache, and all the queries walk
// one block before the next: a row allowed by several queries of the batch is read from
// memory once and then from L2, where a gather per query reads it from memory every time
// (per-query lists that overlap: 300 "far" 1 % filters on GloVe-50 name 270,000 rows, of
// which 52,000 distinct). Bits at or past `space` are ignored.
// Preconditions: words * 64 >= space, k >= 1, sizes[i] <= k.
void exact_bitsets(const Kernels& kn, const float* queries, size_t nq, size_t d,
                   const float* rows, size_t space, const uint64_t* bits, size_t words,
                   size_t k, float* heap_s, uint32_t* heap_id, int64_t* sizes,
                   size_t block_rows, int num_threads);

// As exact_bitsets, each query's eligible rows given as a list instead of a bitset:
// list[offsets[i], offsets[i + 1]), ascending, each < space (no repeats). Cheaper than
// bitsets for sparse filters of a large index (a bitset is space / 8 bytes a query).
void exact_rows(const Kernels& kn, const float* queries, size_t nq, size_t d, const float* rows,
                size_t space, const int64_t* offsets, const uint32_t* list, size_t k,
                float* heap_s, uint32_t* heap_id, int64_t* sizes, size_t block_rows,
                int num_threads);

// Each list of a CSR (offsets, rows) sorted and without repeats, into out_offsets (nq + 1)
// and out_rows (room for offsets[nq]); returns the rows written (exact_rows' input).
size_t sorted_lists(size_t nq, const int64_t* offsets, const uint32_t* rows, int64_t* out_offsets,
                    uint32_t* out_rows);


}  // namespace mipscan
