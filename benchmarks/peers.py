"""The ways other code computes a per-token routed LoRA, written as plain torch.

Each function computes ``y[n] = scale * B_e (A_e x[n])`` with ``e = idx[n]`` from
the same arguments as :func:`tp_kernels.routed_lora` (x (N, D_in), idx (N,),
lora_a (E, R, D_in), lora_b (E, D_out, R)), the way a family of public code
does it, so the benchmarks can time them on identical inputs. All are
differentiable in x, lora_a and lora_b. They are re-implementations of the
patterns, not copies of those projects' code.

``peft_mixed_batch`` and ``unrouted_lora`` solve easier problems (one expert per
sample; no routing at all) and say so: they bound what routing may cost.
"""

from __future__ import annotations

import torch


def dense_mixture(x, idx, lora_a, lora_b, scale=1.0):
    """(a) Every expert on every token, then a one-hot weighted sum (X-LoRA / dense mixture-of-LoRA style).

    E times the useful FLOPs, plus an (N, E, D_out) temporary.
    """
    h = torch.einsum("nd,erd->ner", x, lora_a)  # (N, E, R)
    y_all = torch.einsum("ner,eor->neo", h, lora_b)  # (N, E, D_out)
    weights = torch.nn.functional.one_hot(idx, lora_a.shape[0]).to(x.dtype) * scale  # (N, E)
    return (y_all * weights[:, :, None]).sum(1)  # (N, D_out)


def mask_loop(x, idx, lora_a, lora_b, scale=1.0):
    """(b) A boolean mask per expert: gather, two GEMMs, masked write (HF-MoE / DiT-MoE style).

    Every expert scans all N indices, and each boolean index is a hidden nonzero (a host sync on GPU).
    """
    y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (N, D_out)
    for e in range(lora_a.shape[0]):
        mask = idx == e  # (N,)
        y[mask] = (x[mask] @ lora_a[e].t()) @ lora_b[e].t() * scale
    return y


def sort_scatter(x, idx, lora_a, lora_b, scale=1.0):
    """(c) Sort tokens by expert, read the counts on the host, GEMM per slice, add back (HiDream moe_infer style).

    A stable argsort, ``bincount().tolist()`` (a host sync), a gathered copy of x per expert
    and an in-place index_add into a zeroed output.
    """
    order = torch.argsort(idx, stable=True)  # (N,) token ids grouped by expert
    counts = torch.bincount(idx, minlength=lora_a.shape[0]).tolist()
    y = x.new_zeros(x.shape[0], lora_b.shape[1])  # (N, D_out)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]  # (n,)
        out = (x[rows] @ lora_a[e].t()) @ lora_b[e].t() * scale  # (n, D_out)
        y.index_add_(0, rows, out)
        start += count
    return y


def peft_mixed_batch(x, sample_experts, lora_a, lora_b, scale=1.0):
    """(d) One adapter per SAMPLE (peft's ``adapter_names`` mixed batch): group samples, LoRA per group.

    x (B, L, D_in); sample_experts is a host-side list of B expert ids. This routes whole
    samples, not tokens: an easier problem with no per-token grouping, shown as a reference point.
    """
    y = x.new_zeros(*x.shape[:-1], lora_b.shape[1])  # (B, L, D_out)
    for e in sorted(set(sample_experts)):
        rows = [b for b, s in enumerate(sample_experts) if s == e]
        sub = x[rows]  # (b_e, L, D_in)
        y[rows] = (sub @ lora_a[e].t()) @ lora_b[e].t() * scale
    return y


def unrouted_lora(x, idx, lora_a, lora_b, scale=1.0):
    """(e) One LoRA (expert 0) on every token: the same FLOPs as a routed LoRA with no routing, the floor."""
    return (x @ lora_a[0].t()) @ lora_b[0].t() * scale


def composed_gate_top1(logits, noise, tau):
    """The top-1 Gumbel-softmax gate as composed torch ops: noise, softmax, argmax, straight-through.

    Returns (idx (N,), gate (N,)) with gate == 1 in the forward pass and the gradient of the
    selected soft probability, like :func:`tp_kernels.gate_top1` with ``hard=True``.
    """
    z = logits.float() + noise  # (N, E)
    probs = torch.softmax(z / tau, dim=-1)  # (N, E)
    idx = z.argmax(-1)  # (N,)
    hard = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(probs.dtype)  # (N, E)
    gate = (hard - probs.detach() + probs).gather(-1, idx[:, None])[:, 0]  # (N,)
    return idx, gate


ROUTED_PEERS = {
    "dense_mixture": dense_mixture,
    "mask_loop": mask_loop,
    "sort_scatter": sort_scatter,
    "peft_mixed_batch": peft_mixed_batch,
    "unrouted_lora": unrouted_lora,
}
# Peers that read device data on the host (boolean indexing, .tolist(), host-side lists):
# they cannot be captured in a CUDA graph.
HOST_SYNCING = {"mask_loop", "sort_scatter", "peft_mixed_batch"}
