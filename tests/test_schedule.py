"""The nested schedule: coverage, step counts, errors, and the block-causal mask."""

from __future__ import annotations

import pytest
import torch

from nestar_lab.method.schedule import Schedule, Stage, coordination_rows, nested_schedule


@pytest.mark.parametrize("n,k", [(4, 4), (16, 2), (64, 4), (64, 8), (64, 2), (256, 4), (256, 16), (27, 3)])
def test_every_token_once_and_step_formula(n, k):
    sched = nested_schedule(n, k)
    sched.validate()
    M = len(sched.stages)
    assert k**M == n
    assert sched.sequential_steps == k + (M - 1) * (k - 1)
    done = torch.cat([s.tgt_idx for s in sched.stages]).sort().values
    assert torch.equal(done, torch.arange(n))


def test_module_layout_matches_the_paper():
    sched = nested_schedule(64, 4)
    first, second, third = sched.stages
    assert first.tgt_idx.tolist() == [0, 1, 2, 3] and first.num_steps == 4
    assert first.src_idx.tolist() == [-1, 0, 1, 2]
    # module 2: context = tokens 0..3 (patch 0); 3 patches of 4 tokens
    assert second.num_steps == 3 and second.tgt_idx.tolist() == list(range(4, 16))
    assert second.src_idx[:4].tolist() == [0, 1, 2, 3]
    # module 3: 3 patches of 16 tokens, patch i fed by patch i-1
    assert third.num_steps == 3 and [third.step_rows(s) for s in range(3)] == [slice(0, 16), slice(16, 32), slice(32, 48)]
    assert third.src_idx[16:32].tolist() == list(range(16, 32))
    assert [s.coordinate_with for s in sched.stages] == [None, 0, 1]


@pytest.mark.parametrize("n,k", [(64, 3), (48, 4), (64, 1)])
def test_not_a_power_is_a_clear_error(n, k):
    with pytest.raises(ValueError, match=rf"n = k\^M tokens; got n={n}, k={k}"):
        nested_schedule(n, k)


def test_mask_is_block_causal():
    stage = nested_schedule(64, 4).stages[2]
    mask = stage.mask()
    steps = stage.step_of_row
    for r in range(stage.num_rows):
        assert torch.equal(mask[r], steps <= steps[r])


def test_coordination_segments_do_not_see_each_other():
    sched = nested_schedule(16, 2)
    src, tgt, mask, n_main = coordination_rows(sched.stages[2], sched.stages[1])
    assert n_main == sched.stages[2].num_rows
    assert not mask[:n_main, n_main:].any() and not mask[n_main:, :n_main].any()
    assert torch.equal(tgt[n_main:], sched.stages[1].tgt_idx)


def test_validate_rejects_a_row_fed_by_a_future_token():
    bad = Stage(src_idx=torch.tensor([1, 0]), tgt_idx=torch.tensor([0, 1]), step_of_row=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not generated before"):
        Schedule(2, [bad]).validate()


def test_validate_rejects_double_generation():
    a = Stage(src_idx=torch.tensor([-1]), tgt_idx=torch.tensor([0]), step_of_row=torch.tensor([0]))
    with pytest.raises(ValueError, match="expected once"):
        Schedule(2, [a, a]).validate()
