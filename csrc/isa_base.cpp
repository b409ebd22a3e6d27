// Kernels for the compiler's baseline instruction set (SSE2 on x86-64, NEON on aarch64): 4-float vectors.
#include <stdint.h>
#include <string.h>

#include "kernels.h"  // before any target pragma: its inline functions must stay baseline code

#define TP_ISA_NS tp_base
#define TP_ISA_NAME "baseline"
#define TP_VW 4
#define TP_MR1 8
#define TP_MR2 4
#include "kernels_impl.h"
