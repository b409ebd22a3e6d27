// Kernels for one instruction set, written with GCC/Clang vector extensions.
//
// Included by an isa_*.cpp that defines TP_ISA_NS (namespace), TP_VW (floats per vector), TP_MR1 and
// TP_MR2 (register-block rows for 1- and 2-vector panels), optionally TP_BF16_DOT (AVX512_BF16 intrinsics
// available: adds the bf16 dot-product GEMM), and selects the target. Everything here has
// internal linkage, so code compiled for one instruction set can never be picked by the linker for another.
#include <math.h>
#include <string.h>

#include <utility>

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

inline float lane_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; ++i) s += v[i];
    return s;
}

// sum of x[j] y[j] over n: VW lanes, then across them, then the tail.
inline float dot(const float* x, const float* y, int64_t n) {
    const int64_t full = n / VW * VW;
    vf acc = vf{};
    for (int64_t j = 0; j < full; j += VW) acc += loadf(x + j) * loadf(y + j);
    float d = lane_sum(acc);
    for (int64_t j = full; j < n; ++j) d += x[j] * y[j];
    return d;
}

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
#ifdef TP_BF16_DOT
    // vcvtneps2bf16: round to nearest even, NaN stays a quiet NaN; it also flushes denormals to zero
    const __m256bh h = _mm512_cvtneps_pbh((__m512)f);
#else
    vu u = (vu)f;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu nan = (vu)(f != f);
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    vh h = __builtin_convertvector(r, vh);
#endif
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

// Gathered rows are scattered in memory, so the hardware prefetcher cannot see the next one coming.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o);
}

// Lanes [0, VW/2) (kHigh: [VW/2, VW)) of a and b interleaved: a_i, b_i, a_{i+1}, b_{i+1}, ...
template <bool kHigh, size_t... I>
inline vf zip(vf a, vf b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, ((I % 2 ? VW : 0) + (kHigh ? VW / 2 : 0) + int(I / 2))...);
}

// Transposes a VW x VW block in registers: log2(VW) rounds of r'[2i] = zip_lo(r[i], r[i + VW/2]),
// r'[2i+1] = zip_hi(r[i], r[i + VW/2]) (after the last round, r[j] holds column j).
inline void transpose_block(vf (&r)[VW]) {
    for (int w = 1; w < VW; w *= 2) {
        vf t[VW];
#pragma GCC unroll 16
        for (int i = 0; i < VW / 2; ++i) {
            t[2 * i] = zip<false>(r[i], r[i + VW / 2], std::make_index_sequence<VW>());
            t[2 * i + 1] = zip<true>(r[i], r[i + VW / 2], std::make_index_sequence<VW>());
        }
#pragma GCC unroll 16
        for (int i = 0; i < VW; ++i) r[i] = t[i];
    }
}

// pack() of an fp32 source read transposed (src(k, j) = src[j * cs + k]): VW x VW blocks, each column's VW
// consecutive k loaded as one vector and transposed in registers. Returns the k rows done (a multiple of VW);
// the caller packs the rest.
int64_t pack_transposed_blocks(const float* src, int64_t cs, int64_t k, int64_t n, int nv, float* dst) {
    const int64_t nr = int64_t(nv) * VW, kb = k / VW * VW;
    const int64_t panels = (n + nr - 1) / nr;
    for (int64_t p = 0; p < panels; ++p) {
        float* d = dst + p * k * nr;
        for (int64_t c0 = p * nr; c0 < (p + 1) * nr; c0 += VW) {  // VW columns of the panel at a time
            const int64_t cols = n - c0 < VW ? (n > c0 ? n - c0 : 0) : VW;
            for (int64_t l0 = 0; l0 < kb; l0 += VW) {
                vf r[VW];
                for (int j = 0; j < VW; ++j) r[j] = j < cols ? loadf(src + (c0 + j) * cs + l0) : vf{};
                transpose_block(r);
#pragma GCC unroll 16
                for (int l = 0; l < VW; ++l) storef(d + (l0 + l) * nr + (c0 - p * nr), r[l]);
            }
        }
    }
    return kb;
}

template <typename T>
void pack_t(const T* src, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv, float* dst) {
    constexpr int64_t kBlock = 64;  // rows of k per transposing pass: the destination block stays in L1
    const int64_t nr = int64_t(nv) * VW;
    const int64_t panels = (n + nr - 1) / nr;
    if (cs == 1) {  // source rows are contiguous: walk each row once, dealing its pieces out to the panels
        for (int64_t l = 0; l < k; ++l) {
            const T* sl = src + (rows ? rows[l] : l) * rs;
            if (rows && l + kPrefetchRows < k) prefetch_row(src + rows[l + kPrefetchRows] * rs, n * sizeof(T));
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
    int64_t done = 0;  // k rows packed by whole register blocks
    if constexpr (sizeof(T) == 4)
        if (rows == nullptr && rs == 1) done = pack_transposed_blocks(src, cs, k, n, nv, dst);
    for (int64_t p = 0; p < panels; ++p) {  // transposing read: walk each source column contiguously along k
        const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
        float* d = dst + p * k * nr;
        for (int64_t l0 = done; l0 < k; l0 += kBlock) {
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

// Stores a finished accumulator vector: fp32, or rounded to bf16 (kBf16Out) straight from the register.
template <bool kBf16Out>
inline void store_acc(void* row, int j, vf v) {
    if constexpr (kBf16Out)
        store_bf16(static_cast<uint16_t*>(row) + j * VW, v);
    else
        storef(static_cast<float*>(row) + j * VW, v);
}

// The register-blocked inner kernel: an MR x (NV * VW) block of c over the whole k range. c rows are fp32
// (read when accumulating) or, with kBf16Out, bf16 (never accumulated).
template <int MR, int NV, bool kBf16Out>
inline void micro(int64_t k, const float* const* a, int64_t cs_a, const float* bp, void* const* c, int accumulate) {
    vf acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? loadf(static_cast<float*>(c[i]) + j * VW) : vf{};
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
        for (int j = 0; j < NV; ++j) store_acc<kBf16Out>(c[i], j, acc[i][j]);
}

#ifdef TP_BF16_DOT
static_assert(VW == 16, "bf16 dot products are written for 512-bit vectors");

inline uint32_t load_pair(const uint16_t* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

// One pair of k steps of micro() below: acc(i, j) += a(i, 2l) b(2l, j) + a(i, 2l+1) b(2l+1, j), in one
// vdpbf16ps per vector. kLast: k is odd and this is its last step, read as the pair (a(i, k-1), 0) so that
// nothing past a row is read.
template <int MR, int NV, bool kLast>
inline void pair_step(__m512 (&acc)[MR][NV], const uint16_t* const* a, int64_t l, const uint32_t* bp) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp + (l * NV + j) * VW);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
        const uint32_t pr = kLast ? uint32_t(a[i][2 * l]) : load_pair(a[i] + 2 * l);
        const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(pr));
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, b[j]);
    }
}

// micro() with bf16 operands: a rows contiguous along k, b in pair panels, fp32 accumulators.
template <int MR, int NV, bool kBf16Out>
inline void micro(int64_t k, const uint16_t* const* a, int64_t, const uint32_t* bp, void* const* c, int accumulate) {
    __m512 acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j)
            acc[i][j] = accumulate ? _mm512_loadu_ps(static_cast<float*>(c[i]) + j * VW) : _mm512_setzero_ps();
    const int64_t kp = k / 2;
    for (int64_t l = 0; l < kp; ++l) pair_step<MR, NV, false>(acc, a, l, bp);
    if (k & 1) pair_step<MR, NV, true>(acc, a, kp, bp);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) store_acc<kBf16Out>(c[i], j, (vf)acc[i][j]);
}
#endif

// Lanes per panel row of k: one per k for fp32 panels, one per pair of k for bf16 pair panels.
inline int64_t panel_k(int64_t k, const float*) { return k; }
inline int64_t panel_k(int64_t k, const uint32_t*) { return (k + 1) / 2; }

// micro() for the last rows < MR of a block, picked by a compile-time search.
template <int NV, bool kBf16Out, int R, typename TA, typename TB>
inline void micro_tail(int rows, int64_t k, const TA* const* a, int64_t cs_a, const TB* bp, void* const* c,
                       int accumulate) {
    if constexpr (R > 0) {
        if (rows == R)
            micro<R, NV, kBf16Out>(k, a, cs_a, bp, c, accumulate);
        else
            micro_tail<NV, kBf16Out, R - 1>(rows, k, a, cs_a, bp, c, accumulate);
    }
}

// micro() for a block of mb <= MR rows.
template <int NV, int MR, bool kBf16Out, typename TA, typename TB>
inline void micro_rows(int mb, int64_t k, const TA* const* a, int64_t cs_a, const TB* bp, void* const* c, int accumulate) {
    if (mb == MR)
        micro<MR, NV, kBf16Out>(k, a, cs_a, bp, c, accumulate);
    else
        micro_tail<NV, kBf16Out, MR - 1>(mb, k, a, cs_a, bp, c, accumulate);
}

template <int NV, int MR, typename TA, typename TB>
void gemm_nv(int64_t m, int64_t n, int64_t k, const TA* const* a, int64_t cs_a, const TB* bp, void* const* c, int c_dt,
             int accumulate) {
    constexpr int64_t nr = int64_t(NV) * VW;
    float edge[MR * nr];  // a partial last panel goes through here, so c is never written past column n
    void* rows[MR];
    const int64_t panels = (n + nr - 1) / nr;
    // rows split into equal blocks of at most MR (16 rows -> 8 + 8, not 12 + a weak 4)
    const int64_t blocks = (m + MR - 1) / MR, block = blocks > 0 ? (m + blocks - 1) / blocks : MR;
    for (int64_t p = 0; p < panels; ++p) {
        const TB* b = bp + p * panel_k(k, bp) * nr;
        const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
        const bool direct = cols == nr;
        const int64_t csize = tp::dtype_size(c_dt);
        for (int64_t i0 = 0; i0 < m; i0 += block) {
            const int mb = int(m - i0 < block ? m - i0 : block);
            for (int i = 0; i < mb; ++i) {
                rows[i] = direct ? static_cast<char*>(c[i0 + i]) + j0 * csize : static_cast<void*>(edge + i * nr);
                if (!direct && accumulate) memcpy(edge + i * nr, static_cast<float*>(c[i0 + i]) + j0, cols * sizeof(float));
            }
            if (direct && c_dt == kBF16)
                micro_rows<NV, MR, true>(mb, k, a + i0, cs_a, b, rows, 0);
            else
                micro_rows<NV, MR, false>(mb, k, a + i0, cs_a, b, rows, accumulate);
            if (!direct)
                for (int i = 0; i < mb; ++i)
                    from_f32(edge + i * nr, static_cast<char*>(c[i0 + i]) + j0 * csize, c_dt, cols);
        }
    }
}

void gemm(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp, int nv,
          void* const* c, int c_dt, int accumulate) {
    if (nv == 1)
        gemm_nv<1, TP_MR1>(m, n, k, a, cs_a, bp, c, c_dt, accumulate);
    else
        gemm_nv<2, TP_MR2>(m, n, k, a, cs_a, bp, c, c_dt, accumulate);
}

// gemm() of an operand at most VW / 2 columns wide, packed with nv = 1 (VW-lane panels, lanes past n zero), on
// half-width vectors: where full-width FMAs run as two halves (AMD Zen 4), a head-dim remainder of 8 columns
// (Dh = 72 = 64 + 8 at 16 lanes) then costs half a full panel instead of a whole one. c fp32, written.
typedef float vnf __attribute__((vector_size(VW * 2)));
constexpr int VN = VW / 2;

template <int MR>
inline void micro_narrow(int64_t k, const float* const* a, int64_t cs_a, const float* bp, float* const* c) {
    vnf acc[MR];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) acc[i] = vnf{};
    for (int64_t l = 0; l < k; ++l) {
        vnf b;
        memcpy(&b, bp + l * VW, sizeof b);
        const int64_t off = l * cs_a;
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) acc[i] += (a[i][off] - vnf{}) * b;
    }
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) memcpy(c[i], &acc[i], sizeof acc[i]);
}

template <int R>
inline void micro_narrow_rows(int rows, int64_t k, const float* const* a, int64_t cs_a, const float* bp,
                              float* const* c) {
    if constexpr (R > 0) {
        if (rows == R)
            micro_narrow<R>(k, a, cs_a, bp, c);
        else
            micro_narrow_rows<R - 1>(rows, k, a, cs_a, bp, c);
    }
}

void gemm_narrow(int64_t m, int64_t n, int64_t k, const float* const* a, int64_t cs_a, const float* bp,
                 void* const* c) {
    constexpr int MR = TP_MR1;
    float edge[MR * VN];  // n < VN: the block's rows go through here, so c is never written past column n
    float* rows[MR];
    const bool direct = n == VN;
    const int64_t blocks = (m + MR - 1) / MR, block = blocks > 0 ? (m + blocks - 1) / blocks : MR;
    for (int64_t i0 = 0; i0 < m; i0 += block) {
        const int mb = int(m - i0 < block ? m - i0 : block);
        for (int i = 0; i < mb; ++i) rows[i] = direct ? static_cast<float*>(c[i0 + i]) : edge + i * VN;
        micro_narrow_rows<MR>(mb, k, a + i0, cs_a, bp, rows);
        if (!direct)
            for (int i = 0; i < mb; ++i) memcpy(c[i0 + i], edge + i * VN, n * sizeof(float));
    }
}

#ifdef TP_BF16_DOT
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; }

void pack_pairs(const uint16_t* src, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv,
                uint32_t* dst) {
    constexpr int64_t kBlock = 32;  // pairs of k per transposing pass: the destination block stays in L1
    const int64_t nr = int64_t(nv) * VW;
    const int64_t panels = (n + nr - 1) / nr, kp = (k + 1) / 2;
    if (cs == 1) {  // source rows are contiguous: interleave each two rows, dealing the pieces out to the panels
        for (int64_t l = 0; l < kp; ++l) {
            const uint16_t* s0 = src + (rows ? rows[2 * l] : 2 * l) * rs;
            const uint16_t* s1 = 2 * l + 1 < k ? src + (rows ? rows[2 * l + 1] : 2 * l + 1) * rs : nullptr;
            for (int64_t q = 2 * l + kPrefetchRows; rows && q < 2 * l + kPrefetchRows + 2 && q < k; ++q)
                prefetch_row(src + rows[q] * rs, n * 2);
            for (int64_t p = 0; p < panels; ++p) {
                const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
                uint32_t* d = dst + (p * kp + l) * nr;
                int64_t j = 0;
                for (; j + VW <= cols; j += VW) {
                    vh h;
                    memcpy(&h, s0 + j0 + j, sizeof h);
                    vu v = __builtin_convertvector(h, vu);
                    if (s1) {
                        memcpy(&h, s1 + j0 + j, sizeof h);
                        v |= __builtin_convertvector(h, vu) << 16;
                    }
                    memcpy(d + j, &v, sizeof v);
                }
                for (; j < cols; ++j) d[j] = pair(s0[j0 + j], s1 ? s1[j0 + j] : 0);
                for (; j < nr; ++j) d[j] = 0;
            }
        }
        return;
    }
    for (int64_t p = 0; p < panels; ++p) {  // transposing read: walk each source column along k
        const int64_t j0 = p * nr, cols = n - j0 < nr ? n - j0 : nr;
        uint32_t* d = dst + p * kp * nr;
        for (int64_t l0 = 0; l0 < kp; l0 += kBlock) {
            const int64_t l1 = kp - l0 < kBlock ? kp : l0 + kBlock;
            for (int64_t j = 0; j < cols; ++j) {
                const uint16_t* sj = src + (j0 + j) * cs;
                if (!rows && rs == 1) {  // each pair is adjacent in the source
                    for (int64_t l = l0; l < l1; ++l) d[l * nr + j] = 2 * l + 1 < k ? load_pair(sj + 2 * l) : sj[2 * l];
                    continue;
                }
                for (int64_t l = l0; l < l1; ++l) {
                    const uint16_t lo = sj[(rows ? rows[2 * l] : 2 * l) * rs];
                    const uint16_t hi = 2 * l + 1 < k ? sj[(rows ? rows[2 * l + 1] : 2 * l + 1) * rs] : 0;
                    d[l * nr + j] = pair(lo, hi);
                }
            }
            for (int64_t l = l0; l < l1; ++l)
                for (int64_t j = cols; j < nr; ++j) d[l * nr + j] = 0;
        }
    }
}

void gemm_pairs(int64_t m, int64_t n, int64_t k, const uint16_t* const* a, const uint32_t* bp, int nv,
                void* const* c, int c_dt, int accumulate) {
    if (nv == 1)
        gemm_nv<1, TP_MR1>(m, n, k, a, 0, bp, c, c_dt, accumulate);
    else
        gemm_nv<2, TP_MR2>(m, n, k, a, 0, bp, c, c_dt, accumulate);
}
#endif

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

void softmax_rows(float* s, int64_t rows, int64_t cols, int64_t ld, float scale, float* lse) {
    const int64_t full = cols / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        float* x = s + r * ld;
        float top = x[0];
        if (full > 0) {  // vector max, then across lanes (a scalar loop would not vectorise: NaN order)
            vf m = loadf(x);
            for (int64_t j = VW; j < full; j += VW) {
                const vf v = loadf(x + j);
                m = v > m ? v : m;
            }
            for (int i = 0; i < VW; ++i) top = m[i] > top ? m[i] : top;
        }
        for (int64_t j = full; j < cols; ++j) top = x[j] > top ? x[j] : top;
        const vf shift = splat(top * scale), sc = splat(scale);
        vf acc = vf{};
        for (int64_t j = 0; j < full; j += VW) {
            const vf e = exp_nonpos(loadf(x + j) * sc - shift);
            storef(x + j, e);
            acc += e;
        }
        float sum = lane_sum(acc);
        if (full < cols) {
            float tail[VW];
            for (int i = 0; i < VW; ++i) tail[i] = full + i < cols ? x[full + i] * scale - top * scale : -100.0f;
            const vf e = exp_nonpos(loadf(tail));
            for (int64_t j = full; j < cols; ++j) x[j] = e[j - full], sum += e[j - full];
        }
        const vf inv = splat(1.0f / sum);
        for (int64_t j = 0; j < full; j += VW) storef(x + j, loadf(x + j) * inv);
        for (int64_t j = full; j < cols; ++j) x[j] *= inv[0];
        if (lse) lse[r] = top * scale + logf(sum);
    }
}

void softmax_lse_rows(float* s, int64_t rows, int64_t cols, int64_t ld, float scale, const float* lse) {
    const int64_t full = cols / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        float* x = s + r * ld;
        const vf shift = splat(lse[r]), sc = splat(scale);
        for (int64_t j = 0; j < full; j += VW) storef(x + j, exp_nonpos(loadf(x + j) * sc - shift));
        if (full < cols) {
            float tail[VW];
            for (int i = 0; i < VW; ++i) tail[i] = full + i < cols ? x[full + i] * scale - lse[r] : -100.0f;
            const vf e = exp_nonpos(loadf(tail));
            for (int64_t j = full; j < cols; ++j) x[j] = e[j - full];
        }
    }
}

void softmax_grad_rows(const float* p, int64_t ld_p, float* ds, int64_t ld_ds, int64_t rows, int64_t cols,
                       const float* rowdot, float scale) {
    const int64_t full = cols / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        const float* pr = p + r * ld_p;
        float* d = ds + r * ld_ds;
        const vf dot = splat(rowdot[r]), sc = splat(scale);
        for (int64_t j = 0; j < full; j += VW) storef(d + j, sc * loadf(pr + j) * (loadf(d + j) - dot));
        for (int64_t j = full; j < cols; ++j) d[j] = scale * pr[j] * (d[j] - rowdot[r]);
    }
}

void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t cols, float* out) {
    for (int64_t r = 0; r < rows; ++r) out[r] = dot(a + r * lda, b + r * ldb, cols);
}

// Row r of a dt matrix with d columns as fp32: the row itself, or converted into buf.
inline const float* f32_row(const void* m, int dt, int64_t r, int64_t d, float* buf) {
    if (dt == kF32) return static_cast<const float*>(m) + r * d;
    to_f32(static_cast<const uint16_t*>(m) + r * d, dt, buf, d);
    return buf;
}

// Writes fp32 values v (d) to row r of a dt matrix: v is that row already (fp32), or rounded into it.
inline void put_row(const float* v, void* m, int dt, int64_t r, int64_t d) {
    if (dt != kF32) from_f32(v, static_cast<uint16_t*>(m) + r * d, dt, d);
}

void layer_norm_rows(const void* x, int dt, int64_t rows, int64_t d, float eps, void* y, float* mean, float* rstd,
                     float* scratch) {
    const int64_t full = d / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = f32_row(x, dt, r, d, scratch);
        vf acc = vf{};
        for (int64_t j = 0; j < full; j += VW) acc += loadf(xr + j);
        float sum = lane_sum(acc);
        for (int64_t j = full; j < d; ++j) sum += xr[j];
        const float mu = sum / float(d);
        const vf m = splat(mu);
        acc = vf{};
        for (int64_t j = 0; j < full; j += VW) {
            const vf c = loadf(xr + j) - m;
            acc += c * c;
        }
        float ss = lane_sum(acc);
        for (int64_t j = full; j < d; ++j) ss += (xr[j] - mu) * (xr[j] - mu);
        const float rs = 1.0f / sqrtf(ss / float(d) + eps);
        // fp32: straight into y's row; bf16: into the scratch row (x's copy, read before written), then rounded
        float* out = dt == kF32 ? static_cast<float*>(y) + r * d : scratch;
        const vf rv = splat(rs);
        for (int64_t j = 0; j < full; j += VW) storef(out + j, (loadf(xr + j) - m) * rv);
        for (int64_t j = full; j < d; ++j) out[j] = (xr[j] - mu) * rs;
        put_row(out, y, dt, r, d);
        mean[r] = mu;
        rstd[r] = rs;
    }
}

void layer_norm_grad_rows(const void* dy, const void* x, int dt, int64_t rows, int64_t d, const float* mean,
                          const float* rstd, void* dx, float* scratch) {
    const int64_t full = d / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = f32_row(x, dt, r, d, scratch);
        const float* gr = f32_row(dy, dt, r, d, scratch + d);
        const float mu = mean[r], rs = rstd[r];
        const vf m = splat(mu), rv = splat(rs);
        vf acc_g = vf{}, acc_gx = vf{};
        for (int64_t j = 0; j < full; j += VW) {
            const vf g = loadf(gr + j);
            acc_g += g;
            acc_gx += g * ((loadf(xr + j) - m) * rv);
        }
        float sg = lane_sum(acc_g), sgx = lane_sum(acc_gx);
        for (int64_t j = full; j < d; ++j) {
            sg += gr[j];
            sgx += gr[j] * ((xr[j] - mu) * rs);
        }
        const float mg = sg / float(d), mgx = sgx / float(d);
        const vf mgv = splat(mg), mgxv = splat(mgx);
        float* out = dt == kF32 ? static_cast<float*>(dx) + r * d : scratch;  // bf16: over x's copy
        for (int64_t j = 0; j < full; j += VW)
            storef(out + j, rv * (loadf(gr + j) - mgv - (loadf(xr + j) - m) * rv * mgxv));
        for (int64_t j = full; j < d; ++j) out[j] = rs * (gr[j] - mg - (xr[j] - mu) * rs * mgx);
        put_row(out, dx, dt, r, d);
    }
}

// gate_logit_rows for rows of T (float or bf16 bits), read in place: each load of h feeds up to 8 experts' FMAs.
template <typename T>
void gate_logit_rows_t(const T* h, bool round_bf16, int64_t rows, int64_t d, const float* w, int64_t e, float* out) {
    constexpr int64_t kExperts = 8;
    const int64_t full = d / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        const T* hr = h + r * d;
        for (int64_t j0 = 0; j0 < e; j0 += kExperts) {
            const int64_t ne = e - j0 < kExperts ? e - j0 : kExperts;
            vf acc[kExperts] = {};
            for (int64_t c = 0; c < full; c += VW) {
                const vf hv = load_vec(hr + c);
#pragma GCC unroll 8
                for (int64_t j = 0; j < kExperts; ++j)
                    if (j < ne) acc[j] += hv * loadf(w + (j0 + j) * d + c);
            }
            for (int64_t j = 0; j < ne; ++j) {
                float z = lane_sum(acc[j]);
                for (int64_t c = full; c < d; ++c) z += to_float(hr[c]) * w[(j0 + j) * d + c];
                out[r * e + j0 + j] = round_bf16 ? bf16_to_f32(f32_to_bf16(z)) : z;  // in h's dtype, as a Linear's
            }
        }
    }
}

void gate_logit_rows(const void* h, int dt, int64_t rows, int64_t d, const float* w, int64_t e, float* out) {
    if (dt == kF32)
        gate_logit_rows_t(static_cast<const float*>(h), false, rows, d, w, e, out);
    else
        gate_logit_rows_t(static_cast<const uint16_t*>(h), true, rows, d, w, e, out);
}

// gate_grad_rows for rows of T (float or bf16 bits), updated in place: each vector of a row is loaded once, gets
// every expert's term in fp32 and is stored (rounded) once.
template <typename T>
void gate_grad_rows_t(T* dh, int64_t rows, int64_t d, const float* dl, int64_t e, const float* w) {
    constexpr bool kBf16 = sizeof(T) == 2;
    const int64_t full = d / VW * VW;
    for (int64_t r = 0; r < rows; ++r) {
        T* g = dh + r * d;
        const float* dlr = dl + r * e;
        for (int64_t c = 0; c < full; c += VW) {
            vf v = load_vec(g + c);
            for (int64_t j = 0; j < e; ++j) v += splat(dlr[j]) * loadf(w + j * d + c);
            store_acc<kBf16>(g + c, 0, v);
        }
        for (int64_t c = full; c < d; ++c) {
            float z = to_float(g[c]);
            for (int64_t j = 0; j < e; ++j) z += dlr[j] * w[j * d + c];
            if constexpr (kBf16)
                g[c] = f32_to_bf16(z);
            else
                g[c] = z;
        }
    }
}

void gate_grad_rows(void* dh, int dt, int64_t rows, int64_t d, const float* dl, int64_t e, const float* w) {
    if (dt == kF32)
        gate_grad_rows_t(static_cast<float*>(dh), rows, d, dl, e, w);
    else
        gate_grad_rows_t(static_cast<uint16_t*>(dh), rows, d, dl, e, w);
}

const tp::Kernels kTable = {
    TP_ISA_NAME, VW, pack, gemm, to_f32, from_f32, gate_rows, softmax_rows, softmax_lse_rows, softmax_grad_rows,
    row_dots, layer_norm_rows, layer_norm_grad_rows, gate_logit_rows, gate_grad_rows, gemm_narrow,
#ifdef TP_BF16_DOT
    pack_pairs, gemm_pairs,
#else
    nullptr, nullptr,
#endif
};

}  // namespace

const tp::Kernels* table() { return &kTable; }

}  // namespace TP_ISA_NS
