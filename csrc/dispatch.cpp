// Picks the kernel table once: the widest instruction set the CPU (and OS) supports.
// TP_KERNELS_ISA=avx2|baseline asks for a narrower one (tests use it to cover every table).
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

namespace tp {
namespace {

const Kernels* pick() {
    const char* want = getenv("TP_KERNELS_ISA");
    const bool any = want == nullptr || *want == '\0';
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && (any || strcmp(want, "avx512") == 0)) return tp_avx512::table();
    if (avx2 && (any || strcmp(want, "avx512") == 0 || strcmp(want, "avx2") == 0)) return tp_avx2::table();
#endif
    return tp_base::table();
}

}  // namespace

const Kernels* kernels() {
    static const Kernels* table = pick();
    return table;
}

}  // namespace tp

TP_EXPORT const char* tp_isa() { return tp::kernels()->name; }
