#include "lut16.h"

#include <cstring>

namespace mipscan {

void pack_codes(const uint8_t* codes, size_t n, size_t num_blocks, uint8_t* packed) {
  const size_t nbp = padded_blocks(num_blocks);
  const size_t groups = (n + 31) / 32;
  std::memset(packed, 0, groups * nbp * 16);
  for (size_t i = 0; i < n; ++i) {
    const size_t g = i / 32, j = i % 32;
    uint8_t* grp = packed + g * nbp * 16;
    for (size_t b = 0; b < num_blocks; ++b) {
      const uint8_t c = codes[i * num_blocks + b] & 0x0F;
      if (j < 16) grp[b * 16 + j] |= c;
      else grp[b * 16 + (j - 16)] |= static_cast<uint8_t>(c << 4);
    }
  }
}

void unpack_codes(const uint8_t* packed, size_t n, size_t num_blocks, uint8_t* codes) {
  const size_t nbp = padded_blocks(num_blocks);
  for (size_t i = 0; i < n; ++i) {
    const size_t g = i / 32, j = i % 32;
    const uint8_t* grp = packed + g * nbp * 16;
    for (size_t b = 0; b < num_blocks; ++b) {
      const uint8_t byte = grp[b * 16 + (j % 16)];
      codes[i * num_blocks + b] = j < 16 ? (byte & 0x0F) : (byte >> 4);
    }
  }
}

float dot_scalar(const float* a, const float* b, size_t d) {
  float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t j = 0; j < d; ++j) l[j % 8] += a[j] * b[j];
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

void scan_lut16_scalar(const uint8_t* packed, size_t num_groups, size_t nbp,
                       const uint8_t* lut, uint16_t cut, uint16_t* sums, uint32_t* masks) {
  for (size_t g = 0; g < num_groups; ++g) {
    const uint8_t* grp = packed + g * nbp * 16;
    uint16_t acc[32] = {0};
    for (size_t b = 0; b < nbp; ++b) {
      const uint8_t* row = lut + b * 16;
      const uint8_t* bytes = grp + b * 16;
      for (size_t j = 0; j < 16; ++j) {
        acc[j] = static_cast<uint16_t>(acc[j] + row[bytes[j] & 0x0F]);
        acc[j + 16] = static_cast<uint16_t>(acc[j + 16] + row[bytes[j] >> 4]);
      }
    }
    std::memcpy(sums + g * 32, acc, sizeof(acc));
    uint32_t mask = 0;
    for (size_t j = 0; j < 32; ++j) mask |= static_cast<uint32_t>(acc[j] >= cut) << j;
    masks[g] = mask;
  }
}

}  // namespace mipscan
