#include "reorder.h"

#include <cstring>

namespace mipscan {

float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float dot_i8_scalar(const float* a, const int8_t* b, size_t d) {
  float l[16] = {0};
  for (size_t j = 0; j < d; ++j) l[j % 16] += a[j] * static_cast<float>(b[j]);
  return reduce16(l);
}

float dot_bf16_scalar(const float* a, const uint16_t* b, size_t d) {
  float l[16] = {0};
  for (size_t j = 0; j < d; ++j) l[j % 16] += a[j] * bf16_to_float(b[j]);
  return reduce16(l);
}

void fold_scales(const float* q, const float* scale, size_t d, float* out) {
  for (size_t j = 0; j < d; ++j) out[j] = q[j] * scale[j];
}

}  // namespace mipscan
