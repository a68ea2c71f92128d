"""What makes the multi-rank equality tests exact: a row's forward and its loss do not depend on how the
global batch is split.

Data parallelism (2 ranks × B/2 rows), gradient accumulation (2 micro-batches of B/2) and one rank (B rows)
run the same rows in batches of different sizes, and the engine replicates a batch G times for its
perturbation groups. If a row's logits changed with the batch size (a BLAS kernel chosen by shape, a
thread-count dependent reduction) or a loss depended on the order of its sum, the runs would differ by
rounding, which HiZOO's curvature term amplifies by α/2ε² (500 in the multi-rank tests). These fast
checks name that cause directly where the multi-rank tests could only report a parameter difference.
"""
from __future__ import annotations

import pytest
import torch

from tiny_models import batches, make_model
from zo2_deepspeed.loss import causal_lm_loss, group_losses, sum_exactly


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def logits_of(model, batch: dict, rows: slice, groups: int) -> torch.Tensor:
    """The logits of ``rows`` when they are run as one batch replicated ``groups`` times (the engine's layout)."""
    ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
    with torch.no_grad():
        out = model(input_ids=ids.repeat(groups, 1), attention_mask=mask.repeat(groups, 1), use_cache=False)
    return out.logits.chunk(groups)[0]


def test_a_rows_forward_does_not_depend_on_the_rest_of_its_batch(threads):
    """The dp_worker model (tiny LLaMA) on 8 rows × 3 groups, 2 × 4 rows × 3 groups and 4 × 2 rows: same bits."""
    model = make_model("llama").eval()
    batch = batches(1, rows=8)[0]
    whole = logits_of(model, batch, slice(0, 8), groups=3)
    halves = torch.cat([logits_of(model, batch, slice(r, r + 4), groups=3) for r in (0, 4)])
    pairs = torch.cat([logits_of(model, batch, slice(r, r + 2), groups=1) for r in range(0, 8, 2)])
    assert torch.equal(whole, halves) and torch.equal(whole, pairs)


def test_the_loss_of_a_batch_is_the_mean_of_its_halves_bit_for_bit(threads):
    """How 1 rank, 2 data-parallel ranks and 2 accumulated micro-batches reduce the same 8 rows' group losses:
    one float64 mean, or the float64 mean of two means; rounded to fp32 once, the same value."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        logits = torch.randn(3 * 8, 16, 128, generator=gen) * (1 + trial)  # 3 groups × 8 rows
        labels = torch.randint(0, 128, (8, 16), generator=gen)
        whole = group_losses(logits, {"labels": labels}, groups=3, rows_per_group=8)
        halves = [group_losses(torch.cat([g[r:r + 4] for g in logits.chunk(3)]), {"labels": labels[r:r + 4]},
                               groups=3, rows_per_group=4) for r in (0, 4)]
        assert whole.dtype == torch.float64
        assert torch.equal(whole.float(), ((halves[0] + halves[1]) / 2).float()), trial


def test_float64_sums_of_fp32_values_do_not_depend_on_order():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(100_000, generator=gen) * 12 + 0.01  # token losses of an untrained model
    total = sum_exactly(values)
    assert torch.equal(sum_exactly(values[torch.randperm(values.numel(), generator=gen)]), total)
    assert torch.equal(sum(sum_exactly(part) for part in values.split(777)), total)
    assert torch.equal(causal_lm_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 1]])).float(),
                       torch.tensor(4.0).log())  # uniform logits: log(vocab)
