// Routed LoRA forward and backward on CPU.
//
// Tokens are grouped by expert with a counting sort (O(N), stable). The forward runs over tiles of up
// to kTileTokens tokens of one expert: the tile's rows of x are read in place (fp32, or bf16 with bf16 dot
// products) or converted into a cache-resident fp32 buffer (bf16 without them), shrunk (tile x S*R) against
// the packed A_e, scaled by gate * scale on the rank-R side, expanded, and each output row is written once
// at its token's position. The backward does the same per tile for dx and dgate; dA and dB are per-expert
// reductions over that expert's tokens in a fixed order, parallel over experts x output column blocks.
// Every output element is computed by exactly one task in a fixed order, so results do not depend on the
// thread count or the schedule.
//
// Layouts (row-major): x (N, D_in), idx (N,), a (E, S, R, D_in), b (E, S, D_out, R), gate (N,) fp32 or
// null, y (N, S * D_out), h (N, S * R) fp32 = A_e x unscaled. x, a, b, y, grad_y, dx, da, db share dt.
// A token with idx -1 (halted) is skipped like an expert's empty group: it is in no tile, costs no
// multiply and no gather; its rows of y, h, dx and dgate are zero-filled, and it adds nothing to dA, dB.
#include <string.h>

#include <vector>

#include "common.h"
#include "kernels.h"

namespace tp {
namespace {

constexpr int64_t kTileTokens = 96;   // tokens per forward/backward tile
constexpr int64_t kL2Floats = 65536;  // 256 KB: a weight-gradient accumulator or packed chunk stays in L2

struct Panels {
    int nv;         // vectors per panel
    int64_t width;  // columns rounded up to whole panels
};

Panels panels_for(const Kernels& kn, int64_t cols) {
    const int nv = cols <= kn.vw ? 1 : 2;  // narrow matrices (rank <= one vector) use 1-vector panels
    return {nv, round_up(cols, int64_t(nv) * kn.vw)};
}

struct Grouping {
    std::vector<int64_t> perm;     // routed token ids, grouped by expert, in token order within an expert
    std::vector<int64_t> offsets;  // (E + 1,) expert e owns perm[offsets[e]:offsets[e + 1]]
    std::vector<int64_t> skipped;  // token ids with idx -1, in no group
    std::vector<int64_t> active;   // experts with at least one token
    std::vector<int64_t> slot;     // (E,) position of an expert in `active`, or -1
};

bool group_by_expert(const int64_t* idx, int64_t n, int64_t n_exp, Grouping& g) {
    g.offsets.assign(n_exp + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
        if (idx[i] == -1) {
            g.skipped.push_back(i);
            continue;
        }
        if (idx[i] < 0 || idx[i] >= n_exp) return false;
        ++g.offsets[idx[i] + 1];
    }
    g.slot.assign(n_exp, -1);
    for (int64_t e = 0; e < n_exp; ++e) {
        if (g.offsets[e + 1] > 0) {
            g.slot[e] = int64_t(g.active.size());
            g.active.push_back(e);
        }
        g.offsets[e + 1] += g.offsets[e];
    }
    std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
    g.perm.resize(n - int64_t(g.skipped.size()));
    for (int64_t i = 0; i < n; ++i)
        if (idx[i] >= 0) g.perm[next[idx[i]]++] = i;
    return true;
}

// Zero-fills row `tok` of each skipped token in a (N, cols) matrix of element size `elem` (null: nothing).
void zero_rows(void* m, const std::vector<int64_t>& tok, int64_t cols, int64_t elem) {
    if (m == nullptr) return;
    for (int64_t t : tok) memset(static_cast<char*>(m) + t * cols * elem, 0, cols * elem);
}

struct Tile {
    int64_t expert, lo, hi;  // perm[lo:hi], all routed to `expert`
};

std::vector<Tile> make_tiles(const Grouping& g) {
    std::vector<Tile> tiles;
    for (int64_t e : g.active)
        for (int64_t lo = g.offsets[e]; lo < g.offsets[e + 1]; lo += kTileTokens)
            tiles.push_back({e, lo, lo + kTileTokens < g.offsets[e + 1] ? lo + kTileTokens : g.offsets[e + 1]});
    return tiles;
}

// Weight-gradient blocking: column-block width (as wide as an L2-sized accumulator allows, so rows are read in
// long contiguous runs, but narrow enough to give every thread tasks) and tokens per packed chunk.
struct WgradBlocks {
    int64_t width, chunk;
};

WgradBlocks wgrad_blocks(int64_t rows, int64_t d_in, int64_t d_out, int64_t n_slice, int64_t n_exp, int threads) {
    const int64_t widest = d_in > d_out ? d_in : d_out;
    int64_t width = round_up(widest, 32);
    const int64_t cap = kL2Floats / rows / 32 * 32;
    width = width < cap ? width : (cap > 32 ? cap : 32);
    auto tasks = [&](int64_t w) { return n_exp * ((d_in + w - 1) / w + n_slice * ((d_out + w - 1) / w)); };
    while (width > 128 && tasks(width) < 4 * threads) width = round_up(width / 2, 32);
    const int64_t chunk = kL2Floats / width;
    return {width, chunk > 16 ? chunk : 16};
}

inline const char* at(const void* p, int64_t elems, int dt) { return static_cast<const char*>(p) + elems * dtype_size(dt); }
inline char* at(void* p, int64_t elems, int dt) { return static_cast<char*>(p) + elems * dtype_size(dt); }

// How the GEMMs multiply. fp32 path (float32 inputs, and bfloat16 inputs on CPUs without bf16 dot products,
// converted to fp32): fp32 operand rows and fp32 panels. Dot-product path (bfloat16 inputs where the kernel
// table has gemm_pairs): bf16 operand rows and bf16 pair panels, fp32 accumulation. Operands computed here
// (gate * scale * h, dh) are stored in the operand type, so on the dot-product path they are rounded to bf16,
// as the composed-torch path rounds them to the input dtype.
struct Mul {
    const Kernels& kn;
    int dt;      // input dtype
    bool pairs;  // bf16 dot products

    Mul(const Kernels& k, int dtype) : kn(k), dt(dtype), pairs(dtype == kBF16 && k.gemm_pairs != nullptr) {}
    int op_dt() const { return pairs ? kBF16 : kF32; }
    bool converts() const { return dt != op_dt(); }  // inputs are converted to fp32 before multiplying
    // Packs like Kernels::pack into dst, which holds k * width floats (pair panels take half of that).
    void pack(const void* src, const int64_t* rows, int64_t rs, int64_t cs, int64_t k, int64_t n, int nv,
              float* dst) const {
        if (pairs)
            kn.pack_pairs(static_cast<const uint16_t*>(src), rows, rs, cs, k, n, nv, reinterpret_cast<uint32_t*>(dst));
        else
            kn.pack(src, dt, rows, rs, cs, k, n, nv, dst);
    }
    // c (rows in c_dt) = (accumulate ? c : 0) + a @ packed b, a given by operand rows contiguous along k.
    // fp32 operands may also be strided along k (cs_a floats apart); pair operands are always contiguous.
    void gemm(int64_t m, int64_t n, int64_t k, const void* const* a, const float* bp, int nv, void* const* c, int c_dt,
              int accumulate, int64_t cs_a = 1) const {
        if (pairs)
            kn.gemm_pairs(m, n, k, reinterpret_cast<const uint16_t* const*>(a), reinterpret_cast<const uint32_t*>(bp),
                          nv, c, c_dt, accumulate);
        else
            kn.gemm(m, n, k, reinterpret_cast<const float* const*>(a), cs_a, bp, nv, c, c_dt, accumulate);
    }
    void store(const float* src, void* dst, int64_t count) const { kn.from_f32(src, dst, op_dt(), count); }
};

// Asks for the tile's rows of src (N, ld) in dtype dt, [col0, col0 + cols), to be brought into L2 (write: for
// writing). Tokens of a tile are scattered rows, which the hardware prefetcher does not see coming.
void prefetch_rows(const void* src, int dt, int64_t ld, int64_t col0, int64_t cols, const int64_t* tok, int64_t m,
                   bool write) {
    const int64_t bytes = cols * dtype_size(dt);
    for (int64_t r = 0; r < m; ++r) {
        const char* row = at(src, tok[r] * ld + col0, dt);
        for (int64_t o = 0; o < bytes; o += 64) {
            if (write)
                __builtin_prefetch(row + o, 1, 2);
            else
                __builtin_prefetch(row + o, 0, 2);
        }
    }
}

// Operand row pointers to columns [col0, col0 + cols) of the tile's rows of src (N, ld): read in place, or
// converted into buf (tile, cols) fp32 when the inputs are converted.
void input_rows(const Mul& mul, const void* src, int64_t ld, int64_t col0, int64_t cols, const int64_t* tok, int64_t m,
                float* buf, const void** rows) {
    for (int64_t r = 0; r < m; ++r) {
        const void* row = at(src, tok[r] * ld + col0, mul.dt);
        if (mul.converts()) {
            mul.kn.to_f32(row, mul.dt, buf + r * cols, cols);
            row = buf + r * cols;
        }
        rows[r] = row;
    }
}

// out[tok[r], col0 : col0 + n] = a (m x k, operand rows) @ packed b, written once, in place, in the input dtype.
void gemm_to_rows(const Mul& mul, int64_t m, int64_t n, int64_t k, const void* const* a, const float* bp, Panels pb,
                  void** crow, const int64_t* tok, void* out, int64_t ld_out, int64_t col0) {
    for (int64_t r = 0; r < m; ++r) crow[r] = at(out, tok[r] * ld_out + col0, mul.dt);
    mul.gemm(m, n, k, a, bp, pb.nv, crow, mul.dt, 0);
}

// The packed weights a call multiplies with, in float counts. Forward: A_e^T (D_in x S*R, panels of pa) then
// B_es^T (R x D_out, panels of pb); backward: B_es (D_out x R, panels of pr) then, for dx, A_e (S*R x D_in, panels
// of pd). Experts are counted by `experts` (the ones in use when packing per call, all E for a pre-packed buffer).
struct PackLayout {
    int64_t first, second;  // floats of each part; the second starts at a 16-float boundary after the first
    int64_t total() const { return round_up(first, 16) + second; }
};

PackLayout fwd_layout(const Kernels& kn, int64_t experts, int64_t n_slice, int64_t rank, int64_t d_in, int64_t d_out) {
    return {experts * d_in * panels_for(kn, n_slice * rank).width,
            experts * n_slice * rank * panels_for(kn, d_out).width};
}

PackLayout bwd_layout(const Kernels& kn, int64_t experts, int64_t n_slice, int64_t rank, int64_t d_in, int64_t d_out,
                      bool with_a) {
    return {experts * n_slice * d_out * panels_for(kn, rank).width,
            with_a ? experts * n_slice * rank * panels_for(kn, d_in).width : 0};
}

// Forward packing of expert e into slot j: part 0 packs A_e, part s + 1 packs slice s of B_e.
void pack_fwd_job(const Mul& mul, const void* a, const void* b, int64_t e, int64_t j, int64_t part, int64_t n_slice,
                  int64_t rank, int64_t d_in, int64_t d_out, float* apack, float* bpack) {
    const int dt = mul.dt;
    const int64_t sr = n_slice * rank;
    const Panels pa = panels_for(mul.kn, sr), pb = panels_for(mul.kn, d_out);
    if (part == 0)
        mul.pack(at(a, e * sr * d_in, dt), nullptr, 1, d_in, d_in, sr, pa.nv, apack + j * d_in * pa.width);
    else
        mul.pack(at(b, (e * n_slice + part - 1) * d_out * rank, dt), nullptr, 1, rank, rank, d_out, pb.nv,
                 bpack + (j * n_slice + part - 1) * rank * pb.width);
}

// Backward packing: part s < S packs slice s of B_e, part S packs A_e (for dx).
void pack_bwd_job(const Mul& mul, const void* a, const void* b, int64_t e, int64_t j, int64_t part, int64_t n_slice,
                  int64_t rank, int64_t d_in, int64_t d_out, float* bpack, float* apack) {
    const int dt = mul.dt;
    const int64_t sr = n_slice * rank;
    const Panels pr = panels_for(mul.kn, rank), pd = panels_for(mul.kn, d_in);
    if (part < n_slice)
        mul.pack(at(b, (e * n_slice + part) * d_out * rank, dt), nullptr, rank, 1, d_out, rank, pr.nv,
                 bpack + (j * n_slice + part) * d_out * pr.width);
    else
        mul.pack(at(a, e * sr * d_in, dt), nullptr, d_in, 1, sr, d_in, pd.nv, apack + j * sr * pd.width);
}

// The rows one weight-gradient reduction reads for a call (one step of a recursion): x and grad_y in token order,
// the tokens' grouping, and dh and m h with tokens in grouped order (fp32 (N, S*R) rows, or pair operands
// transposed to (S*R, N)).
struct WgradRows {
    const void* x;
    const void* grad_y;
    const Grouping* g;
    const char* dh;
    const char* hm;
    int64_t n;
};

// Per-thread buffers of a weight-gradient task.
struct WgradScratch {
    float* cb;   // (rows, width) fp32 accumulator
    float* rp;   // packed chunk of x or grad_y rows
    float* col;  // one dB row before conversion
    const void** wa;
    void** wc;
};

// Weight-gradient task `task` (expert e, a column block of dA or of one dB slice), reduced over the expert's tokens
// of every source in order: dA_e[:, c0:] = sum dh_e^T x_e[:, c0:], dB_es^T[:, c0:] = sum (m h)_es^T grad_y_es[:, c0:].
void wgrad_task(const Mul& mul, int64_t task, const WgradRows* src, int64_t n_src, int64_t d_in, int64_t n_slice,
                int64_t rank, int64_t d_out, WgradBlocks wb, Panels pw, int64_t chunk, const WgradScratch& w,
                void* da, void* db) {
    const int dt = mul.dt, ot = mul.op_dt();
    const int64_t sr = n_slice * rank, sd = n_slice * d_out;
    const int64_t a_blocks = (d_in + wb.width - 1) / wb.width, b_blocks = (d_out + wb.width - 1) / wb.width;
    const int64_t e = task / (a_blocks + n_slice * b_blocks), sub = task % (a_blocks + n_slice * b_blocks);
    const bool is_a = sub < a_blocks;
    const int64_t s = is_a ? 0 : (sub - a_blocks) / b_blocks;
    const int64_t c0 = (is_a ? sub : (sub - a_blocks) % b_blocks) * wb.width;
    const int64_t width = is_a ? d_in : d_out, cols = width - c0 < wb.width ? width - c0 : wb.width;
    const int64_t rows = is_a ? sr : rank;
    // the left operand's row i (a column of dh or m h over the expert's tokens): strided in the fp32 (N, S*R)
    // layout, contiguous in the pair operands' transposed (S*R, N) one
    const bool strided = !mul.pairs;
    // fp32 dA accumulates in place in its rows; dB (stored transposed) and bf16 go through cb
    const bool in_place = is_a && dt == kF32;
    for (int64_t i = 0; i < rows; ++i)
        w.wc[i] = in_place ? static_cast<void*>(at(da, (e * sr + i) * d_in + c0, dt)) : static_cast<void*>(w.cb + i * wb.width);
    bool any = false;
    for (int64_t q = 0; q < n_src; ++q) {
        const WgradRows& r = src[q];
        const int64_t lo = r.g->offsets[e], cnt = r.g->offsets[e + 1] - lo;
        const char* lhs = strided ? at(is_a ? r.dh : r.hm, is_a ? 0 : s * rank, ot)
                                  : (is_a ? r.dh : at(r.hm, s * rank * r.n, ot));
        const void* xs = is_a ? at(r.x, c0, dt) : at(r.grad_y, s * d_out + c0, dt);
        for (int64_t k0 = 0; k0 < cnt; k0 += chunk) {
            const int64_t kc = cnt - k0 < chunk ? cnt - k0 : chunk;
            mul.pack(xs, r.g->perm.data() + lo + k0, is_a ? d_in : sd, 1, kc, cols, pw.nv, w.rp);
            for (int64_t i = 0; i < rows; ++i)
                w.wa[i] = at(lhs, strided ? (lo + k0) * sr + i : i * r.n + lo + k0, ot);
            mul.gemm(rows, cols, kc, w.wa, w.rp, pw.nv, w.wc, kF32, any, strided ? sr : 1);
            any = true;
        }
    }
    if (!any)
        for (int64_t i = 0; i < rows; ++i) memset(w.wc[i], 0, cols * sizeof(float));
    if (is_a && !in_place) {
        for (int64_t q = 0; q < sr; ++q) mul.kn.from_f32(w.cb + q * wb.width, at(da, (e * sr + q) * d_in + c0, dt), dt, cols);
    } else if (!is_a) {
        for (int64_t o = 0; o < cols; ++o) {  // dB is stored (D_out, R): transpose the block
            char* row = at(db, ((e * n_slice + s) * d_out + c0 + o) * rank, dt);
            float* dst = dt == kF32 ? reinterpret_cast<float*>(row) : w.col;  // fp32 rows in place
            for (int64_t q = 0; q < rank; ++q) dst[q] = w.cb[q * wb.width + o];
            if (dt != kF32) mul.kn.from_f32(w.col, row, dt, rank);
        }
    }
}

}  // namespace
}  // namespace tp

using namespace tp;

// Floats of the buffer tp_routed_lora_pack fills (for_backward: the backward's layout, with A for dx).
TP_EXPORT int64_t tp_routed_lora_packed_floats(int dt, int64_t n_exp, int64_t n_slice, int64_t rank, int64_t d_in,
                                               int64_t d_out, int for_backward) {
    const Kernels& kn = *kernels();
    return for_backward ? bwd_layout(kn, n_exp, n_slice, rank, d_in, d_out, true).total()
                        : fwd_layout(kn, n_exp, n_slice, rank, d_in, d_out).total();
}

// Packs every expert's weights as the forward (for_backward = 0) or backward multiplies them, so calls that
// share weights (the T steps of a recursion, and their backward) pack once: pass `out` as their `packed`.
TP_EXPORT int tp_routed_lora_pack(const void* a, const void* b, int dt, int64_t n_exp, int64_t n_slice, int64_t rank,
                                  int64_t d_in, int64_t d_out, int for_backward, float* out, int threads) {
    const Mul mul(*kernels(), dt);
    const int64_t parts = n_slice + 1;
    if (for_backward) {
        const PackLayout lay = bwd_layout(mul.kn, n_exp, n_slice, rank, d_in, d_out, true);
        float* const apack = out + round_up(lay.first, 16);
#pragma omp parallel for schedule(dynamic) num_threads(threads)
        for (int64_t job = 0; job < n_exp * parts; ++job)
            pack_bwd_job(mul, a, b, job / parts, job / parts, job % parts, n_slice, rank, d_in, d_out, out, apack);
    } else {
        const PackLayout lay = fwd_layout(mul.kn, n_exp, n_slice, rank, d_in, d_out);
        float* const bpack = out + round_up(lay.first, 16);
#pragma omp parallel for schedule(dynamic) num_threads(threads)
        for (int64_t job = 0; job < n_exp * parts; ++job)
            pack_fwd_job(mul, a, b, job / parts, job / parts, job % parts, n_slice, rank, d_in, d_out, out, bpack);
    }
    return kOk;
}

// packed: null, or tp_routed_lora_pack's forward buffer for a and b (then a and b are not read).
TP_EXPORT int tp_routed_lora_fwd(const void* x, const int64_t* idx, const void* a, const void* b, const float* gate,
                                 int dt, int64_t n, int64_t d_in, int64_t n_exp, int64_t n_slice, int64_t rank,
                                 int64_t d_out, double scale, void* y, float* h, const float* packed, int threads) {
    const Mul mul(*kernels(), dt);
    const int64_t sr = n_slice * rank, sd = n_slice * d_out, ot = mul.op_dt();
    const Panels pa = panels_for(mul.kn, sr), pb = panels_for(mul.kn, d_out);
    try {
        Grouping g;
        if (!group_by_expert(idx, n, n_exp, g)) return kBadIndex;
        zero_rows(y, g.skipped, sd, dtype_size(dt));
        zero_rows(h, g.skipped, sr, sizeof(float));
        const int64_t na = int64_t(g.active.size());
        const std::vector<Tile> tiles = make_tiles(g);
        const int64_t per_thread = piece(mul.converts() ? kTileTokens * d_in : 0, 4) + piece(kTileTokens * pa.width, 4) +
                                   piece(kTileTokens * sr, dtype_size(ot)) + 2 * piece(kTileTokens, sizeof(void*));
        Workspace ws;
        // packed weights of the experts in use (slot j = g.slot[e]), or all of them pre-packed (slot e)
        const PackLayout lay = fwd_layout(mul.kn, packed ? 0 : na, n_slice, rank, d_in, d_out);
        const int64_t o_pack = ws.reserve(piece(lay.total(), 4));
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
        float* const own = reinterpret_cast<float*>(base + o_pack);  // packed here when no buffer is given
        const float* const apack = packed ? packed : own;
        const float* const bpack = apack + round_up(packed ? fwd_layout(mul.kn, n_exp, n_slice, rank, d_in, d_out).first
                                                           : lay.first, 16);
#pragma omp parallel num_threads(threads)
        {
            if (!packed) {
#pragma omp for schedule(dynamic)
                for (int64_t job = 0; job < na * (1 + n_slice); ++job)
                    pack_fwd_job(mul, a, b, g.active[job / (1 + n_slice)], job / (1 + n_slice), job % (1 + n_slice),
                                 n_slice, rank, d_in, d_out, own, own + round_up(lay.first, 16));
            }
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const xt = carve.take<float>(mul.converts() ? kTileTokens * d_in : 0);  // (tile, D_in) converted x
            float* const hb = carve.take<float>(kTileTokens * pa.width);          // (tile, S*R padded) A_e x
            char* const hs = carve.take<char>(kTileTokens * sr * dtype_size(ot));  // (tile, S*R) m h as operands
            const void** const arow = carve.take<const void*>(kTileTokens);
            void** const crow = carve.take<void*>(kTileTokens);
#pragma omp for schedule(dynamic)
            for (size_t t = 0; t < tiles.size(); ++t) {
                const Tile& tile = tiles[t];
                const int64_t* tok = g.perm.data() + tile.lo;
                const int64_t m = tile.hi - tile.lo, j = packed ? tile.expert : g.slot[tile.expert];
                prefetch_rows(x, dt, d_in, 0, d_in, tok, m, false);
                prefetch_rows(y, dt, sd, 0, sd, tok, m, true);
                input_rows(mul, x, d_in, 0, d_in, tok, m, xt, arow);
                for (int64_t r = 0; r < m; ++r) crow[r] = hb + r * pa.width;
                mul.gemm(m, sr, d_in, arow, apack + j * d_in * pa.width, pa.nv, crow, kF32, 0);
                for (int64_t r = 0; r < m; ++r) {
                    float* hr = hb + r * pa.width;
                    memcpy(h + tok[r] * sr, hr, sr * sizeof(float));
                    const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                    for (int64_t c = 0; c < sr; ++c) hr[c] *= mult;  // gate * scale on the rank-R side
                    mul.store(hr, at(hs, r * sr, ot), sr);
                }
                for (int64_t s = 0; s < n_slice; ++s) {
                    for (int64_t r = 0; r < m; ++r) arow[r] = at(hs, r * sr + s * rank, ot);
                    gemm_to_rows(mul, m, d_out, rank, arow, bpack + (j * n_slice + s) * rank * pb.width, pb, crow, tok, y,
                                 sd, s * d_out);
                }
            }
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}

// Gradients of tp_routed_lora_fwd. dx, da, db, dgate may each be null (not needed); da and db are both
// given or both null. dgate is fp32. dh_rows, hm_rows: null, or (N, S*R) fp32 buffers that receive dh and m h
// with tokens in grouped order, the rows a later tp_routed_lora_wgrad reduces (the weight gradients of several
// calls in one reduction); fp32 operands only (not the bf16 dot-product path).
TP_EXPORT int tp_routed_lora_bwd(const void* grad_y, const void* x, const int64_t* idx, const void* a,
                                 const void* b, const float* gate, const float* h, int dt, int64_t n, int64_t d_in,
                                 int64_t n_exp, int64_t n_slice, int64_t rank, int64_t d_out, double scale, void* dx,
                                 void* da, void* db, float* dgate, const float* packed, float* dh_rows,
                                 float* hm_rows, int threads) {
    const Mul mul(*kernels(), dt);
    const int64_t sr = n_slice * rank, sd = n_slice * d_out, wrows = sr > rank ? sr : rank, ot = mul.op_dt();
    const bool keep_rows = dh_rows != nullptr;
    if (keep_rows && (mul.pairs || hm_rows == nullptr)) return kBadArgument;
    const bool need_w = da != nullptr, need_rows = need_w || keep_rows;
    const Panels pr = panels_for(mul.kn, rank), pd = panels_for(mul.kn, d_in);
    const WgradBlocks wb = wgrad_blocks(wrows, d_in, d_out, n_slice, n_exp, threads);
    const Panels pw = panels_for(mul.kn, wb.width);
    // tokens per packed chunk: bf16 pair panels take half the lanes, and a chunk must start on a pair
    const int64_t chunk = mul.pairs ? 2 * wb.chunk : wb.chunk;
    try {
        Grouping g;
        if (!group_by_expert(idx, n, n_exp, g)) return kBadIndex;
        zero_rows(dx, g.skipped, d_in, dtype_size(dt));
        zero_rows(dgate, g.skipped, 1, sizeof(float));
        const int64_t na = int64_t(g.active.size());
        const std::vector<Tile> tiles = make_tiles(g);
        // weight-gradient tasks: per expert, column blocks of dA (D_in) then of each dB slice (D_out)
        const int64_t a_blocks = (d_in + wb.width - 1) / wb.width, b_blocks = (d_out + wb.width - 1) / wb.width;
        const int64_t w_tasks = need_w ? n_exp * (a_blocks + n_slice * b_blocks) : 0;
        const int64_t ldg = n_slice * pr.width;
        const int64_t per_thread =
            piece(mul.converts() ? kTileTokens * sd : 0, 4) + piece(kTileTokens * ldg, 4) + 2 * piece(kTileTokens * sr, 4) +
            piece(kTileTokens * sr, dtype_size(ot)) + 3 * piece(kTileTokens, sizeof(void*)) + piece(wrows * wb.width, 4) +
            piece(wb.chunk * wb.width, 4) + piece(rank, 4) + 2 * piece(wrows, sizeof(void*));
        Workspace ws;
        // packed weights: B_es (D_out x R) and, for dx, A_e (S*R x D_in), of the experts in use (slot j =
        // g.slot[e]), or all of them pre-packed (slot e)
        const PackLayout lay = bwd_layout(mul.kn, packed ? 0 : na, n_slice, rank, d_in, d_out, dx != nullptr);
        const int64_t o_pack = ws.reserve(piece(lay.total(), 4));
        // for the weight gradients, dh and m h with tokens in grouped order (dh = m * dL/d(m h), m = gate * scale):
        // fp32 as (N, S*R) rows, read as strided operands; pair operands transposed to (S*R, N)
        const int64_t o_dh = ws.reserve(piece(need_w && !keep_rows ? n * sr : 0, dtype_size(ot)));
        const int64_t o_hm = ws.reserve(piece(need_w && !keep_rows ? n * sr : 0, dtype_size(ot)));
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
        float* const own = reinterpret_cast<float*>(base + o_pack);  // packed here when no buffer is given
        const float* const bpack = packed ? packed : own;
        const int64_t b_floats = packed ? bwd_layout(mul.kn, n_exp, n_slice, rank, d_in, d_out, true).first : lay.first;
        const float* const apack = bpack + round_up(b_floats, 16);
        char* const dh_t = keep_rows ? reinterpret_cast<char*>(dh_rows) : base + o_dh;
        char* const hm_t = keep_rows ? reinterpret_cast<char*>(hm_rows) : base + o_hm;
        const WgradRows rows_src = {x, grad_y, &g, dh_t, hm_t, n};
#pragma omp parallel num_threads(threads)
        {
            if (!packed) {
                const int64_t pack_jobs = na * (n_slice + (dx ? 1 : 0));
#pragma omp for schedule(dynamic)
                for (int64_t job = 0; job < pack_jobs; ++job)
                    pack_bwd_job(mul, a, b, g.active[job % na], job % na, job / na, n_slice, rank, d_in, d_out, own,
                                 own + round_up(lay.first, 16));
            }
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const gb = carve.take<float>(mul.converts() ? kTileTokens * sd : 0);  // (tile, S*D_out) converted grad_y
            float* const dhg = carve.take<float>(kTileTokens * ldg);                  // (tile, S x R padded) dL/d(m h)
            float* const dhf = carve.take<float>(kTileTokens * sr);                   // (tile, S*R) dh
            float* const tt = carve.take<float>(kTileTokens * sr);                    // (S*R, tile) dh^T or (m h)^T
            char* const dho = carve.take<char>(kTileTokens * sr * dtype_size(ot));    // (tile, S*R) dh as operands
            const void** const grow = carve.take<const void*>(kTileTokens);
            const void** const arow = carve.take<const void*>(kTileTokens);
            void** const crow = carve.take<void*>(kTileTokens);
            float* const cb = carve.take<float>(wrows * wb.width);                    // (rows, width) fp32 accumulator
            float* const rp = carve.take<float>(wb.chunk * wb.width);                 // packed chunk of x or grad_y rows
            float* const col = carve.take<float>(rank);                               // one dB row before conversion
            const void** const wa = carve.take<const void*>(wrows);
            void** const wc = carve.take<void*>(wrows);
#pragma omp for schedule(dynamic)
            for (size_t t = 0; t < tiles.size(); ++t) {
                const Tile& tile = tiles[t];
                const int64_t* tok = g.perm.data() + tile.lo;
                const int64_t m = tile.hi - tile.lo, j = packed ? tile.expert : g.slot[tile.expert];
                prefetch_rows(grad_y, dt, sd, 0, sd, tok, m, false);
                if (dx) prefetch_rows(dx, dt, d_in, 0, d_in, tok, m, true);
                input_rows(mul, grad_y, sd, 0, sd, tok, m, gb, grow);
                for (int64_t s = 0; s < n_slice; ++s) {
                    for (int64_t r = 0; r < m; ++r) {
                        arow[r] = at(grow[r], s * d_out, ot);
                        crow[r] = dhg + r * ldg + s * pr.width;
                    }
                    mul.gemm(m, rank, d_out, arow, bpack + (j * n_slice + s) * d_out * pr.width, pr.nv, crow, kF32, 0);
                }
                for (int64_t r = 0; r < m; ++r) {
                    const float* hr = h + tok[r] * sr;
                    const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                    float dot = 0.0f;
                    for (int64_t s = 0; s < n_slice; ++s) {
                        const float* v = dhg + r * ldg + s * pr.width;
                        for (int64_t q = 0; q < rank; ++q) dhf[r * sr + s * rank + q] = v[q] * mult;
                        if (dgate)  // a serial sum: skipped when the gate needs no gradient
                            for (int64_t q = 0; q < rank; ++q) dot += v[q] * hr[s * rank + q];
                    }
                    if (dgate) dgate[tok[r]] = dot * float(scale);
                    mul.store(dhf + r * sr, at(dho, r * sr, ot), sr);
                }
                if (need_rows && !mul.pairs) {  // fp32: the tile's dh and m h as rows [lo, hi) of dh_t and hm_t
                    memcpy(reinterpret_cast<float*>(dh_t) + tile.lo * sr, dhf, m * sr * sizeof(float));
                    for (int64_t r = 0; r < m; ++r) {
                        const float* hr = h + tok[r] * sr;
                        const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                        float* out = reinterpret_cast<float*>(hm_t) + (tile.lo + r) * sr;
                        for (int64_t c = 0; c < sr; ++c) out[c] = hr[c] * mult;
                    }
                } else if (need_rows) {  // pair operands: transpose into columns [lo, hi) of dh_t and hm_t
                    for (int64_t c = 0; c < sr; ++c)
                        for (int64_t r = 0; r < m; ++r) tt[c * m + r] = dhf[r * sr + c];
                    for (int64_t c = 0; c < sr; ++c) mul.store(tt + c * m, at(dh_t, c * n + tile.lo, ot), m);
                    for (int64_t r = 0; r < m; ++r) {
                        const float* hr = h + tok[r] * sr;
                        const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                        for (int64_t c = 0; c < sr; ++c) tt[c * m + r] = hr[c] * mult;
                    }
                    for (int64_t c = 0; c < sr; ++c) mul.store(tt + c * m, at(hm_t, c * n + tile.lo, ot), m);
                }
                if (dx) {
                    for (int64_t r = 0; r < m; ++r) arow[r] = at(dho, r * sr, ot);
                    gemm_to_rows(mul, m, d_in, sr, arow, apack + j * sr * pd.width, pd, crow, tok, dx, d_in, 0);
                }
            }
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < w_tasks; ++task)
                wgrad_task(mul, task, &rows_src, 1, d_in, n_slice, rank, d_out, wb, pw, chunk, {cb, rp, col, wa, wc}, da, db);
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}

// dA and dB of several tp_routed_lora_bwd calls with the same weights (the T steps of a recursion), reduced in one
// pass per expert over all their tokens: table holds, per call, (x, grad_y, idx, dh_rows, hm_rows, n) as that
// call's arguments and kept rows. Sums in call order; fp32 operands only (not the bf16 dot-product path).
TP_EXPORT int tp_routed_lora_wgrad(int64_t calls, const int64_t* table, int dt, int64_t d_in, int64_t n_exp,
                                   int64_t n_slice, int64_t rank, int64_t d_out, void* da, void* db, int threads) {
    const Mul mul(*kernels(), dt);
    if (mul.pairs) return kBadArgument;
    const int64_t sr = n_slice * rank, wrows = sr > rank ? sr : rank;
    const WgradBlocks wb = wgrad_blocks(wrows, d_in, d_out, n_slice, n_exp, threads);
    const Panels pw = panels_for(mul.kn, wb.width);
    try {
        std::vector<Grouping> groups(calls);
        std::vector<WgradRows> src(calls);
        for (int64_t c = 0; c < calls; ++c) {
            const int64_t* row = table + 6 * c;
            if (!group_by_expert(reinterpret_cast<const int64_t*>(row[2]), row[5], n_exp, groups[c])) return kBadIndex;
            src[c] = {reinterpret_cast<const void*>(row[0]), reinterpret_cast<const void*>(row[1]), &groups[c],
                      reinterpret_cast<const char*>(row[3]), reinterpret_cast<const char*>(row[4]), row[5]};
        }
        const int64_t a_blocks = (d_in + wb.width - 1) / wb.width, b_blocks = (d_out + wb.width - 1) / wb.width;
        const int64_t w_tasks = n_exp * (a_blocks + n_slice * b_blocks);
        const int64_t per_thread = piece(wrows * wb.width, 4) + piece(wb.chunk * wb.width, 4) + piece(rank, 4) +
                                   2 * piece(wrows, sizeof(void*));
        Workspace ws;
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
#pragma omp parallel num_threads(threads)
        {
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const cb = carve.take<float>(wrows * wb.width);
            float* const rp = carve.take<float>(wb.chunk * wb.width);
            float* const col = carve.take<float>(rank);
            const void** const wa = carve.take<const void*>(wrows);
            void** const wc = carve.take<void*>(wrows);
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < w_tasks; ++task)
                wgrad_task(mul, task, src.data(), calls, d_in, n_slice, rank, d_out, wb, pw, wb.chunk,
                           {cb, rp, col, wa, wc}, da, db);
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}
