#include "lut16.h"

#include <cstring>

namespace mipscan {

void pack_codes(const uint8_t* codes, size_t n, size_t num_blocks, uint8_t* packed) {
  std::memset(packed, 0, num_groups(n) * group_bytes(num_blocks));
  for (size_t i = 0; i < n; ++i) {
    uint8_t* grp = packed + (i / kGroup) * group_bytes(num_blocks);
    const size_t j = i % kGroup;
    for (size_t b = 0; b < num_blocks; ++b) {
      const uint8_t c = codes[i * num_blocks + b] & 0x0F;
      grp[b * 32 + byte_of(j)] |= high_nibble(j) ? static_cast<uint8_t>(c << 4) : c;
    }
  }
}

void unpack_codes(const uint8_t* packed, size_t n, size_t num_blocks, uint8_t* codes) {
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* grp = packed + (i / kGroup) * group_bytes(num_blocks);
    const size_t j = i % kGroup;
    for (size_t b = 0; b < num_blocks; ++b) {
      const uint8_t byte = grp[b * 32 + byte_of(j)];
      codes[i * num_blocks + b] = high_nibble(j) ? (byte >> 4) : (byte & 0x0F);
    }
  }
}

void dots_scalar(const float* qs, size_t nq, const float* rows, size_t m, size_t d, float* out) {
  for (size_t i = 0; i < nq; ++i)
    for (size_t r = 0; r < m; ++r) out[i * m + r] = dot_scalar(qs + i * d, rows + r * d, d);
}

namespace {

// The scalar scan with LUT row b at lut + b * row_stride (16: the plain layout, 32: the
// doubled one, lut16.h).
void scan_rows(const uint8_t* packed, size_t groups, size_t num_blocks, const uint8_t* lut,
               size_t row_stride, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  for (size_t g = 0; g < groups; ++g) {
    const uint8_t* grp = packed + g * group_bytes(num_blocks);
    uint16_t acc[kGroup] = {0};
    for (size_t b = 0; b < num_blocks; ++b) {
      const uint8_t* row = lut + b * row_stride;
      const uint8_t* bytes = grp + b * 32;
      for (size_t j = 0; j < kGroup; ++j) {
        const uint8_t byte = bytes[byte_of(j)];
        acc[j] = static_cast<uint16_t>(acc[j] + row[high_nibble(j) ? (byte >> 4) : (byte & 0x0F)]);
      }
    }
    std::memcpy(sums + g * kGroup, acc, sizeof(acc));
    uint64_t mask = 0;
    for (size_t j = 0; j < kGroup; ++j) mask |= static_cast<uint64_t>(acc[j] >= cut) << j;
    masks[g] = mask;
  }
}

}  // namespace

void scan_lut16_scalar(const uint8_t* packed, size_t groups, size_t num_blocks,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint64_t* masks) {
  scan_rows(packed, groups, num_blocks, lut, 16, cut, sums, masks);
}

void lut16_double(const uint8_t* lut, size_t num_blocks, uint8_t* out) {
  std::memset(out, 0, lut16_double_bytes(num_blocks));
  for (size_t b = 0; b < num_blocks; ++b) {
    std::memcpy(out + b * 32, lut + b * 16, 16);
    std::memcpy(out + b * 32 + 16, lut + b * 16, 16);
  }
}

void scan_lut16_multi_scalar(const uint8_t* packed, size_t groups, size_t num_blocks, size_t nq,
                             const uint8_t* const* luts, const uint16_t* cuts,
                             uint16_t* const* sums, uint64_t* const* masks) {
  for (size_t t = 0; t < nq; ++t) scan_rows(packed, groups, num_blocks, luts[t], 32, cuts[t], sums[t], masks[t]);
}

void argmax_shifted_scalar(const float* s, size_t m, size_t k, const float* h, int64_t* out) {
  for (size_t i = 0; i < m; ++i) {
    const float* r = s + i * k;
    size_t best = 0;
    float bv = r[0] - h[0];
    if (bv == bv) {
      for (size_t j = 1; j < k; ++j) {
        const float v = r[j] - h[j];
        if (v != v) {  // NaN: numpy's argmax returns the first one
          best = j;
          break;
        }
        if (v > bv) bv = v, best = j;
      }
    }
    out[i] = static_cast<int64_t>(best);
  }
}

float dot_scalar(const float* a, const float* b, size_t d) {
  float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t j = 0; j < d; ++j) l[j % 8] += a[j] * b[j];
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

void dot_rows_scalar(const float* q, const float* rows, size_t d, const uint32_t* ids, size_t m,
                     float* out) {
  for (size_t t = 0; t < m; ++t) out[t] = dot_scalar(q, rows + size_t{ids[t]} * d, d);
}

}  // namespace mipscan
