#include "live.h"

#include <algorithm>

#include "fault.h"
#include "lut16.h"

namespace mipscan {

LiveLeaves::LiveLeaves(size_t num_leaves, size_t num_blocks, const int64_t* off,
                       const uint32_t* slot_ids, const uint8_t* packed, const int64_t* groups)
    : num_blocks_(num_blocks) {
  fault::alloc();
  segs_.reserve(num_leaves);
  const size_t bytes = group_bytes(num_blocks);
  for (size_t l = 0; l < num_leaves; ++l) {
    auto seg = std::make_shared<LiveSegment>();
    seg->rows.assign(slot_ids + off[l], slot_ids + off[l + 1]);
    if (num_blocks > 0) {
      const uint8_t* a = packed + static_cast<size_t>(groups[l]) * bytes;
      seg->codes.assign(a, a + static_cast<size_t>(groups[l + 1] - groups[l]) * bytes);
    }
    segs_.push_back(std::move(seg));
  }
  index_segments();
}

LiveLeaves::LiveLeaves(const LiveLeaves& base, size_t nr, const int64_t* reset, size_t m,
                       const int64_t* leaves, const uint32_t* rows, const uint8_t* codes)
    : num_blocks_(base.num_blocks_), segs_(base.segs_) {
  fault::alloc();
  const size_t L = segs_.size(), nb = num_blocks_, bytes = group_bytes(nb);
  // New sizes of the touched leaves, so each copy is allocated once.
  std::vector<int64_t> add(L, 0);
  std::vector<uint8_t> touched(L, 0), emptied(L, 0);
  for (size_t i = 0; i < nr; ++i) touched[static_cast<size_t>(reset[i])] = emptied[static_cast<size_t>(reset[i])] = 1;
  for (size_t i = 0; i < m; ++i) {
    ++add[static_cast<size_t>(leaves[i])];
    touched[static_cast<size_t>(leaves[i])] = 1;
  }
  std::vector<std::shared_ptr<LiveSegment>> fresh(L);
  for (size_t l = 0; l < L; ++l) {
    if (!touched[l]) continue;
    auto seg = std::make_shared<LiveSegment>();
    const size_t kept = emptied[l] ? 0 : segs_[l]->rows.size();
    const size_t total = kept + static_cast<size_t>(add[l]);
    seg->rows.reserve(total);
    if (kept) seg->rows = segs_[l]->rows;
    if (nb > 0) {
      // Copy-on-write of the leaf: its groups, then zeroed room for the new ones (padding
      // points keep code 0, so appending ORs nibbles into zero bits).
      seg->codes.reserve(num_groups(total) * bytes);
      if (kept) seg->codes = segs_[l]->codes;
      seg->codes.resize(num_groups(total) * bytes, 0);
    }
    fresh[l] = std::move(seg);
  }
  for (size_t i = 0; i < m; ++i) {
    LiveSegment& seg = *fresh[static_cast<size_t>(leaves[i])];
    const size_t j = seg.rows.size();
    seg.rows.push_back(rows[i]);
    if (nb == 0) continue;
    uint8_t* grp = seg.codes.data() + (j / kGroup) * bytes;
    const size_t at = byte_of(j % kGroup);
    const bool high = high_nibble(j % kGroup);
    for (size_t b = 0; b < nb; ++b) {
      const uint8_t c = codes[i * nb + b] & 0x0F;
      grp[b * 32 + at] |= high ? static_cast<uint8_t>(c << 4) : c;
    }
  }
  for (size_t l = 0; l < L; ++l) {
    if (fresh[l]) segs_[l] = std::move(fresh[l]);
  }
  index_segments();
}

void LiveLeaves::index_segments() {
  const size_t L = segs_.size();
  codes_.resize(L);
  rows_.resize(L);
  sizes_.resize(L);
  for (size_t l = 0; l < L; ++l) {
    codes_[l] = segs_[l]->codes.data();
    rows_[l] = segs_[l]->rows.data();
    sizes_[l] = static_cast<uint32_t>(segs_[l]->rows.size());
  }
}

void LiveLeaves::fill(IndexView& v) const {
  v.leaf_codes = codes_.data();
  v.leaf_rows = rows_.data();
  v.leaf_sizes = sizes_.data();
  v.max_leaf_size = 0;
  for (uint32_t s : sizes_) v.max_leaf_size = std::max<size_t>(v.max_leaf_size, s);
}

}  // namespace mipscan
