"""Token grouping (tp_kernels._grouping): the counting sort equals the CPU path's stable argsort, and off CPU it
reads nothing back and keeps its shapes fixed (fake CUDA tensors: a host read or a data-dependent shape raises)."""

import pytest
import torch

from tp_kernels._grouping import counting_sort, group_by_expert
from tp_kernels._work_items import count_work_items, fake_cuda


@pytest.mark.parametrize("n_tok, n_exp", [(0, 3), (1, 1), (57, 3), (300, 5), (1000, 8)])
def test_counting_sort_equals_the_stable_argsort(n_tok, n_exp):
    idx = torch.randint(-1, n_exp, (n_tok,), generator=torch.Generator().manual_seed(n_tok))
    perm, offsets = counting_sort(idx, n_exp)
    want_perm, want_offsets = group_by_expert(idx, n_exp)  # CPU: bincount + stable argsort
    assert torch.equal(perm, want_perm) and torch.equal(offsets, want_offsets)


def test_out_of_range_indices_sort_after_every_expert():
    perm, offsets = counting_sort(torch.tensor([2, 9, 0, -1, -4, 1, 0]), 3)
    assert perm.tolist() == [3, 2, 6, 5, 0, 1, 4] and offsets.tolist() == [1, 3, 4, 5]


def test_off_cpu_grouping_reads_nothing_back():
    with fake_cuda():
        idx = torch.zeros(4096, dtype=torch.int64, device="cuda")
        with count_work_items() as items:
            perm, offsets = group_by_expert(idx, 5)
    assert perm.shape == (4096,) and offsets.shape == (6,) and items.host_reads == []
