// Picks the kernel table once: the widest instruction set the CPU (and OS) supports.
// TP_KERNELS_ISA=avx512_bf16|avx512|avx2|baseline asks for that level or the widest supported one below it
// (tests use it to cover every table).
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

namespace tp {
namespace {

const Kernels* pick() {
    const char* want = getenv("TP_KERNELS_ISA");
    bool allowed = want == nullptr || *want == '\0';  // true from the requested level downwards
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx512bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    const struct {
        const char* name;
        bool supported;
        const Kernels* (*table)();
    } levels[] = {
        {"avx512_bf16", avx512bf16, tp_avx512bf16::table},
        {"avx512", avx512, tp_avx512::table},
        {"avx2", avx2, tp_avx2::table},
    };
    for (const auto& level : levels) {
        allowed = allowed || strcmp(want, level.name) == 0;
        if (allowed && level.supported) return level.table();
    }
#endif
    return tp_base::table();
}

}  // namespace

const Kernels* kernels() {
    static const Kernels* table = pick();
    return table;
}

}  // namespace tp

TP_EXPORT int tp_abi_version() { return TP_ABI_VERSION; }

TP_EXPORT const char* tp_isa() { return tp::kernels()->name; }

TP_EXPORT int tp_has_bf16_dot() { return tp::kernels()->gemm_pairs != nullptr; }
