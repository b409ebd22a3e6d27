// LayerNorm without affine parameters, statistics in fp32 whatever the dtype: one read of x and one write of y
// (a bf16 input is never copied to fp32 as a whole, as upcasting before torch's LayerNorm would), and a
// backward that reads x, dy and the saved statistics once. torch's CPU LayerNorm of a bf16 input keeps its mean
// and rstd in bf16, and its backward through them loses digits of the gradient when |mean| >> std.
#include "common.h"
#include "kernels.h"

namespace {
constexpr int64_t kRowsPerTask = 64;
}  // namespace

// x, y (n, d) contiguous in dtype dt; mean, rstd (n,) float32.
TP_EXPORT int tp_layer_norm_fwd(const void* x, int dt, int64_t n, int64_t d, double eps, void* y, float* mean,
                                float* rstd, int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const int64_t es = tp::dtype_size(dt);
    return tp::over_row_blocks(n, d, kRowsPerTask, threads, 2 * d, [&](int64_t r0, int64_t rows, float* scratch) {
        kn.layer_norm_rows(static_cast<const char*>(x) + r0 * d * es, dt, rows, d, float(eps),
                           static_cast<char*>(y) + r0 * d * es, mean + r0, rstd + r0, scratch);
    });
}

// dy, x, dx (n, d) contiguous in dtype dt; mean, rstd (n,) float32 as tp_layer_norm_fwd left them.
TP_EXPORT int tp_layer_norm_bwd(const void* dy, const void* x, int dt, int64_t n, int64_t d, const float* mean,
                                const float* rstd, void* dx, int threads) {
    const tp::Kernels& kn = *tp::kernels();
    const int64_t es = tp::dtype_size(dt);
    return tp::over_row_blocks(n, d, kRowsPerTask, threads, 2 * d, [&](int64_t r0, int64_t rows, float* scratch) {
        kn.layer_norm_grad_rows(static_cast<const char*>(dy) + r0 * d * es, static_cast<const char*>(x) + r0 * d * es,
                                dt, rows, d, mean + r0, rstd + r0, static_cast<char*>(dx) + r0 * d * es, scratch);
    });
}
