// Top-1 gate forward: one pass over the logits per block of rows (noise add, argmax, softmax).
#include "common.h"
#include "kernels.h"

// logits, noise (n, e) in ldt / ndt (noise may be null); idx (n,) int64, probs (n, e) float32.
TP_EXPORT int tp_gate_top1_fwd(const void* logits, int ldt, const void* noise, int ndt, int64_t n, int64_t e,
                               double tau, int64_t* idx, float* probs, int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const float inv_tau = float(1.0 / tau);
    const int64_t ls = tp::dtype_size(ldt), ns = tp::dtype_size(ndt);
    return tp::over_row_blocks(n, e, 1024, threads, tp::gate_scratch(e), [&](int64_t r0, int64_t rows, float* scratch) {
        kn.gate_rows(static_cast<const char*>(logits) + r0 * e * ls, ldt,
                     noise ? static_cast<const char*>(noise) + r0 * e * ns : nullptr, ndt, rows, e, inv_tau, idx + r0,
                     probs + r0 * e, scratch);
    });
}
