// Top-1 gate forward: one pass over the logits per block of rows (noise add, argmax, softmax).
#include "common.h"
#include "kernels.h"

namespace {
constexpr int64_t kRowsPerTask = 1024;
constexpr int64_t kParallelMin = int64_t(1) << 15;  // elements below which threads cost more than they save
}  // namespace

// logits, noise (n, e) in ldt / ndt (noise may be null); idx (n,) int64, probs (n, e) float32.
TP_EXPORT int tp_gate_top1_fwd(const void* logits, int ldt, const void* noise, int ndt, int64_t n, int64_t e,
                               double tau, int64_t* idx, float* probs, int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const float inv_tau = float(1.0 / tau);
    const int64_t ls = tp::dtype_size(ldt), ns = tp::dtype_size(ndt);
    const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
    const int nt = n * e >= kParallelMin && threads > 1 ? threads : 1;
    try {
        const int64_t per_thread = tp::piece(tp::gate_scratch(e), sizeof(float));
        tp::Workspace ws;
        const int64_t o_scratch = ws.reserve(nt * per_thread);
        char* const base = ws.commit();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t r0 = t * kRowsPerTask, rows = n - r0 < kRowsPerTask ? n - r0 : kRowsPerTask;
            kn.gate_rows(static_cast<const char*>(logits) + r0 * e * ls, ldt,
                         noise ? static_cast<const char*>(noise) + r0 * e * ns : nullptr, ndt, rows, e, inv_tau,
                         idx + r0, probs + r0 * e, reinterpret_cast<float*>(base + o_scratch + per_thread * tp::thread_id()));
        }
    } catch (...) {
        return tp::kNoMemory;
    }
    return tp::kOk;
}
