// Kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and AVX512_BF16: the avx512 kernels plus bf16 dot products
// (vdpbf16ps) for bfloat16 GEMMs.
#include <stdint.h>
#include <string.h>

#include "kernels.h"  // before any target pragma: its inline functions must stay baseline code

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // its intrinsics carry their own target attributes

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2")
#endif
#define TP_ISA_NS tp_avx512bf16
#define TP_ISA_NAME "avx512_bf16"
#define TP_VW 16
#define TP_MR1 24
#define TP_MR2 12
#define TP_BF16_DOT 1
#include "kernels_impl.h"
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif
