// Kernels for x86-64 with AVX2 and FMA: 8-float vectors, 16 registers.
#include <stdint.h>
#include <string.h>

#include "kernels.h"  // before any target pragma: its inline functions must stay baseline code

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
#define TP_ISA_NS tp_avx2
#define TP_ISA_NAME "avx2"
#define TP_VW 8
#define TP_MR1 12
#define TP_MR2 6
#include "kernels_impl.h"
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif
