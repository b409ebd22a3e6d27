// Kernels for one instruction set, written with GCC/Clang vector extensions.
//
// Included by an isa_*.cpp that defines TP_ISA_NS (namespace), TP_VW (floats per vector), TP_MR1 and
// TP_MR2 (register-block rows for 1- and 2-vector panels) and selects the target. Everything here has
// internal linkage, so code compiled for one instruction set can never be picked by the linker for another.
#include <string.h>

#include "kernels.h"

namespace TP_ISA_NS {
namespace {

using tp::kBF16;
using tp::kF32;

constexpr int VW = TP_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

// Unaligned loads and stores (memcpy compiles to one vector move).
inline vf loadf(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
inline void storef(float* p, vf v) { memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return s - vf{}; }  // x - 0 folds away (x + 0 does not: -0 + 0 = +0)

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays a quiet NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return uint16_t((u >> 16) | 0x40);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline vf load_bf16(const uint16_t* p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

inline void store_bf16(uint16_t* p, vf f) {
    vu u = (vu)f;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu nan = (vu)(f != f);
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
}

void to_f32(const void* src, int dt, float* dst, int64_t n) {
    if (dt == kF32) {
        memcpy(dst, src, n * 4);
        return;
    }
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) storef(dst + i, load_bf16(s + i));
    for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

void from_f32(const float* src, void* dst, int dt, int64_t n) {
    if (dt == kF32) {
        memcpy(dst, src, n * 4);
        return;
    }
    uint16_t* d = static_cast<uint16_t*>(dst);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) store_bf16(d + i, loadf(src + i));
    for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_f32(v); }

inline vf load_vec(const float* p) { return loadf(p); }
inline vf load_vec(const uint16_t* p) { return load_bf16(p); }

template <typename T>
void pack_t(const T* src, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv, float* dst) {
    constexpr int64_t kBlock = 64;  // rows of k per transposing pass: the destination block stays in L1
    const int64_t nr = int64_t(nv) * VW;
    const int64_t panels = (n + nr - 1) / nr;
    if (cs == 1) {  // source rows are contiguous: walk each row once, dealing its pieces out to the panels
        for (int64_t l = 0; l < k; ++l) {
            const T* sl = src + (rows ? rows[l] : l) * rs;
            for (int64_t p = 0; p < panels; ++p) {
                const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
                float* d = dst + (p * k + l) * nr;
                int64_t j = 0;
                for (; j + VW <= cols; j += VW) storef(d + j, load_vec(sl + j0 + j));
                for (; j < cols; ++j) d[j] = to_float(sl[j0 + j]);
                for (; j < nr; ++j) d[j] = 0.0f;
            }
        }
        return;
    }
    for (int64_t p = 0; p < panels; ++p) {  // transposing read: walk each source column contiguously along k
        const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
        float* d = dst + p * k * nr;
        for (int64_t l0 = 0; l0 < k; l0 += kBlock) {
            const int64_t l1 = k - l0 < kBlock ? k : l0 + kBlock;
            for (int64_t j = 0; j < cols; ++j) {
                const T* sj = src + (j0 + j) * cs;
                for (int64_t l = l0; l < l1; ++l) d[l * nr + j] = to_float(sj[(rows ? rows[l] : l) * rs]);
            }
            for (int64_t l = l0; l < l1; ++l)
                for (int64_t j = cols; j < nr; ++j) d[l * nr + j] = 0.0f;
        }
    }
}

void pack(const void* src, int dt, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv,
          float* dst) {
    if (dt == kF32)
        pack_t(static_cast<const float*>(src), rows, rs, cs, k, n, nv, dst);
    else
        pack_t(static_cast<const uint16_t*>(src), rows, rs, cs, k, n, nv, dst);
}

// The register-blocked inner kernel: an MR x (NV * VW) block of c over the whole k range.
template <int MR, int NV>
inline void micro(int64_t k, const float* const* a, int64_t cs_a, const float* bp, float* const* c, int accumulate) {
    vf acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? loadf(c[i] + j * VW) : vf{};
    for (int64_t l = 0; l < k; ++l) {
        vf b[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) b[j] = loadf(bp + (l * NV + j) * VW);
        const int64_t off = l * cs_a;
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) {
            const vf ai = splat(a[i][off]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; ++j) acc[i][j] += ai * b[j];
        }
    }
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) storef(c[i] + j * VW, acc[i][j]);
}

// micro() for the last rows < MR of a block, picked by a compile-time search.
template <int NV, int R>
inline void micro_tail(int rows, int64_t k, const float* const* a, int64_t cs_a, const float* bp, float* const* c,
                       int accumulate) {
    if constexpr (R > 0) {
        if (rows == R)
            micro<R, NV>(k, a, cs_a, bp, c, accumulate);
        else
            micro_tail<NV, R - 1>(rows, k, a, cs_a, bp, c, accumulate);
    }
}

template <int NV, int MR>
void gemm_nv(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp, float* const* c,
             int accumulate) {
    constexpr int64_t nr = int64_t(NV) * VW;
    float edge[MR * nr];  // a partial last panel goes through here, so c is never written past column n
    float* rows[MR];
    const int64_t panels = (n + nr - 1) / nr;
    // rows split into equal blocks of at most MR (16 rows -> 8 + 8, not 12 + a weak 4)
    const int64_t blocks = (m + MR - 1) / MR, block = blocks > 0 ? (m + blocks - 1) / blocks : MR;
    for (int64_t p = 0; p < panels; ++p) {
        const float* b = bp + p * k * nr;
        const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
        for (int64_t i0 = 0; i0 < m; i0 += block) {
            const int mb = int(m - i0 < block ? m - i0 : block);
            for (int i = 0; i < mb; ++i) {
                rows[i] = cols == nr ? c[i0 + i] + j0 : edge + i * nr;
                if (cols < nr && accumulate) memcpy(edge + i * nr, c[i0 + i] + j0, cols * sizeof(float));
            }
            if (mb == MR)
                micro<MR, NV>(k, a + i0, cs_a, b, rows, accumulate);
            else
                micro_tail<NV, MR - 1>(mb, k, a + i0, cs_a, b, rows, accumulate);
            if (cols < nr)
                for (int i = 0; i < mb; ++i) memcpy(c[i0 + i] + j0, edge + i * nr, cols * sizeof(float));
        }
    }
}

void gemm(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp, int nv,
          float* const* c, int accumulate) {
    if (nv == 1)
        gemm_nv<1, TP_MR1>(m, n, k, a, cs_a, bp, c, accumulate);
    else
        gemm_nv<2, TP_MR2>(m, n, k, a, cs_a, bp, c, accumulate);
}

// exp(x) for x <= 0 (softmax arguments): Cody-Waite reduction and the Cephes degree-6 polynomial,
// about 1 ulp; flushes to 0 below -87.
inline vf exp_nonpos(vf x) {
    const vi tiny = x < -87.0f;  // all-ones lanes
    x = (vf)(((vi)x & ~tiny) | ((vi)splat(-87.0f) & tiny));
    const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = x * 1.44269504088896341f + shifter;
    n = n - shifter;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)e) & ~tiny);
}

void gate_rows(const void* logits, int ldt, const void* noise, int ndt, int64_t n, int64_t e, float inv_tau,
               int64_t* idx, float* probs, float* scratch) {
    const int64_t block = tp::gate_block_rows(e);
    float* z = scratch;
    for (int64_t r0 = 0; r0 < n; r0 += block) {
        const int64_t rows = n - r0 < block ? n - r0 : block, cnt = rows * e;
        const char* lp = static_cast<const char*>(logits) + r0 * e * tp::dtype_size(ldt);
        to_f32(lp, ldt, z, cnt);
        if (noise) {
            float* t = probs + r0 * e;  // the output rows double as scratch for the noise
            to_f32(static_cast<const char*>(noise) + r0 * e * tp::dtype_size(ndt), ndt, t, cnt);
            int64_t i = 0;
            for (; i + VW <= cnt; i += VW) storef(z + i, loadf(z + i) + loadf(t + i));
            for (; i < cnt; ++i) z[i] += t[i];
        }
        // argmax (first maximal index; NaN counts as the maximum, as in torch.argmax), then shift by the max
        for (int64_t r = 0; r < rows; ++r) {
            float* zr = z + r * e;
            int64_t best = 0;
            float top = zr[0];
            for (int64_t j = 1; j < e && top == top; ++j)
                if (zr[j] > top || zr[j] != zr[j]) top = zr[j], best = j;
            idx[r0 + r] = best;
            for (int64_t j = 0; j < e; ++j) zr[j] = (zr[j] - top) * inv_tau;
        }
        int64_t i = 0;
        for (; i + VW <= cnt; i += VW) storef(z + i, exp_nonpos(loadf(z + i)));
        if (i < cnt) {
            float tail[VW] = {};
            memcpy(tail, z + i, (cnt - i) * 4);
            storef(tail, exp_nonpos(loadf(tail)));
            memcpy(z + i, tail, (cnt - i) * 4);
        }
        for (int64_t r = 0; r < rows; ++r) {
            const float* zr = z + r * e;
            float sum = 0.0f;
            for (int64_t j = 0; j < e; ++j) sum += zr[j];
            const float inv = 1.0f / sum;
            float* pr = probs + (r0 + r) * e;
            for (int64_t j = 0; j < e; ++j) pr[j] = zr[j] * inv;
        }
    }
}

const tp::Kernels kTable = {
    TP_ISA_NAME, VW, pack, gemm, to_f32, from_f32, gate_rows,
};

}  // namespace

const tp::Kernels* table() { return &kTable; }

}  // namespace TP_ISA_NS
