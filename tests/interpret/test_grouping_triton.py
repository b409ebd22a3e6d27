"""The counting sort's kernels (routed_lora.triton.group_on_device) against its torch reference and a stable argsort:
integer-exact, in one program and in several blocks, with skipped and out-of-range indices."""

import pytest
import torch

from tp_kernels._grouping import counting_sort
from tp_kernels.routed_lora import triton as tk


def argsort_grouping(idx, n_exp):
    """The obvious spec: a stable sort with out-of-range indices moved past every expert."""
    key = torch.where((idx < -1) | (idx >= n_exp), n_exp, idx)
    perm = torch.argsort(key, stable=True)
    # offsets[e]: tokens with key < e, skipped ones included
    return perm, torch.searchsorted(key[perm], torch.arange(-1, n_exp, dtype=key.dtype), right=True)


def cases():
    g = torch.Generator().manual_seed(0)
    yield "balanced", torch.randint(0, 5, (300,), generator=g), 5
    skipped = torch.randint(0, 3, (257,), generator=g)
    skipped[::4] = -1
    yield "skipped", skipped, 3
    yield "one expert", torch.full((130,), 2), 4
    yield "eight experts, some empty", torch.randint(0, 4, (500,), generator=g) * 2, 8
    yield "one expert total", torch.zeros(5, dtype=torch.int64), 1
    yield "no tokens", torch.zeros(0, dtype=torch.int64), 3
    yield "int32", torch.randint(-1, 6, (77,), generator=g).to(torch.int32), 6


@pytest.mark.parametrize("block, inline", [(1024, 8192), (64, 0), (32, 100)], ids=["one program", "blocks", "mixed"])
@pytest.mark.parametrize("name, idx, n_exp", list(cases()), ids=[c[0] for c in cases()])
def test_kernels_equal_the_reference_and_a_stable_sort(monkeypatch, block, inline, name, idx, n_exp):
    monkeypatch.setattr(tk, "GROUP_BLOCK", block)
    monkeypatch.setattr(tk, "GROUP_INLINE", inline)
    ok = torch.zeros(1, dtype=torch.bool)
    perm, offsets = tk.group_on_device(idx, n_exp, ok)
    ref_perm, ref_offsets = counting_sort(idx, n_exp)
    spec_perm, spec_offsets = argsort_grouping(idx.long(), n_exp)
    assert torch.equal(perm, ref_perm) and torch.equal(perm, spec_perm)
    assert torch.equal(offsets, ref_offsets) and torch.equal(offsets, spec_offsets)
    assert perm.dtype == offsets.dtype == torch.int64 and bool(ok)


@pytest.mark.parametrize("block, inline", [(1024, 8192), (16, 0)], ids=["one program", "blocks"])
def test_out_of_range_indices_sort_last_and_clear_the_flag(monkeypatch, block, inline):
    monkeypatch.setattr(tk, "GROUP_BLOCK", block)
    monkeypatch.setattr(tk, "GROUP_INLINE", inline)
    idx = torch.tensor([0, 7, 1, -1, -5, 2, 1, 3, 0, 9])
    ok = torch.ones(1, dtype=torch.bool)
    perm, offsets = tk.group_on_device(idx, 3, ok)
    assert perm.tolist() == [3, 0, 8, 2, 6, 5, 1, 4, 7, 9] and offsets.tolist() == [1, 3, 5, 6]
    assert torch.equal(perm, counting_sort(idx, 3)[0]) and not bool(ok)
