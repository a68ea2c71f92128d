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
from zo2_deepspeed.errors import BatchError
from zo2_deepspeed.loss import causal_lm_loss, group_loss_sums, sum_exactly


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


def test_the_loss_of_a_batch_is_its_parts_summed_and_divided_once_bit_for_bit(threads):
    """How 1 rank, data-parallel ranks, accumulated micro-batches and a short last batch reduce the same 8 rows'
    group losses: the parts' (sum, items) records add to the whole batch's record exactly, so one division gives
    the same float64, for padded rows and uneven splits too (comm.reduce_and_divide divides once)."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        logits = torch.randn(3 * 8, 16, 128, generator=gen) * (1 + trial)  # 3 groups × 8 rows
        labels = torch.randint(0, 128, (8, 16), generator=gen)
        mask = torch.ones_like(labels)
        for row, pad in enumerate(torch.randint(0, 15, (8,), generator=gen).tolist()):  # 2 to 16 tokens per row
            if pad:
                mask[row, -pad:] = 0
        batch = {"labels": labels, "attention_mask": mask}
        whole = group_loss_sums(logits, batch, groups=3, rows_per_group=8)
        for splits in ([4, 4], [5, 3], [1, 7], [2, 3, 3]):
            starts = [sum(splits[:i]) for i in range(len(splits))]
            parts = [group_loss_sums(torch.cat([g[a:a + n] for g in logits.chunk(3)]),
                                     {k: v[a:a + n] for k, v in batch.items()}, groups=3, rows_per_group=n)
                     for a, n in zip(starts, splits)]
            total = sum(parts[1:], parts[0])
            assert whole.sums.dtype == torch.float64 and (total.items, total.rows) == (whole.items, 8)
            assert torch.equal(total.sums, whole.sums) and torch.equal(total.means(), whole.means()), (trial, splits)
            if trial == 0 and splits == [5, 3]:
                # the weighting this replaced, the mean of the parts' means: with padding, another objective
                mean_of_means = (parts[0].means() + parts[1].means()) / 2
                assert (mean_of_means.float() != whole.step_losses().float()).all()


def test_a_loss_fn_weighs_each_returned_value_or_a_scalar_by_its_rows():
    """loss_fn's per-example values are items of weight 1; a scalar stands for the mean of the micro-batch's rows."""
    per_row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float32)
    outputs = per_row.repeat(2)  # 2 groups × 6 rows, group-major
    whole = group_loss_sums(outputs, {}, groups=2, rows_per_group=6, loss_fn=lambda out, b: out)
    assert (whole.items, whole.rows) == (6, 6) and whole.means().tolist() == [3.5, 3.5]
    four = group_loss_sums(torch.zeros(8), {}, groups=2, rows_per_group=4, loss_fn=lambda out, b: out.new_tensor(2.0))
    two = group_loss_sums(torch.zeros(4), {}, groups=2, rows_per_group=2, loss_fn=lambda out, b: out.new_tensor(5.0))
    together = four + two
    assert (together.items, together.rows) == (6, 6)
    assert together.means().tolist() == [3.0, 3.0]  # (4 rows × 2 + 2 rows × 5) / 6, not the mean of means 3.5
    with pytest.raises(BatchError, match="loss_fn returned 1 values for group 1 but 2 for group 0"):
        group_loss_sums(torch.tensor([0.0, 0.0, 1.0, 1.0]), {}, groups=2, rows_per_group=2,
                        loss_fn=lambda out, b: out[:2] if out[0] == 0 else out[:1])


def test_float64_sums_of_fp32_values_do_not_depend_on_order():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(100_000, generator=gen) * 12 + 0.01  # token losses of an untrained model
    total = sum_exactly(values)
    assert torch.equal(sum_exactly(values[torch.randperm(values.numel(), generator=gen)]), total)
    assert torch.equal(sum(sum_exactly(part) for part in values.split(777)), total)
    assert torch.equal(causal_lm_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 1]])).float(),
                       torch.tensor(4.0).log())  # uniform logits: log(vocab)
