// The x86 intrinsics for the CPU kernel files, with the warnings GCC 12 raises inside its own headers silenced.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 flags _mm512_undefined_* inside its own headers
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
