"""Counter-based noise: the Philox stream, its statistics and invariances, and the Triton kernels against it.

The kernels run here under ``TRITON_INTERPRET=1`` (set by conftest.py on a machine without CUDA), so
the very code a GPU compiles is checked against the torch reference on the CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from zo2_deepspeed import kernels, philox
from zo2_deepspeed.kernels import TILE_ELEMENTS, unavailable_reason
from zo2_deepspeed.noise import NoiseKernelError, PhiloxNoise, TorchNoise, build_noise, parameter_seed, step_seed

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(unavailable_reason(CPU) is not None,
                                  reason=f"Triton kernels cannot run here: {unavailable_reason(CPU)}")


def words(key, *counter):
    t = [torch.tensor([c]) for c in counter]
    return [int(w) for w in philox.philox4x32(key, *t)]


def test_philox_matches_the_published_known_answers():
    # Random123's known-answer vectors for Philox-4x32-10
    assert words((0, 0), 0, 0, 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert words((m, m), m, m, m, m) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0xA4093822, 0x299F31D0), 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_seed_and_counter_words_map_to_key_and_counter():
    seed, j = 0x0123456789ABCDEF, (7 << 32) + 5
    got = [int(w[0]) for w in philox.philox_words(seed, torch.tensor([j]))]
    assert got == words((0x89ABCDEF, 0x01234567), 5, 7, 0, 0)


def test_gaussian_statistics():
    """Seeded draws, so each check gives the same result on every run; each bound is 5 standard errors of its
    statistic (a correct generator fails one with probability < 6e-7 for a fresh seed), computed in float64."""
    n = 1 << 20
    z = philox.gaussian(parameter_seed(step_seed(42, 0), 0, "w"), n).double()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96) * se  # kurtosis of a normal
    assert abs(float((z.abs() < 1).double().mean()) - 0.682689) < 5 * se
    # every lane of a Philox call (cos and sin of two pairs) is standard normal and uncorrelated with the others
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(lanes.T)
    off_diagonal = corr - torch.eye(4, dtype=corr.dtype)
    assert float(off_diagonal.abs().max()) < 5 * 2 * se
    assert float((lanes.var(0) - 1).abs().max()) < 5 * math.sqrt(2) * 2 * se
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 * se  # no lag-1 correlation


def test_rademacher_statistics():
    n = 1 << 20
    u = philox.rademacher(parameter_seed(step_seed(42, 0), 3, "w"), n).double()
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    se = 1 / math.sqrt(n)
    assert abs(float(u.mean())) < 5 * se
    bits = (u.view(-1, 128) > 0).double()
    assert float((bits.mean(0) - 0.5).abs().max()) < 5 * 0.5 * math.sqrt(128) * se  # every bit position is fair
    assert abs(float((u[1:] * u[:-1]).mean())) < 5 * se


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_streams_of_parameters_directions_and_steps_are_independent(kind):
    n = 1 << 18
    s0, s1 = step_seed(7, 10), step_seed(7, 11)
    seeds = [parameter_seed(s0, 0, "a"), parameter_seed(s0, 0, "b"), parameter_seed(s0, 1, "a"),
             parameter_seed(s1, 0, "a")]
    assert len(set(seeds)) == 4
    zs = torch.stack([philox.stream(kind, s, n).double() for s in seeds])
    corr = torch.corrcoef(zs) - torch.eye(4, dtype=torch.float64)
    assert float(corr.abs().max()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_any_cut_of_a_stream_gives_the_same_values(kind):
    """Element i depends only on (seed, i): chunks, tiles and ZeRO shards see the same numbers."""
    seed, n = 12345, 3 * TILE_ELEMENTS + 77
    whole = philox.stream(kind, seed, n)
    for start, size in [(0, 1), (1, 5), (3, 130), (127, 300), (1000, n - 1000), (n - 1, 1)]:
        assert torch.equal(philox.stream(kind, seed, size, start), whole[start:start + size]), (start, size)
    assert not torch.equal(philox.stream(kind, seed + 1, n), whole)


def test_philox_stochastic_rounding_is_unbiased_exact_on_representable_values_and_shard_invariant():
    x = torch.full((200_000,), 1.0 + 2 ** -10, dtype=torch.float32)  # between two bf16 values, 1/8 of the gap up
    rounded = philox.stochastic_round(x, torch.bfloat16, seed=3).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(float(rounded.mean()) - float(x[0])) < 5 * (2 ** -7) * math.sqrt(0.125 * 0.875 / x.numel())
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, float("inf"), float("-inf")])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(philox.stochastic_round(exact, dtype, 9).float(), exact.to(dtype).float())
        assert torch.isnan(philox.stochastic_round(torch.tensor([float("nan")]), dtype, 0)).all()
        values = torch.randn(5000) * 100
        whole = philox.stochastic_round(values, dtype, 11)
        part = philox.stochastic_round(values[1234:4321], dtype, 11, start=1234)
        assert torch.equal(part.view(torch.int16), whole[1234:4321].view(torch.int16))
        # within one spacing of the value: 2^-7 relative for bf16, 2^-10 for fp16 (2^-24 among its subnormals)
        precision = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        assert bool(((whole.float() - values).abs() <= torch.clamp(values.abs() * precision, min=2 ** -24)).all())
    tiny = torch.tensor([1e-9, -1e-9] * 20000)  # below fp16's smallest subnormal (6e-8): 0 or ±2^-24
    out = philox.stochastic_round(tiny, torch.float16, 5).float()
    assert set(out.abs().unique().tolist()) <= {0.0, 2 ** -24}
    assert abs(float(out[::2].mean()) - 1e-9) < 5 * 2 ** -24 / math.sqrt(20000)


@needs_triton
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_kernel_fill_matches_the_reference_for_many_tensors_in_one_launch(kind):
    noise = PhiloxNoise(CPU)
    assert noise.triton is not None
    sizes = [1, 5, TILE_ELEMENTS, TILE_ELEMENTS + 3, 2 * TILE_ELEMENTS + 129]
    outs = [torch.empty(n) for n in sizes]
    seeds = [parameter_seed(99, 0, f"p{i}") for i in range(len(sizes))]
    noise.fill_many(list(zip(outs, seeds)), kind)
    # Rademacher: integer bits, exact. Gaussian: the kernel's log/sqrt/cos against torch's, a few ulps of
    # |z| ≤ 6 (the CPU interpreter: ≤ 4.8e-7 = 2.7 ulps); 1e-5 leaves room for a GPU's fast libdevice math
    tolerance = 1e-5 if kind == "gaussian" else 0.0
    for out, seed in zip(outs, seeds):
        reference = philox.stream(kind, seed, out.numel())
        assert float((out - reference).abs().max()) <= tolerance
    assert noise.elements_generated == sum(sizes)


@needs_triton
@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                  (torch.float32, torch.bfloat16)])
def test_kernel_perturbed_copy_matches_the_reference(src_dtype, dst_dtype):
    noise = PhiloxNoise(CPU)
    srcs = [torch.randn(n).to(src_dtype) for n in (300, 2 * TILE_ELEMENTS + 1)]
    dsts = [torch.empty(s.numel(), dtype=dst_dtype) for s in srcs]
    noise.combine(dsts, srcs, [1.0, 1.0], [[(5, 1e-2)], [(6, 1e-2)]], "gaussian")
    for src, dst, seed in zip(srcs, dsts, (5, 6)):
        reference = src.float() + 1e-2 * philox.gaussian(seed, src.numel())
        # two roundings in the destination dtype (z's few-ulp difference × 1e-2 is far below them)
        assert float((dst.float() - reference.to(dst_dtype).float()).abs().max()) <= \
            2 * float(reference.abs().max()) * torch.finfo(dst_dtype).eps


@needs_triton
def test_kernel_update_sums_many_directions_with_decay_and_scaling():
    noise = PhiloxNoise(CPU)
    n_terms = 11  # more than one launch sums (8): the rest is added in place
    work = torch.randn(1500)
    start = work.clone()
    scaling = torch.rand(1500) + 0.5
    terms = [(100 + j, 0.01 * (j - 5)) for j in range(n_terms)]
    noise.combine([work], [work], [0.99], [terms], "rademacher", [scaling])
    expected = start * 0.99
    for seed, coeff in terms:
        expected = expected + coeff * scaling * philox.rademacher(seed, 1500)
    # ±1 noise, so only the order of the fp32 additions differs: n_terms + 1 roundings, each at most one ulp
    # of the largest partial sum (not 1e-6: an unseeded randn reaches |x| ≈ 4.5, where an ulp is 4.8e-7)
    largest = float(start.abs().max()) + 1.5 * sum(abs(c) for _, c in terms)  # scaling < 1.5
    bound = (n_terms + 1) * torch.finfo(torch.float32).eps * largest
    assert float((work - expected).abs().max()) <= bound


@needs_triton
@pytest.mark.parametrize("dtype, start", [(torch.bfloat16, 5), (torch.float16, 5), (torch.bfloat16, 0),
                                          (torch.float16, 8)])
def test_kernel_stochastic_rounding_equals_the_reference_bit_for_bit(dtype, start):
    """start % 4 == 0 takes the kernel's row-per-thread path, other starts the per-element one."""
    noise = PhiloxNoise(CPU)
    x = torch.cat([torch.randn(4000) * 3, torch.tensor([0.0, -0.0, 1e-9, -1e-9, 70000.0, float("inf"),
                                                        float("-inf"), float("nan")])])
    got = noise.stochastic_round(x, dtype, seed=77, start=start)
    want = philox.stochastic_round(x, dtype, 77, start=start)
    assert torch.isnan(got[-1]) and torch.isnan(want[-1])  # NaN payloads are the converter's own
    assert torch.equal(got[:-1].view(torch.int16), want[:-1].view(torch.int16))


def test_torch_reference_backend_matches_the_stream_and_counts():
    noise = PhiloxNoise(CPU, use_triton=False)
    assert noise.triton is None and noise.fused
    out = noise.draw((33, 3), 8, "rademacher")
    assert torch.equal(out.view(-1), philox.rademacher(8, 99))
    assert noise.elements_generated == 99


def test_auto_generator_is_torch_on_the_cpu_and_names_are_checked():
    assert isinstance(build_noise("auto", CPU), TorchNoise)
    assert isinstance(build_noise("torch", CPU), TorchNoise)
    assert isinstance(build_noise("philox", CPU), PhiloxNoise)
    with pytest.raises(ValueError, match="unknown noise generator 'mt'"):
        build_noise("mt", CPU)


def test_torch_generator_chunks_tensors_on_the_cpu_and_not_on_accelerators():
    noise = TorchNoise(CPU, threads=1)
    assert noise.chunk_elements == 1 << 18
    whole = TorchNoise(CPU, threads=1, chunk_elements=1 << 62)
    a, b = noise.draw((300_000,), 4), whole.draw((300_000,), 4)
    assert torch.equal(a[: 1 << 18], b[: 1 << 18])  # the first chunk is the same draw
    assert not torch.equal(a[1 << 18:], b[1 << 18:])  # the second is reseeded in chunks


@needs_triton
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_kernel_gives_the_same_values_for_unaligned_views_and_partial_tiles(kind):
    """Tensors off a 16-byte boundary take the kernel's scalar path; full and partial tiles, the same z."""
    noise = PhiloxNoise(CPU)
    base = torch.randn(3 * TILE_ELEMENTS + 40)
    aligned_src = base[:2 * TILE_ELEMENTS + 7].clone()
    unaligned_src = base[1:2 * TILE_ELEMENTS + 8]
    unaligned_src.copy_(aligned_src)
    assert unaligned_src.data_ptr() % 16 != 0
    outs = [torch.empty(aligned_src.numel()), torch.empty(aligned_src.numel() + 1)[1:]]
    for src, out in ((aligned_src, outs[0]), (unaligned_src, outs[1])):
        noise.combine([out], [src], [0.5], [[(321, 0.25)]], kind)
    expected = 0.5 * aligned_src + 0.25 * philox.stream(kind, 321, aligned_src.numel())
    # one rounding of |0.5x + 0.25z| ≲ 3 (2.4e-7) plus 0.25 × the Gaussian's few-ulp kernel difference
    # (≤ 4.8e-7 on CPU, see the fill test): 1e-6; the Rademacher path differs only by the rounding
    tolerance = 1e-6
    assert float((outs[0] - expected).abs().max()) <= tolerance
    assert torch.equal(outs[0], outs[1])


def _launch_fails(monkeypatch) -> None:
    """What a machine without a C compiler (Triton builds its launcher) or with an old driver raises."""
    def fail(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    monkeypatch.setattr(kernels.TritonNoiseKernels, "_launch_combine", fail)
    kernels.kernels_for.cache_clear()  # kernels that passed the start-up check are not checked again


@pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
def test_auto_falls_back_to_torch_with_a_warning_when_the_kernels_cannot_launch(monkeypatch):
    import logging

    from deepspeed.utils import logger
    _launch_fails(monkeypatch)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device: None)  # as on a GPU
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        source = build_noise("auto", torch.device("meta"))  # any device that is not the CPU
    finally:
        logger.removeHandler(handler)
    assert isinstance(source, TorchNoise)
    assert len(seen) == 1 and "cannot compile or launch" in seen[0] and "Failed to find C compiler" in seen[0]
    assert "Falling back to torch's generator" in seen[0]


@needs_triton
def test_philox_fails_clearly_when_the_kernels_cannot_launch(monkeypatch):
    _launch_fails(monkeypatch)
    with pytest.raises(NoiseKernelError, match=r"cannot compile or launch on cpu \(RuntimeError: Failed to find C "
                                               r"compiler.*set zo2.noise_generator to \"torch\""):
        build_noise("philox", torch.device("cpu"))


@needs_triton
def test_the_start_up_check_names_the_variant_that_differs(monkeypatch):
    """A kernel variant that is wrong only for 16-bit destinations (the fill alone would pass) is caught."""
    launch = kernels.TritonNoiseKernels._launch_combine

    def wrong_for_16_bit(self, programs, tiles, meta, factors, dsts, srcs, *rest):
        launch(self, programs, tiles, meta, factors, dsts, srcs, *rest)
        if dsts[0].dtype == torch.bfloat16:
            dsts[0].add_(0.125)
    monkeypatch.setattr(kernels.TritonNoiseKernels, "_launch_combine", wrong_for_16_bit)
    kernels.kernels_for.cache_clear()
    try:
        with pytest.raises(NoiseKernelError, match=r"\(gaussian, float32 source, bfloat16 destination, 1 term\(s\), "
                                                   r"decay 1.0\) differs .* set zo2.noise_generator to \"torch\""):
            PhiloxNoise(CPU, use_triton=True)
    finally:
        kernels.kernels_for.cache_clear()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_rounds_a_whole_block_in_one_launch_bit_for_bit_as_one_tensor_at_a_time(dtype):
    """A block's write-back: tensors of several sizes (partial tiles), starts aligned or not (ZeRO shards)."""
    noise = PhiloxNoise(CPU, use_triton=True)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6000, generator=gen) * 3
    jobs = [(base[0:2048], dtype, 11, 0), (base[2048:2053], dtype, 12, 8), (base[2053:3500], dtype, 13, 4096),
            (base[3500:4800], dtype, 14, 6), (base[4801:6000], dtype, 15, 1)]  # the last view is unaligned
    launches = noise.triton.launches
    got = noise.stochastic_round_many(jobs)
    assert noise.triton.launches - launches == 2  # starts % 4 == 0, and the others
    for out, (x, _, seed, start) in zip(got, jobs):
        assert out.dtype == dtype
        assert torch.equal(out.view(torch.int16), philox.stochastic_round(x, dtype, seed, start).view(torch.int16))
