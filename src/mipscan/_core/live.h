// The live index's leaf segments (upsert / delete / rebalance; DESIGN.md "The live index").
//
// A LiveLeaves is immutable once made: leaf l is a segment (a LiveSegment) holding its
// entries' packed AH codes (groups of 64 points, lut16.h; empty for float scoring) and
// the datapoint row of each entry. An update makes a new LiveLeaves that shares every
// untouched segment with its predecessor (shared_ptr) and copies only the leaves it
// changes: entries are appended to the segment's last 64-point group or a new group,
// never repacking another leaf. Deletes do not touch segments at all: they are marks in a
// tombstone bitset over rows (IndexView::dead), owned by the caller, as are the float
// arrays (centroids, codebooks, row data) and the per-leaf live counts. A reader keeps the
// LiveLeaves it searches alive through its shared_ptr, so a snapshot is freed when its
// last search ends, and nothing a reader sees is ever written again.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "search.h"

namespace mipscan {

struct LiveSegment {
  std::vector<uint8_t> codes;   // num_groups(rows.size()) * group_bytes(num_blocks)
  std::vector<uint32_t> rows;   // datapoint row of each entry
};

class LiveLeaves {
 public:
  // From the flat layout (search.h): leaf l holds slots [off[l], off[l+1]) with rows
  // slot_ids[slot] and, when num_blocks > 0, packed groups at packed + groups[l] *
  // group_bytes(num_blocks). Preconditions: the flat invariants the bindings' Index checks.
  LiveLeaves(size_t num_leaves, size_t num_blocks, const int64_t* off, const uint32_t* slot_ids,
             const uint8_t* packed, const int64_t* groups);
  // base with, first, the leaves listed in reset (nr of them) emptied, then entry i of m
  // (row rows[i], codes codes[i * num_blocks ...] when num_blocks > 0) appended to leaf
  // leaves[i]. Leaves neither reset nor appended to are shared with base.
  // Preconditions: leaves[i] and reset[i] < num_leaves, codes < 16.
  LiveLeaves(const LiveLeaves& base, size_t nr, const int64_t* reset, size_t m,
             const int64_t* leaves, const uint32_t* rows, const uint8_t* codes);

  size_t num_leaves() const { return segs_.size(); }
  size_t num_blocks() const { return num_blocks_; }
  const LiveSegment& segment(size_t l) const { return *segs_[l]; }
  // Sets the view's leaf_codes, leaf_rows, leaf_sizes and max_leaf_size (pointers into this).
  void fill(IndexView& v) const;

 private:
  void index_segments();
  size_t num_blocks_ = 0;
  std::vector<std::shared_ptr<const LiveSegment>> segs_;
  std::vector<const uint8_t*> codes_;
  std::vector<const uint32_t*> rows_;
  std::vector<uint32_t> sizes_;
};

}  // namespace mipscan
