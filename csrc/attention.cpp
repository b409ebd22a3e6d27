// Multi-head attention on CPU for training: softmax(scale Q K^T) V, the backward rebuilding the softmax from its
// logsumexp.
//
// Queries, keys and values are rows of up to two sources each (the recursion's vision rows of a fused
// (N, T, 3D) projection, then a joint attention's text rows), head h reading columns [h * dh, (h + 1) * dh) of
// every row, so no split, concatenation or merge of heads is ever copied. One task per (batch, head): its K, V
// (and Q) rows are packed (gathered first when they come from two sources), the scores computed into a
// cache-resident (Tq, Tk) buffer, the softmax taken in place (its logsumexp kept per row) and P V written into
// the output rows (batch, Tq, heads * dh). The backward recomputes P = exp(scale Q K^T - lse) in the same kind of
// buffer (keeping P for the backward would write and read batch x heads x Tq x Tk floats through memory) and runs
//     dV = P^T dO,  dP = dO V^T,  dS = scale P (dP - rowsum(dO * O)),  dQ = dS K,  dK = dS^T Q.
// Every output element is computed by one task in a fixed order: results do not depend on the thread count.
#include <string.h>

#include "common.h"
#include "kernels.h"

namespace tp {
namespace {

// One source of rows: element (b, r, c) at p[b * sb + r * sr + c], in floats.
struct Rows {
    float* p;
    int64_t sb, sr, n;
};

// The sources of q, k, v (two each: rows [0, a.n) from a, then [a.n, a.n + b.n) from b), read from the
// (address, batch stride, row stride, rows) quadruples of the exported functions' `src` arrays.
struct Sources {
    Rows q[2], k[2], v[2];
    int64_t nq() const { return q[0].n + q[1].n; }
    int64_t nk() const { return k[0].n + k[1].n; }
};

Sources read_sources(const int64_t* s) {
    Sources out;
    Rows* all[6] = {&out.q[0], &out.q[1], &out.k[0], &out.k[1], &out.v[0], &out.v[1]};
    for (int i = 0; i < 6; ++i)
        *all[i] = {reinterpret_cast<float*>(s[4 * i]), s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]};
    return out;
}

// Pointers to head h's columns of batch b's rows of the two sources: rows[0 .. a.n + b.n).
void row_ptrs(const Rows* two, int64_t b, int64_t col, float** rows) {
    int64_t i = 0;
    for (int s = 0; s < 2; ++s)
        for (int64_t r = 0; r < two[s].n; ++r) rows[i++] = two[s].p + b * two[s].sb + r * two[s].sr + col;
}

// Copies n rows of dh floats (given by pointers) into a contiguous (n, dh) buffer.
void gather(float* const* rows, int64_t n, int64_t dh, float* dst) {
    for (int64_t r = 0; r < n; ++r) memcpy(dst + r * dh, rows[r], dh * sizeof(float));
}

// The (n, dh) operand of head column `col`, batch b, of two row sources as (pointer, row stride): one source's
// rows read in place, or both gathered into buf (n, dh).
const float* operand(const Rows* two, int64_t b, int64_t col, int64_t dh, float** rows, float* buf, int64_t* rs) {
    if (two[1].n == 0) {
        *rs = two[0].sr;
        return two[0].p + b * two[0].sb + col;
    }
    row_ptrs(two, b, col, rows);
    gather(rows, two[0].n + two[1].n, dh, buf);
    *rs = dh;
    return buf;
}

// 1- or 2-vector panels for an n-column operand: the narrower when it wastes less of a partial last panel.
int panel_vectors(const Kernels& kn, int64_t n) {
    return round_up(n, 2 * kn.vw) <= round_up(n, kn.vw) ? 2 : 1;
}

// A right operand dh columns wide (V, dO, K or Q in the products whose output has the head's columns): 2-vector
// panels over its first `wide` columns, the rest in `nv_rest`-vector panels. At dh = 72 with 16-float vectors that
// is 64 + 8 columns in 32 + 16 lanes, the 8 multiplied on 8-lane vectors (gemm_narrow; -3% attention time at
// DiT-XL/2 width on Zen 4): all in 1-vector panels the register block gets half as many products per broadcast, all
// in 2-vector panels a quarter of the lanes are padding.
struct HeadPanels {
    int64_t dh, wide;
    int nv_rest;
    int64_t rest_width(const Kernels& kn) const { return round_up(dh - wide, int64_t(nv_rest) * kn.vw); }
    // the rest fits half a vector: its products run on half-width vectors (gemm_narrow)
    bool narrow(const Kernels& kn) const { return nv_rest == 1 && 2 * (dh - wide) <= kn.vw; }
    int64_t floats(const Kernels& kn, int64_t k) const { return k * (wide + rest_width(kn)); }
};

HeadPanels head_panels(const Kernels& kn, int64_t dh) {
    const int64_t wide = dh / (2 * kn.vw) * (2 * kn.vw);
    return {dh, wide, panel_vectors(kn, dh - wide)};
}

// Packs the (k, dh) operand src(l, j) = src[l * rs + j * cs] as hp lays it out.
void pack_head(const Kernels& kn, const HeadPanels& hp, const float* src, int64_t rs, int64_t cs, int64_t k,
               float* dst) {
    if (hp.wide > 0) kn.pack(src, kF32, nullptr, rs, cs, k, hp.wide, 2, dst);
    if (hp.wide < hp.dh)
        kn.pack(src + hp.wide * cs, kF32, nullptr, rs, cs, k, hp.dh - hp.wide, hp.nv_rest, dst + k * hp.wide);
}

// c rows [0, dh) = a (m x k) @ the operand pack_head packed; shifted: scratch for m row pointers.
void gemm_head(const Kernels& kn, const HeadPanels& hp, int64_t m, int64_t k, const float* const* a, int64_t cs_a,
               const float* bp, void* const* c, void** shifted) {
    if (hp.wide > 0) kn.gemm(m, hp.wide, k, a, cs_a, bp, 2, c, kF32, 0);
    if (hp.wide < hp.dh) {
        for (int64_t i = 0; i < m; ++i) shifted[i] = static_cast<float*>(c[i]) + hp.wide;
        if (hp.narrow(kn))
            kn.gemm_narrow(m, hp.dh - hp.wide, k, a, cs_a, bp + k * hp.wide, shifted);
        else
            kn.gemm(m, hp.dh - hp.wide, k, a, cs_a, bp + k * hp.wide, hp.nv_rest, shifted, kF32, 0);
    }
}

}  // namespace
}  // namespace tp

using namespace tp;

// Forward. src: 6 x (address, batch stride, row stride, rows) for q (two sources), k (two), v (two; rows as
// k's), fp32. out (batch, Tq, heads * dh) contiguous. lse (batch, heads, Tq): each softmax row's logsumexp, for
// the backward. threads: OpenMP threads over the batch x heads tasks.
TP_EXPORT int tp_attention_fwd(const int64_t* src, int64_t batch, int64_t heads, int64_t dh, double scale,
                               float* out, float* lse, int threads) {
    const Kernels& kn = *kernels();
    const Sources s = read_sources(src);
    const int64_t nq = s.nq(), nk = s.nk(), d = heads * dh;
    const int nv_t = panel_vectors(kn, nk);
    const int64_t wt = round_up(nk, int64_t(nv_t) * kn.vw);
    const HeadPanels hp = head_panels(kn, dh);
    try {
        const int64_t per_thread = piece(nk * dh, 4) + piece(dh * wt, 4) + piece(hp.floats(kn, nk), 4) +
                                   piece(nq * nk, 4) + 3 * piece(nq > nk ? nq : nk, sizeof(void*));
        Workspace ws;
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
#pragma omp parallel num_threads(threads)
        {
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const kc = carve.take<float>(nk * dh);     // (Tk, dh) this head's keys, then values
            float* const kt = carve.take<float>(dh * wt);     // K^T packed (dh x Tk)
            float* const vp = carve.take<float>(hp.floats(kn, nk));  // V packed (Tk x dh)
            float* const p = carve.take<float>(nq * nk);      // (Tq, Tk) scores, then probabilities
            float** const rows = carve.take<float*>(nq > nk ? nq : nk);
            void** const crow = carve.take<void*>(nq > nk ? nq : nk);
            void** const shifted = carve.take<void*>(nq > nk ? nq : nk);
#pragma omp for schedule(static)
            for (int64_t task = 0; task < batch * heads; ++task) {
                const int64_t b = task / heads, col = (task % heads) * dh;
                int64_t rs;
                const float* op = operand(s.k, b, col, dh, rows, kc, &rs);
                kn.pack(op, kF32, nullptr, 1, rs, dh, nk, nv_t, kt);
                op = operand(s.v, b, col, dh, rows, kc, &rs);
                pack_head(kn, hp, op, rs, 1, nk, vp);
                row_ptrs(s.q, b, col, rows);
                for (int64_t i = 0; i < nq; ++i) crow[i] = p + i * nk;
                kn.gemm(nq, nk, dh, const_cast<const float* const*>(rows), 1, kt, nv_t, crow, kF32, 0);
                kn.softmax_rows(p, nq, nk, nk, float(scale), lse + task * nq);
                for (int64_t i = 0; i < nq; ++i) {
                    rows[i] = p + i * nk;
                    crow[i] = out + (b * nq + i) * d + col;
                }
                gemm_head(kn, hp, nq, nk, const_cast<const float* const*>(rows), 1, vp, crow, shifted);
            }
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}

// Backward of tp_attention_fwd. grad: 6 x (address, batch stride, row stride, rows) of dq, dk, dv laid out
// like src (rows as src's), every row's head columns written. grad_out, out (batch, Tq, heads * dh), lse as the
// forward left them.
TP_EXPORT int tp_attention_bwd(const int64_t* src, const int64_t* grad, int64_t batch, int64_t heads, int64_t dh,
                               double scale, const float* grad_out, const float* out, const float* lse,
                               int threads) {
    const Kernels& kn = *kernels();
    const Sources s = read_sources(src), g = read_sources(grad);
    const int64_t nq = s.nq(), nk = s.nk(), d = heads * dh, nmax = nq > nk ? nq : nk;
    const int nv_t = panel_vectors(kn, nk);
    const int64_t wt = round_up(nk, int64_t(nv_t) * kn.vw);
    const HeadPanels hp = head_panels(kn, dh);
    try {
        const int64_t per_thread = piece(nmax * dh, 4) + piece(dh * wt, 4) + piece(hp.floats(kn, nmax), 4) +
                                   2 * piece(nq * nk, 4) + piece(nq, 4) + 3 * piece(nmax, sizeof(void*));
        Workspace ws;
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
#pragma omp parallel num_threads(threads)
        {
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const buf = carve.take<float>(nmax * dh);  // (rows, dh) gathered operand rows
            float* const vt = carve.take<float>(dh * wt);    // V^T packed (dh x Tk)
            float* const pk = carve.take<float>(hp.floats(kn, nmax));  // dO, then K, then Q packed ((rows) x dh)
            float* const p = carve.take<float>(nq * nk);      // (Tq, Tk) probabilities, rebuilt
            float* const ds = carve.take<float>(nq * nk);     // dP, then dS (Tq, Tk)
            float* const rowdot = carve.take<float>(nq);
            float** const rows = carve.take<float*>(nmax);
            void** const crow = carve.take<void*>(nmax);
            void** const shifted = carve.take<void*>(nmax);
#pragma omp for schedule(static)
            for (int64_t task = 0; task < batch * heads; ++task) {
                const int64_t b = task / heads, col = (task % heads) * dh;
                const float* const go = grad_out + b * nq * d + col;  // row i at go + i * d
                // P = exp(scale Q K^T - lse)
                int64_t rs;
                const float* op = operand(s.k, b, col, dh, rows, buf, &rs);
                kn.pack(op, kF32, nullptr, 1, rs, dh, nk, nv_t, vt);
                row_ptrs(s.q, b, col, rows);
                for (int64_t i = 0; i < nq; ++i) crow[i] = p + i * nk;
                kn.gemm(nq, nk, dh, const_cast<const float* const*>(rows), 1, vt, nv_t, crow, kF32, 0);
                kn.softmax_lse_rows(p, nq, nk, nk, float(scale), lse + task * nq);
                kn.row_dots(go, d, out + b * nq * d + col, d, nq, dh, rowdot);  // rowsum(dO * O)
                // dV = P^T dO: the left operand's row j is column j of P
                pack_head(kn, hp, go, d, 1, nq, pk);
                for (int64_t j = 0; j < nk; ++j) rows[j] = p + j;
                row_ptrs(g.v, b, col, reinterpret_cast<float**>(crow));
                gemm_head(kn, hp, nk, nq, const_cast<const float* const*>(rows), nk, pk, crow, shifted);
                // dP = dO V^T, then dS in place
                op = operand(s.v, b, col, dh, rows, buf, &rs);
                kn.pack(op, kF32, nullptr, 1, rs, dh, nk, nv_t, vt);
                for (int64_t i = 0; i < nq; ++i) {
                    rows[i] = const_cast<float*>(go) + i * d;
                    crow[i] = ds + i * nk;
                }
                kn.gemm(nq, nk, dh, const_cast<const float* const*>(rows), 1, vt, nv_t, crow, kF32, 0);
                kn.softmax_grad_rows(p, nk, ds, nk, nq, nk, rowdot, float(scale));
                // dQ = dS K
                op = operand(s.k, b, col, dh, rows, buf, &rs);
                pack_head(kn, hp, op, rs, 1, nk, pk);
                for (int64_t i = 0; i < nq; ++i) rows[i] = ds + i * nk;
                row_ptrs(g.q, b, col, reinterpret_cast<float**>(crow));
                gemm_head(kn, hp, nq, nk, const_cast<const float* const*>(rows), 1, pk, crow, shifted);
                // dK = dS^T Q: the left operand's row j is column j of dS
                op = operand(s.q, b, col, dh, rows, buf, &rs);
                pack_head(kn, hp, op, rs, 1, nq, pk);
                for (int64_t j = 0; j < nk; ++j) rows[j] = ds + j;
                row_ptrs(g.k, b, col, reinterpret_cast<float**>(crow));
                gemm_head(kn, hp, nk, nq, const_cast<const float* const*>(rows), nk, pk, crow, shifted);
            }
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}
