"""FLOP and byte counts for the benchmarked work, and the predicted time ratios they imply.

Counts are of the useful work (a multiply-add is 2 FLOPs); bytes are the minimum
traffic (each input read once, each output written once). A benchmark's floor
and the model-level predictions come from here, never from a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)

    __rmul__ = __mul__


def linear(tokens: int, d_in: int, d_out: int, elem: int, *, bias: bool = True) -> Cost:
    """y = x W^T (+ b): read x and W, write y."""
    flops = 2 * tokens * d_in * d_out + (tokens * d_out if bias else 0)
    return Cost(flops, elem * (tokens * d_in + d_in * d_out + tokens * d_out))


def elementwise(numel: int, elem: int, *, flops_per: float = 1, reads: int = 1, writes: int = 1) -> Cost:
    return Cost(flops_per * numel, elem * numel * (reads + writes))


def routed_lora(tokens: int, d_in: int, d_out: int, rank: int, experts: int, elem: int,
                *, slices: int = 1, backward: bool = False) -> Cost:
    """Per-token routed LoRA: shrink (2 N D_in S R) + expand (2 N S R D_out) FLOPs.

    The backward computes dH = dY B, dX = dH A, dB = dY^T H, dA = dH^T X: twice the forward's FLOPs.
    Bytes: x, y, the weights and the indices; the backward adds dY, x again, dX and the weight grads.
    """
    flops = 2 * tokens * slices * rank * (d_in + d_out)
    weights = experts * slices * rank * (d_in + d_out) * elem
    acts = tokens * (d_in + slices * d_out) * elem
    nbytes = acts + weights + 8 * tokens
    if backward:
        flops *= 3
        nbytes += acts + tokens * d_in * elem + 2 * weights + 8 * tokens
    return Cost(flops, nbytes)


def gate_top1(tokens: int, experts: int, elem: int) -> Cost:
    """Noise add, scale, softmax (max, exp, sum, divide), argmax: ~8 FLOPs per logit.

    Reads logits and noise, writes idx (int64), the gate (fp32) and the probabilities kept for backward (fp32).
    """
    n = tokens * experts
    return Cost(8 * n, elem * n + 4 * n + 8 * tokens + 4 * tokens + 4 * n)


def refine_step(tokens: int, dim: int, rank: int, experts: int, elem: int, *, slices: int = 3, base: bool = True,
                backward: bool = False) -> Cost:
    """One recursive refinement step (tp_kernels.refine_step): LayerNorm (7 FLOPs per element), the gate's token
    logits (2 N D E) and top-1 (gate_top1), the routed LoRA over ``slices`` projections of width ``dim``, and the
    base add (N S D) at the final step.

    Bytes: the fused minimum -- the state read once, the qkv written once, the base read once, the weights,
    the conditioning rows and noise, and the gate's outputs; LN(state) is never stored. The backward reads
    grad_qkv and the state again, writes d state and the weight grads, and recomputes LN (twice the FLOPs
    of the forward's matmuls plus one LN, as routed_lora counts).
    """
    n = tokens
    lora = routed_lora(n, dim, dim, rank, experts, elem, slices=slices)
    flops = 7 * n * dim + 2 * n * dim * experts + gate_top1(n, experts, elem).flops + lora.flops
    flops += n * slices * dim if base else 0
    weights = experts * slices * rank * 2 * dim * elem + experts * dim * elem
    acts = n * dim * elem + n * slices * dim * elem * (2 if base else 1)
    gate_bytes = 4 * n * experts * 2 + 8 * n + 4 * n  # noise read, probs written, idx, weight
    nbytes = acts + weights + gate_bytes
    if backward:
        flops = 3 * flops + 7 * n * dim
        nbytes += n * slices * dim * elem + 2 * n * dim * elem + 2 * weights + 4 * n * experts
    return Cost(flops, nbytes)


def softmax(tokens: int, experts: int, elem: int) -> Cost:
    n = tokens * experts
    return Cost(5 * n, 2 * elem * n)


def gemm(n: int) -> Cost:
    return Cost(2 * n**3, 0)


def layer_norm(tokens: int, dim: int, elem: int) -> Cost:
    return elementwise(tokens * dim, elem, flops_per=7)


def sdpa(batch: int, seq: int, dim: int, heads: int, elem: int, kv_seq: int = None) -> Cost:
    """softmax(Q K^T / sqrt(d)) V over the heads: two (seq x kv_seq) GEMMs per head, softmax, head split/merge
    copies. kv_seq: the keys' length when it is not seq (a joint attention's vision queries over [vision; text])."""
    kv = seq if kv_seq is None else kv_seq
    flops = 4 * batch * seq * kv * dim + 5 * batch * heads * seq * kv
    return Cost(flops, elem * batch * dim * (seq + 2 * kv + seq + 2 * seq))  # read q, k, v; write out; merge heads


def attention_costs(batch: int, seq: int, dim: int, heads: int, elem: int, recursion=None) -> list:
    """(name, Cost) components of one attention forward: DiT's Attention, or a RecursiveAttention when
    ``recursion`` (anything with experts, steps, rank) is given, following RecursiveAttention.forward:

        per step t = 1..T: LN(a), gate logits (Linear D -> M) + gate_top1, routed LoRA (qkv, S = 3), attention
        steps < T: residual a = out + x;   step T: base qkv projection of x, added to the LoRA's
        then the output projection.
    """
    n = batch * seq
    parts = [("qkv", linear(n, dim, 3 * dim, elem)), ("proj", linear(n, dim, dim, elem))]
    if recursion is None:
        return parts + [("attention", sdpa(batch, seq, dim, heads, elem))]
    steps, experts = recursion.steps, recursion.experts
    parts += [
        ("base qkv add", elementwise(3 * n * dim, elem, reads=2)),
        ("layer norm", steps * layer_norm(n, dim, elem)),
        ("gate logits", steps * linear(n, dim, experts, elem)),
        ("gate_top1", steps * gate_top1(n, experts, elem)),
        ("routed lora", steps * routed_lora(n, dim, dim, recursion.rank, experts, elem, slices=3)),
        ("attention", steps * sdpa(batch, seq, dim, heads, elem)),
        ("residual", (steps - 1) * elementwise(n * dim, elem, reads=2)),
    ]
    return parts


def dit_costs(config, batch: int, elem: int, recursion=None) -> list:
    """(name, Cost) components of one DiT / ThinkingPixelDiT forward (``config``: a DiTConfig).

    Per block: adaLN (SiLU + Linear D -> 6D on the conditioning), 2 LayerNorms, 2 modulates and 2 gated
    residuals, the attention (recursive in the blocks ``recursion.resolve_layers(depth)`` names), the MLP
    (Linear D -> rD, tanh-GELU, Linear rD -> D). Plus patch embedding, timestep/label embedders, final layer.
    """
    d, seq = config.hidden_size, config.num_patches
    n = batch * seq
    patch_in = config.in_channels * config.patch_size**2
    hidden = int(d * config.mlp_ratio)
    recursive = set(recursion.resolve_layers(config.depth)) if recursion is not None else set()
    parts = [
        ("embed", linear(n, patch_in, d, elem) + linear(batch, 256, d, elem) + linear(batch, d, d, elem)),
        ("final layer", linear(batch, d, 2 * d, elem) + layer_norm(n, d, elem)
         + elementwise(n * d, elem, flops_per=2, reads=2)
         + linear(n, d, patch_in * config.out_channels // config.in_channels, elem)),
    ]
    for i in range(config.depth):
        block = [
            ("adaLN", linear(batch, d, 6 * d, elem)),
            ("norm + modulate + residual", 2 * (layer_norm(n, d, elem) + elementwise(n * d, elem, flops_per=2, reads=2)
                                               + elementwise(n * d, elem, flops_per=2, reads=2))),
            ("mlp", linear(n, d, hidden, elem) + elementwise(n * hidden, elem, flops_per=10)
             + linear(n, hidden, d, elem)),
        ]
        attn = attention_costs(batch, seq, d, config.num_heads, elem, recursion if i in recursive else None)
        parts += block + attn
    return parts


def mmdit_costs(batch: int, seq: int, ctx: int, dim: int, heads: int, depth: int, elem: int, *, patch_in: int,
                patch_out: int, joint_dim: int, pooled_dim: int, mlp_ratio: float = 4.0) -> list:
    """(name, Cost) components of one forward of diffusers' SD3Transformer2DModel (MMDiT).

    Per JointTransformerBlock: each stream's adaLN (Linear D -> 6D; the last block's text stream: D -> 2D),
    LayerNorm + modulate twice and gated residuals, Q/K/V (Linear D -> 3D), the output projection and the MLP
    (D -> rD -> D, tanh-GELU); one joint attention over the seq + ctx tokens. Each stream's Q/K/V projection is
    a part of its own ("vision qkv", "text qkv"), the rest of the stream another ("vision stream", "text stream"). The last block is context_pre_only:
    no text output projection or MLP (diffusers still computes the text queries and rows of the attention).
    Plus patch embedding, the timestep / pooled-text / caption embedders, the final adaLN and projection.
    """
    n, nc, hidden = batch * seq, batch * ctx, int(dim * mlp_ratio)

    def stream(tokens, pre_only=False):  # everything but the Q/K/V projection (its own part)
        mod = linear(batch, dim, (2 if pre_only else 6) * dim, elem)
        norm = layer_norm(tokens, dim, elem) + elementwise(tokens * dim, elem, flops_per=2, reads=2)
        out = mod + norm
        if not pre_only:
            out = out + linear(tokens, dim, dim, elem) + norm + 2 * elementwise(tokens * dim, elem, flops_per=2,
                                                                                reads=2)
            out = out + linear(tokens, dim, hidden, elem) + elementwise(tokens * hidden, elem, flops_per=10) \
                + linear(tokens, hidden, dim, elem)
        return out

    parts = [
        ("embed", linear(n, patch_in, dim, elem) + linear(batch, 256, dim, elem) + linear(batch, dim, dim, elem)
         + linear(batch, pooled_dim, dim, elem) + linear(batch, dim, dim, elem) + linear(nc, joint_dim, dim, elem)),
        ("final layer", linear(batch, dim, 2 * dim, elem) + layer_norm(n, dim, elem)
         + elementwise(n * dim, elem, flops_per=2, reads=2) + linear(n, dim, patch_out, elem)),
    ]
    for i in range(depth):
        last = i == depth - 1
        parts += [("vision qkv", linear(n, dim, 3 * dim, elem)), ("vision stream", stream(n)),
                  ("text qkv", linear(nc, dim, 3 * dim, elem)), ("text stream", stream(nc, pre_only=last)),
                  ("joint attention", sdpa(batch, seq + ctx, dim, heads, elem))]
    return parts


def recursion_costs(batch: int, seq: int, dim: int, heads: int, elem: int, recursion, *, ctx: int = 0,
                    experts_impl: str = "ours") -> list:
    """(name, Cost) of what the recursion adds to one recursive block's forward (LatentRecursion.recurse), on top of
    the base attention (whose Q/K/V projection, last-step attention and output projection the base already pays).

    Per step t = 1..T: LayerNorm of the state, the gate's token logits (D -> M) and top-1, the experts' Q/K/V LoRA;
    steps < T: an attention of the vision queries over the [vision; text] keys (ctx text tokens) and the residual;
    step T: the base added to the LoRA output. experts_impl: "ours" and "masked" run each token's expert only;
    "dense" runs all M experts on every token and mixes them with the one-hot gate (M weighted adds).
    """
    n, steps, m = batch * seq, recursion.steps, recursion.experts
    lora = routed_lora(n, dim, dim, recursion.rank, m, elem, slices=3)
    parts = [
        ("layer norm", steps * layer_norm(n, dim, elem)),
        ("gate", steps * (linear(n, dim, m, elem) + gate_top1(n, m, elem))),
        ("experts", steps * (m if experts_impl == "dense" else 1) * lora),
        ("base add", elementwise(3 * n * dim, elem, reads=2)),
        ("attention", (steps - 1) * sdpa(batch, seq, dim, heads, elem, kv_seq=seq + ctx)),
        ("residual", (steps - 1) * elementwise(n * dim, elem, reads=2)),
    ]
    if experts_impl == "dense":
        parts.append(("one-hot mix", steps * m * elementwise(3 * n * dim, elem, flops_per=2, reads=2)))
    return parts


def recursion_parameters(dim: int, recursion, cond_dim: int = None) -> int:
    """Trainable parameters of one recursive layer: the experts' A and B (Q, K, V) and the gate's two Linears."""
    cond_dim = dim if cond_dim is None else cond_dim
    return 2 * recursion.experts * 3 * recursion.rank * dim + recursion.experts * (dim + cond_dim + 2)


# Backward cost over forward cost of attention: the scores Q K^T recomputed (flash attention, torch's CPU kernel
# and tp_kernels.joint_attention keep only each row's logsumexp), then dV, dP, dQ and dK: five GEMMs for the
# forward's two, as torch.utils.flop_counter counts sdpa's backward.
ATTENTION_BACKWARD = 2.5
ATTENTION_PARTS = ("attention", "joint attention")

# Backward cost over forward cost of a frozen model's components, when the gradient must still flow through
# them to trainable parts inside: a Linear computes dX only (1x, no dW); attention as when trained (it has no
# weights); the embedders and the adaLN modulation read no input that needs a gradient (0x).
FROZEN_BACKWARD = {"embed": 0, "adaLN": 0, **{name: ATTENTION_BACKWARD for name in ATTENTION_PARTS}}


def frozen_backward(name: str) -> float:
    return FROZEN_BACKWARD.get(name, 1)


def qkv_leaf_backward(forward_parts: list) -> list:
    """("bwd <name>", Cost) of the backward autograd runs through a frozen model whose blocks' (vision) Q/K/V
    outputs are the only tensors needing a gradient (the fine-tuning benchmark's base; dit_costs or mmdit_costs
    parts): :func:`frozen_backward` of each part, except the Q/K/V projections. Those outputs are leaves, so no
    vision Q/K/V projection runs a backward; nor does the first block's text Q/K/V (its input, the caption
    embedder's output, needs no gradient); later blocks' text Q/K/V do (the last block's too: it discards its text
    rows of the attention output, but the attention's backward still gives its text queries a gradient, of
    zeros). The LayerNorms before the Q/K/V
    projections are counted in full (< 0.1% of the FLOPs)."""
    out, first_text = [], True
    for name, cost in forward_parts:
        factor = frozen_backward(name)
        if name in ("qkv", "vision qkv"):
            factor = 0
        elif name == "text qkv":
            factor, first_text = (0 if first_text else factor), False
        if factor:
            out.append((f"bwd {name}", factor * cost))
    return out


def trained_backward(name: str) -> float:
    return ATTENTION_BACKWARD if name in ATTENTION_PARTS else 2


def train_step_costs(forward_parts: list, num_params: int, backward=trained_backward) -> list:
    """A training step: the forward, a backward at ``backward(name)`` times each component's forward cost (default
    :func:`trained_backward`: 2 for dX and dW GEMMs, ATTENTION_BACKWARD for attention; :func:`frozen_backward` for
    a frozen base), and AdamW over
    ``num_params`` fp32 parameters (~12 FLOPs; reads param, grad, two moments and writes param and moments:
    28 bytes)."""
    return ([(f"fwd {name}", c) for name, c in forward_parts]
            + [(f"bwd {name}", backward(name) * c) for name, c in forward_parts if backward(name)]
            + [("adamw", Cost(12 * num_params, 28 * num_params))])


def total(parts: list) -> Cost:
    out = Cost(0, 0)
    for _, c in parts:
        out = out + c
    return out


def roofline_seconds(parts: list, peak_flops: float, bandwidth: float) -> float:
    """Sum over components of each one's roofline time max(flops / peak, bytes / bandwidth)."""
    return sum(max(c.flops / peak_flops, c.bytes / bandwidth) for _, c in parts)


def predicted_ratio(parts_new: list, parts_base: list, peak_flops: float = None, bandwidth: float = None) -> float:
    """Predicted time of ``parts_new`` over ``parts_base``: the FLOP ratio, or with peak_flops and bandwidth
    given, the ratio of per-component roofline times (the bytes term)."""
    if peak_flops is None:
        return total(parts_new).flops / total(parts_base).flops
    return roofline_seconds(parts_new, peak_flops, bandwidth) / roofline_seconds(parts_base, peak_flops, bandwidth)


# NVIDIA H100 SXM datasheet peaks (dense): HBM3 bandwidth, and tensor-core / SIMT FLOP/s by input precision.
H100_BANDWIDTH = 3.35e12
H100_PEAK_FLOPS = {"native": 989.4e12, "tf32": 494.7e12, "tf32x3": 494.7e12 / 3, "ieee": 66.9e12, "-": 66.9e12}


def triton_kernel_cost(role: str, tokens: int, d_in: int, d_out: int, rank: int, experts: int, slices: int,
                       elem: int) -> Cost:
    """FLOPs and minimum bytes of one tp_kernels Triton kernel (roles as tp_kernels._aot names them).

    The forward saves h = A_e x (fp32); the backward's dh (fp32) feeds dX and dA; gate multipliers are per token.
    """
    n, s, r = tokens, slices, rank
    h = 4 * n * s * r  # an (N, S*R) fp32 intermediate
    x, y = n * d_in * elem, n * s * d_out * elem
    wa, wb = experts * s * r * d_in * elem, experts * s * d_out * r * elem
    index = 8 * n + 8 * (experts + 1)  # permutation and offsets
    bins = experts + 2  # the counting sort's: skipped, each expert, out of range
    costs = {
        # the counting sort: a one-hot compare per token and bin, its scan; reads the indices, writes the grouping
        "routed_lora.group": Cost(2 * 2 * n * bins, 2 * 8 * n + index),
        "routed_lora.group_count": Cost(2 * n * bins, 8 * n + 4 * n // 1024 * bins),
        "routed_lora.group_scatter": Cost(2 * n * bins, 8 * n + 4 * n // 1024 * bins + index),
        "routed_lora.fwd": Cost(2 * n * s * r * (d_in + d_out), x + y + wa + wb + h + index + n * elem),
        "routed_lora.bwd_dh": Cost(2 * n * s * d_out * r, y + wb + 2 * h + index + 4 * n * s),
        "routed_lora.bwd_dx": Cost(2 * n * s * r * d_in, h + wa + x + index),
        # dA = sum dh x^T and dB = sum dy (m h)^T in one kernel, over each expert's sorted rows, no partials
        "routed_lora.bwd_dW": Cost(2 * n * s * r * (d_in + d_out), 2 * h + x + y + wa + wb + index),
        "gate_top1.fwd": gate_top1(n, experts, elem),
        # the refinement step (tp_kernels/refine_step/triton.py), compiled with noise, conditioning and the base
        "refine_step.stats_gate": Cost(n * d_in * (7 + 2 * experts) + 8 * n * experts,
                                  x + experts * d_in * elem + 4 * n * experts * 3 + 8 * n + 4 * n * 3),
        "refine_step.fwd": Cost(2 * n * s * r * (d_in + d_out) + n * s * d_out,
                           x + 2 * y + wa + wb + h + index + 8 * n),
        # gate gradient (~6 per logit), d logits W and d logits^T LN(a) (2 N E D each) and the LN backward (~8 per
        # element); reads the LoRA's d LN(a) and the state, writes d state, d logits and d token_weight's
        # per-block parts (fp32, one (E, D) per 32 tokens)
        "refine_step.bwd_gate_ln": Cost(6 * n * experts + 4 * n * experts * d_in + 8 * n * d_in,
                                   3 * x + experts * d_in * elem + 4 * n * experts * 2 + 8 * n + 4 * n * 3
                                   + 4 * experts * d_in * -(-n // 32)),
        # routed_lora.bwd_dW with LN(x) normalised as loaded (reads the statistics) and a unit gate
        "refine_step.bwd_dW": Cost(2 * n * s * r * (d_in + d_out) + 2 * n * d_in,
                              2 * h + x + y + wa + wb + index + 8 * n),
    }
    if role not in costs:
        raise ValueError(f"unknown kernel role {role!r}; expected one of {sorted(costs)}")
    return costs[role]


def h100_roofline_seconds(cost: Cost, precision: str) -> float:
    """Roofline time on an H100 for a kernel whose tl.dot runs at ``precision`` (tp_kernels._aot's field)."""
    if precision not in H100_PEAK_FLOPS:
        raise ValueError(f"unknown tl.dot precision {precision!r}; expected one of {sorted(H100_PEAK_FLOPS)}")
    return max(cost.flops / H100_PEAK_FLOPS[precision], cost.bytes / H100_BANDWIDTH)
