// Top-1 gate forward: one pass over the logits per block of rows (noise add, argmax, softmax); and the gate's token
// term: logits = h w^T and its input gradient dh += dl w, row by row (batch invariant: no BLAS picks a kernel by shape).
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

// h (n, d) contiguous in dtype dt, w (e, d) float32 -> out (n, e) float32 = h w^T.
TP_EXPORT int tp_gate_logits(const void* h, int dt, int64_t n, int64_t d, const float* w, int64_t e, float* out,
                             int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const int64_t es = tp::dtype_size(dt);
    return tp::over_row_blocks(n, d, 64, threads, 0, [&](int64_t r0, int64_t rows, float*) {
        kn.gate_logit_rows(static_cast<const char*>(h) + r0 * d * es, dt, rows, d, w, e, out + r0 * e);
    });
}

// dh (n, d) contiguous in dtype dt += dl (n, e) float32 @ w (e, d) float32, in fp32, rounded once.
TP_EXPORT int tp_gate_logits_grad(void* dh, int dt, int64_t n, int64_t d, const float* dl, const float* w, int64_t e,
                                  int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const int64_t es = tp::dtype_size(dt);
    return tp::over_row_blocks(n, d, 64, threads, 0, [&](int64_t r0, int64_t rows, float*) {
        kn.gate_grad_rows(static_cast<char*>(dh) + r0 * d * es, dt, rows, d, dl + r0 * e, e, w);
    });
}
