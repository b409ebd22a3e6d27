// Routed LoRA forward and backward on CPU.
//
// Tokens are grouped by expert with a counting sort (O(N), stable). The forward runs over tiles of up
// to kTileTokens tokens of one expert: the tile's rows of x are read in place (fp32) or converted into a
// cache-resident fp32 buffer (bf16), shrunk (tile x S*R) against the packed A_e, scaled by gate * scale
// on the rank-R side, expanded, and each output row is written once at its token's position. The backward does the same per tile for dx and dgate; dA and
// dB are per-expert reductions over that expert's tokens in a fixed order, parallel over experts x output
// column blocks. Every output element is computed by exactly one task in a fixed order, so results do not
// depend on the thread count or the schedule.
//
// Layouts (row-major): x (N, D_in), idx (N,), a (E, S, R, D_in), b (E, S, D_out, R), gate (N,) fp32 or
// null, y (N, S * D_out), h (N, S * R) fp32 = A_e x unscaled. x, a, b, y, grad_y, dx, da, db share dt.
#include <string.h>

#include <vector>

#include "common.h"
#include "kernels.h"

namespace tp {
namespace {

constexpr int64_t kTileTokens = 96;   // tokens per forward/backward tile
constexpr int64_t kColBlock = 128;    // bf16 output columns staged per gemm call (a multiple of every panel width)
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
    std::vector<int64_t> perm;     // token ids, grouped by expert, in token order within an expert
    std::vector<int64_t> offsets;  // (E + 1,) expert e owns perm[offsets[e]:offsets[e + 1]]
    std::vector<int64_t> active;   // experts with at least one token
    std::vector<int64_t> slot;     // (E,) position of an expert in `active`, or -1
};

bool group_by_expert(const int64_t* idx, int64_t n, int64_t n_exp, Grouping& g) {
    g.offsets.assign(n_exp + 1, 0);
    for (int64_t i = 0; i < n; ++i) {
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
    g.perm.resize(n);
    for (int64_t i = 0; i < n; ++i) g.perm[next[idx[i]]++] = i;
    return true;
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

// Row pointers to columns [col0, col0 + cols) of the tile's rows of src (N, ld): fp32 rows are read in
// place, bf16 rows are converted into buf (tile, cols) first.
void input_rows(const Kernels& kn, const void* src, int dt, int64_t ld, int64_t col0, int64_t cols,
                const int64_t* tok, int64_t m, float* buf, const float** rows) {
    for (int64_t r = 0; r < m; ++r) {
        if (dt == kF32) {
            rows[r] = static_cast<const float*>(src) + tok[r] * ld + col0;
        } else {
            kn.to_f32(at(src, tok[r] * ld + col0, dt), dt, buf + r * cols, cols);
            rows[r] = buf + r * cols;
        }
    }
}

// out[tok[r], col0 : col0 + n] = a (m x k, row pointers) @ packed b. fp32 rows are written in place;
// bf16 goes through an fp32 staging block of kColBlock columns. Each output element is written once.
void gemm_to_rows(const Kernels& kn, int64_t m, int64_t n, int64_t k, const float* const* a, const float* bp,
                  Panels pb, float* stage, float** crow, const int64_t* tok, void* out, int64_t ld_out, int64_t col0,
                  int dt) {
    if (dt == kF32) {
        for (int64_t r = 0; r < m; ++r) crow[r] = static_cast<float*>(out) + tok[r] * ld_out + col0;
        kn.gemm(m, n, k, a, 1, bp, pb.nv, crow, 0);
        return;
    }
    for (int64_t r = 0; r < m; ++r) crow[r] = stage + r * kColBlock;
    for (int64_t c0 = 0; c0 < n; c0 += kColBlock) {
        const int64_t cols = n - c0 < kColBlock ? n - c0 : kColBlock;
        kn.gemm(m, cols, k, a, 1, bp + c0 * k, pb.nv, crow, 0);
        for (int64_t r = 0; r < m; ++r) kn.from_f32(crow[r], at(out, tok[r] * ld_out + col0 + c0, dt), dt, cols);
    }
}

}  // namespace
}  // namespace tp

using namespace tp;

TP_EXPORT int tp_routed_lora_fwd(const void* x, const int64_t* idx, const void* a, const void* b, const float* gate,
                                 int dt, int64_t n, int64_t d_in, int64_t n_exp, int64_t n_slice, int64_t rank,
                                 int64_t d_out, double scale, void* y, float* h, int threads) {
    const Kernels& kn = *kernels();
    const int64_t sr = n_slice * rank, sd = n_slice * d_out;
    const bool f32 = dt == kF32;
    const Panels pa = panels_for(kn, sr), pb = panels_for(kn, d_out);
    try {
        Grouping g;
        if (!group_by_expert(idx, n, n_exp, g)) return kBadIndex;
        const int64_t na = int64_t(g.active.size());
        const std::vector<Tile> tiles = make_tiles(g);
        const int64_t per_thread = piece(f32 ? 0 : kTileTokens * d_in, 4) + piece(kTileTokens * pa.width, 4) +
                                   piece(f32 ? 0 : kTileTokens * kColBlock, 4) + 2 * piece(kTileTokens, sizeof(float*));
        Workspace ws;
        // packed weights of the experts in use: A_e^T (D_in x S*R) and B_es^T (R x D_out)
        const int64_t o_apack = ws.reserve(piece(na * d_in * pa.width, 4));
        const int64_t o_bpack = ws.reserve(piece(na * n_slice * rank * pb.width, 4));
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
        float* const apack = reinterpret_cast<float*>(base + o_apack);
        float* const bpack = reinterpret_cast<float*>(base + o_bpack);
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(dynamic)
            for (int64_t job = 0; job < na * (1 + n_slice); ++job) {
                const int64_t j = job / (1 + n_slice), s = job % (1 + n_slice) - 1, e = g.active[j];
                if (s < 0)
                    kn.pack(at(a, e * sr * d_in, dt), dt, nullptr, 1, d_in, d_in, sr, pa.nv, apack + j * d_in * pa.width);
                else
                    kn.pack(at(b, (e * n_slice + s) * d_out * rank, dt), dt, nullptr, 1, rank, rank, d_out, pb.nv,
                            bpack + (j * n_slice + s) * rank * pb.width);
            }
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const xt = carve.take<float>(f32 ? 0 : kTileTokens * d_in);  // (tile, D_in) converted x
            float* const hb = carve.take<float>(kTileTokens * pa.width);         // (tile, S*R padded) A_e x
            float* const yb = carve.take<float>(f32 ? 0 : kTileTokens * kColBlock);  // staged output block
            const float** const arow = carve.take<const float*>(kTileTokens);
            float** const crow = carve.take<float*>(kTileTokens);
#pragma omp for schedule(dynamic)
            for (size_t t = 0; t < tiles.size(); ++t) {
                const Tile& tile = tiles[t];
                const int64_t* tok = g.perm.data() + tile.lo;
                const int64_t m = tile.hi - tile.lo, j = g.slot[tile.expert];
                input_rows(kn, x, dt, d_in, 0, d_in, tok, m, xt, arow);
                for (int64_t r = 0; r < m; ++r) crow[r] = hb + r * pa.width;
                kn.gemm(m, sr, d_in, arow, 1, apack + j * d_in * pa.width, pa.nv, crow, 0);
                for (int64_t r = 0; r < m; ++r) {
                    float* hr = hb + r * pa.width;
                    memcpy(h + tok[r] * sr, hr, sr * sizeof(float));
                    const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                    for (int64_t c = 0; c < sr; ++c) hr[c] *= mult;  // gate * scale on the rank-R side
                }
                for (int64_t s = 0; s < n_slice; ++s) {
                    for (int64_t r = 0; r < m; ++r) arow[r] = hb + r * pa.width + s * rank;
                    gemm_to_rows(kn, m, d_out, rank, arow, bpack + (j * n_slice + s) * rank * pb.width, pb, yb, crow,
                                 tok, y, sd, s * d_out, dt);
                }
            }
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}

// Gradients of tp_routed_lora_fwd. dx, da, db, dgate may each be null (not needed); da and db are both
// given or both null. dgate is fp32.
TP_EXPORT int tp_routed_lora_bwd(const void* grad_y, const void* x, const int64_t* idx, const void* a,
                                 const void* b, const float* gate, const float* h, int dt, int64_t n, int64_t d_in,
                                 int64_t n_exp, int64_t n_slice, int64_t rank, int64_t d_out, double scale, void* dx,
                                 void* da, void* db, float* dgate, int threads) {
    const Kernels& kn = *kernels();
    const int64_t sr = n_slice * rank, sd = n_slice * d_out, wrows = sr > rank ? sr : rank;
    const bool f32 = dt == kF32, need_w = da != nullptr;
    const Panels pr = panels_for(kn, rank), pd = panels_for(kn, d_in);
    const WgradBlocks wb = wgrad_blocks(wrows, d_in, d_out, n_slice, n_exp, threads);
    const Panels pw = panels_for(kn, wb.width);
    try {
        Grouping g;
        if (!group_by_expert(idx, n, n_exp, g)) return kBadIndex;
        const int64_t na = int64_t(g.active.size());
        const std::vector<Tile> tiles = make_tiles(g);
        // weight-gradient tasks: per expert, column blocks of dA (D_in) then of each dB slice (D_out)
        const int64_t a_blocks = (d_in + wb.width - 1) / wb.width, b_blocks = (d_out + wb.width - 1) / wb.width;
        const int64_t w_tasks = need_w ? n_exp * (a_blocks + n_slice * b_blocks) : 0;
        const int64_t ldg = n_slice * pr.width;
        const int64_t per_thread =
            piece(f32 ? 0 : kTileTokens * sd, 4) + piece(kTileTokens * ldg, 4) + piece(kTileTokens * sr, 4) +
            piece(f32 ? 0 : kTileTokens * kColBlock, 4) + 3 * piece(kTileTokens, sizeof(float*)) +
            piece(wrows * wb.width, 4) + piece(wb.chunk * wb.width, 4) + piece(rank, 4) +
            2 * piece(wrows, sizeof(float*));
        Workspace ws;
        // packed weights: B_es (D_out x R) and, for dx, A_e (S*R x D_in)
        const int64_t o_bpack = ws.reserve(piece(na * n_slice * d_out * pr.width, 4));
        const int64_t o_apack = ws.reserve(piece(dx ? na * sr * pd.width : 0, 4));
        // per token in grouped order, for the weight gradients: dh = m * dL/d(m h) and m * h (m = gate * scale)
        const int64_t o_dh = ws.reserve(piece(need_w ? n * sr : 0, 4)), o_hm = ws.reserve(piece(need_w ? n * sr : 0, 4));
        const int64_t o_thread = ws.reserve(threads * per_thread);
        char* const base = ws.commit();
        float *const bpack = reinterpret_cast<float*>(base + o_bpack), *const apack = reinterpret_cast<float*>(base + o_apack);
        float *const dh_g = reinterpret_cast<float*>(base + o_dh), *const hm_g = reinterpret_cast<float*>(base + o_hm);
#pragma omp parallel num_threads(threads)
        {
            const int64_t pack_jobs = na * (n_slice + (dx ? 1 : 0));
#pragma omp for schedule(dynamic)
            for (int64_t job = 0; job < pack_jobs; ++job) {
                const int64_t j = job % na, s = job / na, e = g.active[j];
                if (s < n_slice)
                    kn.pack(at(b, (e * n_slice + s) * d_out * rank, dt), dt, nullptr, rank, 1, d_out, rank, pr.nv,
                            bpack + (j * n_slice + s) * d_out * pr.width);
                else
                    kn.pack(at(a, e * sr * d_in, dt), dt, nullptr, d_in, 1, sr, d_in, pd.nv, apack + j * sr * pd.width);
            }
            Carver carve(base + o_thread + per_thread * thread_id());
            float* const gb = carve.take<float>(f32 ? 0 : kTileTokens * sd);       // (tile, S*D_out) converted grad_y
            float* const dhg = carve.take<float>(kTileTokens * ldg);               // (tile, S x R padded) dL/d(m h)
            float* const dhl = carve.take<float>(kTileTokens * sr);                // (tile, S*R) dh when dh_g is not kept
            float* const xb = carve.take<float>(f32 ? 0 : kTileTokens * kColBlock);  // staged dx block
            const float** const grow = carve.take<const float*>(kTileTokens);
            const float** const arow = carve.take<const float*>(kTileTokens);
            float** const crow = carve.take<float*>(kTileTokens);
            float* const cb = carve.take<float>(wrows * wb.width);                 // (rows, width) fp32 accumulator
            float* const rp = carve.take<float>(wb.chunk * wb.width);              // packed chunk of x or grad_y rows
            float* const col = carve.take<float>(rank);                            // one dB row before conversion
            const float** const wa = carve.take<const float*>(wrows);
            float** const wc = carve.take<float*>(wrows);
#pragma omp for schedule(dynamic)
            for (size_t t = 0; t < tiles.size(); ++t) {
                const Tile& tile = tiles[t];
                const int64_t* tok = g.perm.data() + tile.lo;
                const int64_t m = tile.hi - tile.lo, j = g.slot[tile.expert];
                input_rows(kn, grad_y, dt, sd, 0, sd, tok, m, gb, grow);
                for (int64_t s = 0; s < n_slice; ++s) {
                    for (int64_t r = 0; r < m; ++r) {
                        arow[r] = grow[r] + s * d_out;
                        crow[r] = dhg + r * ldg + s * pr.width;
                    }
                    kn.gemm(m, rank, d_out, arow, 1, bpack + (j * n_slice + s) * d_out * pr.width, pr.nv, crow, 0);
                }
                float* dh = need_w ? dh_g + tile.lo * sr : dhl;  // (tile, S*R)
                for (int64_t r = 0; r < m; ++r) {
                    const float* hr = h + tok[r] * sr;
                    const float mult = float(scale) * (gate ? gate[tok[r]] : 1.0f);
                    float dot = 0.0f;
                    for (int64_t s = 0; s < n_slice; ++s) {
                        for (int64_t q = 0; q < rank; ++q) {
                            const float v = dhg[r * ldg + s * pr.width + q];
                            dot += v * hr[s * rank + q];
                            dh[r * sr + s * rank + q] = v * mult;
                        }
                    }
                    if (dgate) dgate[tok[r]] = dot * float(scale);
                    if (need_w)
                        for (int64_t c = 0; c < sr; ++c) hm_g[(tile.lo + r) * sr + c] = hr[c] * mult;
                }
                if (dx) {
                    for (int64_t r = 0; r < m; ++r) arow[r] = dh + r * sr;
                    gemm_to_rows(kn, m, d_in, sr, arow, apack + j * sr * pd.width, pd, xb, crow, tok, dx, d_in, 0, dt);
                }
            }
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < w_tasks; ++task) {
                const int64_t e = task / (a_blocks + n_slice * b_blocks), sub = task % (a_blocks + n_slice * b_blocks);
                const bool is_a = sub < a_blocks;
                const int64_t s = is_a ? 0 : (sub - a_blocks) / b_blocks;
                const int64_t c0 = (is_a ? sub : (sub - a_blocks) % b_blocks) * wb.width;
                const int64_t width = is_a ? d_in : d_out, cols = width - c0 < wb.width ? width - c0 : wb.width;
                const int64_t rows = is_a ? sr : rank;
                const int64_t lo = g.offsets[e], cnt = g.offsets[e + 1] - lo;
                // dA_e[:, c0:] = dh_e^T x_e[:, c0:]   dB_es^T[:, c0:] = (m h)_es^T grad_y_es[:, c0:]
                const float* lhs = (is_a ? dh_g : hm_g + s * rank) + lo * sr;
                const void* src = is_a ? at(x, c0, dt) : at(grad_y, s * d_out + c0, dt);
                for (int64_t i = 0; i < rows; ++i) wc[i] = cb + i * wb.width;
                for (int64_t k0 = 0; k0 < cnt; k0 += wb.chunk) {
                    const int64_t kc = cnt - k0 < wb.chunk ? cnt - k0 : wb.chunk;
                    kn.pack(src, dt, g.perm.data() + lo + k0, is_a ? d_in : sd, 1, kc, cols, pw.nv, rp);
                    for (int64_t i = 0; i < rows; ++i) wa[i] = lhs + k0 * sr + i;  // column i of the chunk
                    kn.gemm(rows, cols, kc, wa, sr, rp, pw.nv, wc, k0 > 0);
                }
                if (cnt == 0)
                    for (int64_t i = 0; i < rows; ++i) memset(wc[i], 0, cols * sizeof(float));
                if (is_a) {
                    for (int64_t q = 0; q < sr; ++q) kn.from_f32(wc[q], at(da, (e * sr + q) * d_in + c0, dt), dt, cols);
                } else {
                    for (int64_t o = 0; o < cols; ++o) {  // dB is stored (D_out, R): transpose the block
                        for (int64_t q = 0; q < rank; ++q) col[q] = cb[q * wb.width + o];
                        kn.from_f32(col, at(db, ((e * n_slice + s) * d_out + c0 + o) * rank, dt), dt, rank);
                    }
                }
            }
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}
