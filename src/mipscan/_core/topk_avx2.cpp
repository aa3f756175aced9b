// topk_columns with the AVX2 flags (topk_columns.h); reached only through cpu.cpp's
// table after the CPU was checked.
#include "topk_columns.h"

namespace mipscan {

void topk_columns_avx2(const float* scores_t, size_t m, size_t nq, size_t k, float* out_s,
                       uint32_t* out_id) {
  topk_columns_impl(scores_t, m, nq, k, out_s, out_id);
}

}  // namespace mipscan
