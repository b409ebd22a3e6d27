// The per-instruction-set kernel table shared by the isa_*.cpp translation units and the drivers.
//
// Each isa_*.cpp compiles kernels_impl.h for one instruction set (AVX-512 with BF16 dot products,
// AVX-512, AVX2+FMA, or the compiler's baseline); the drivers (routed_lora.cpp, gate.cpp, attention.cpp,
// layer_norm.cpp) hold the OpenMP loops and call the kernels through the table picked once at load time, so no
// driver code runs instructions the CPU lacks.
#pragma once

#include <stdint.h>

namespace tp {

enum DType : int { kF32 = 0, kBF16 = 1 };

inline int64_t dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

struct Kernels {
    const char* name;
    int vw;  // floats per vector

    // Panel packing for gemm(): dst[p][k][j] = src(k, p * nr + j), zero past column n, nr = nv * vw.
    // src(k, j) = src[row_k * rs + j * cs] with row_k = rows ? rows[k] : k, in dtype dt.
    void (*pack)(const void* src, int dt, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n,
                 int nv, float* dst);
    // c (m x n) = (accumulate ? c : 0) + a (m x k) @ packed b, with rows given by pointers:
    // a(i, l) = a[i][l * cs_a], c(i, j) = c[i][j] in dtype c_dt (accumulate needs fp32). Exactly columns
    // [0, n) of each c row are written.
    void (*gemm)(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp, int nv,
                 void* const* c, int c_dt, int accumulate);
    void (*to_f32)(const void* src, int dt, float* dst, int64_t n);
    void (*from_f32)(const float* src, void* dst, int dt, int64_t n);
    // Top-1 gate over n rows of e logits (+ noise): idx = argmax, probs = softmax(z * inv_tau).
    // scratch: at least gate_scratch(e) floats.
    void (*gate_rows)(const void* logits, int ldt, const void* noise, int ndt, int64_t n, int64_t e,
                      float inv_tau, int64_t* idx, float* probs, float* scratch);
    // Attention rows, fp32, each row `ld` floats apart. softmax_rows: s = softmax(scale * s) over `cols`, and
    // lse[i] = log(sum(exp(scale * s_i))) when lse is not null. softmax_lse_rows: s = exp(scale * s - lse[i]), the
    // softmax rebuilt from its logsumexp. softmax_grad_rows: ds = scale * p * (ds - rowdot[i]), the gradient of
    // the scores from dP (in ds).
    void (*softmax_rows)(float* s, int64_t rows, int64_t cols, int64_t ld, float scale, float* lse);
    void (*softmax_lse_rows)(float* s, int64_t rows, int64_t cols, int64_t ld, float scale, const float* lse);
    void (*softmax_grad_rows)(const float* p, int64_t ld_p, float* ds, int64_t ld_ds, int64_t rows, int64_t cols,
                              const float* rowdot, float scale);
    // out[i] = dot(a row i, b row i) over `cols`, rows `lda` / `ldb` floats apart.
    void (*row_dots)(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t cols, float* out);
    // LayerNorm without affine over `rows` contiguous rows of d elements in dtype dt, statistics in fp32:
    // y = (x - mean) * rstd in dt, mean and rstd (rows,) fp32. The backward: dx = rstd (dy - mean(dy) - xhat
    // mean(dy xhat)), xhat = (x - mean) rstd, in dt. scratch: 2 * d floats.
    void (*layer_norm_rows)(const void* x, int dt, int64_t rows, int64_t d, float eps, void* y, float* mean,
                            float* rstd, float* scratch);
    void (*layer_norm_grad_rows)(const void* dy, const void* x, int dt, int64_t rows, int64_t d, const float* mean,
                                 const float* rstd, void* dx, float* scratch);
    // The gate's token term over `rows` contiguous rows of d elements of h in dtype dt, w (e, d) fp32:
    // gate_logit_rows: out (rows, e) = h w^T rounded to dt (as a Linear in dt computes it), stored as fp32;
    // gate_grad_rows: dh (rows, d) in dt += dl (rows, e) w, rounded once. Each row on its own, fp32 accumulation.
    void (*gate_logit_rows)(const void* h, int dt, int64_t rows, int64_t d, const float* w, int64_t e, float* out);
    void (*gate_grad_rows)(void* dh, int dt, int64_t rows, int64_t d, const float* dl, int64_t e, const float* w);
    // gemm() (fp32 c, written) of an operand n <= vw / 2 columns wide packed by pack() with nv = 1, on half-width
    // vectors.
    void (*gemm_narrow)(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp,
                        void* const* c);

    // bf16 dot products with fp32 accumulation (null in tables for CPUs without them). Each 32-bit lane of a
    // pair panel holds two consecutive k of one column, so one instruction multiplies and adds both:
    // pack_pairs is pack() of a bf16 source into dst[p][k / 2][j] = bf16 pair (k even, k odd), zero past k and n
    // (ceil(k / 2) * nr lanes per panel); gemm_pairs is gemm() with bf16 a rows, contiguous along k.
    void (*pack_pairs)(const uint16_t* src, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv,
                       uint32_t* dst);
    void (*gemm_pairs)(int64_t m, int64_t n, int64_t k, const uint16_t* const* a, const uint32_t* bp, int nv,
                       void* const* c, int c_dt, int accumulate);
};

inline int64_t gate_block_rows(int64_t e) { return e >= 512 ? 1 : 512 / e; }
inline int64_t gate_scratch(int64_t e) { return gate_block_rows(e) * e + 64; }

const Kernels* kernels();  // the best table this CPU supports (TP_KERNELS_ISA may ask for a lower one)

}  // namespace tp

namespace tp_avx512bf16 { const tp::Kernels* table(); }
namespace tp_avx512 { const tp::Kernels* table(); }
namespace tp_avx2 { const tp::Kernels* table(); }
namespace tp_base { const tp::Kernels* table(); }
