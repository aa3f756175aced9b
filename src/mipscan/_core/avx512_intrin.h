// <immintrin.h> for the *_avx512.cpp files. GCC 12's avx512fintrin.h builds
// _mm512_undefined_* from a self-initialised variable, which -Wuninitialized reports at
// every broadcast and insert; the values are defined, so those warnings are off in the
// files that include this one.
#pragma once
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
