// Compiler-specific builtins behind small wrappers, so the core builds with GCC, Clang and
// MSVC (and anything else, through plain fallbacks).
//
//   ctz64(x), ctz32(x): index of the lowest set bit. Precondition: x != 0 (the builtins
//     are undefined for 0; the callers test for 0 first).
//   prefetch(p): a read hint for the cache line holding p; never faults, may do nothing.
#pragma once
#include <cstdint>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#if defined(_M_X64) || defined(_M_IX86)
#include <xmmintrin.h>
#endif
#endif

namespace mipscan {

inline unsigned ctz64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_ctzll(x));
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64))
  unsigned long i;
  _BitScanForward64(&i, x);
  return static_cast<unsigned>(i);
#else
  unsigned i = 0;
  while ((x & 1) == 0) {
    x >>= 1;
    ++i;
  }
  return i;
#endif
}

inline unsigned popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_popcountll(x));
#else
  unsigned c = 0;
  for (; x != 0; x &= x - 1) ++c;
  return c;
#endif
}

inline unsigned ctz32(uint32_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_ctz(x));
#elif defined(_MSC_VER)
  unsigned long i;
  _BitScanForward(&i, x);
  return static_cast<unsigned>(i);
#else
  unsigned i = 0;
  while ((x & 1) == 0) {
    x >>= 1;
    ++i;
  }
  return i;
#endif
}

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#elif defined(_MSC_VER) && defined(_M_ARM64)
  __prefetch(p);
#else
  (void)p;
#endif
}

}  // namespace mipscan
