"""Exact layer budgets (ERK and uniform) and top-k masks."""

from __future__ import annotations

import math

import pytest
import torch

from sparsekit.surgery.masks import layer_budgets, topk_mask

VIT_SMALL_SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 12


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_budgets_hit_global_sparsity_to_the_element(distribution: str, sparsity: float) -> None:
    shapes = VIT_SMALL_SHAPES + [(10, 384), (384, 3, 16, 16)]
    budgets = layer_budgets(shapes, sparsity, distribution)
    sizes = [math.prod(s) for s in shapes]
    assert sum(budgets) == round((1 - sparsity) * sum(sizes))
    assert all(0 <= b <= n for b, n in zip(budgets, sizes, strict=True))


def test_uniform_gives_each_layer_its_share() -> None:
    shapes = [(100, 30), (7, 13), (64, 64)]
    budgets = layer_budgets(shapes, 0.5, "uniform")
    for b, s in zip(budgets, shapes, strict=True):
        assert abs(b - 0.5 * math.prod(s)) <= 1


def test_erk_follows_rigl_formula() -> None:
    # density ~ (out + in) / (out * in): the square layer is denser than the wide one.
    shapes = [(384, 384), (1536, 384)]
    budgets = layer_budgets(shapes, 0.5, "erk")
    density = [b / math.prod(s) for b, s in zip(budgets, shapes, strict=True)]
    ratio = density[0] / density[1]
    expected = ((384 + 384) / 384**2) / ((1536 + 384) / (1536 * 384))
    assert ratio == pytest.approx(expected, rel=1e-3)


def test_erk_keeps_small_layers_dense_and_resolves() -> None:
    # A tiny layer whose ERK density would exceed 1 is kept dense; the rest absorbs the budget.
    shapes = [(2, 2), (1000, 1000)]
    budgets = layer_budgets(shapes, 0.5, "erk")
    assert budgets[0] == 4
    assert sum(budgets) == round(0.5 * (4 + 1_000_000))


def test_topk_mask_is_exact() -> None:
    scores = torch.rand(37, 11)
    for k in (0, 1, 200, 407):
        mask = topk_mask(scores, k)
        assert mask.dtype == torch.bool and int(mask.sum()) == k
        if 0 < k < scores.numel():
            assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 37, 50_000, 150_000, 299_999])
def test_bracketed_topk_matches_torch_topk(k: int, largest: bool) -> None:
    # Large enough for the sampled bracket; the result must be the exact top-k set.
    scores = torch.randn(300_000, generator=torch.Generator().manual_seed(k))
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.topk(scores, k, largest=largest).indices] = True
    assert torch.equal(topk_mask(scores, k, largest=largest), expected)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_with_heavy_ties_is_exact_and_valid(largest: bool) -> None:
    # Most scores tied at 0 (freshly grown weights, zero gradients): the cut falls inside the
    # tie, which the sampled bracket must resolve without losing exactness.
    scores = torch.zeros(200_000)
    scores[:30_000] = torch.rand(30_000) + 1.0
    scores[30_000:60_000] = -torch.rand(30_000) - 1.0
    for k in (10_000, 30_000, 45_000, 100_000, 170_000):
        mask = topk_mask(scores, k, largest=largest)
        assert int(mask.sum()) == k
        chosen, rest = scores[mask], scores[~mask]
        if largest:
            assert chosen.min() >= rest.max()
        else:
            assert chosen.max() <= rest.min()


def test_topk_keeps_shape_and_takes_half_precision() -> None:
    scores = torch.randn(400, 300).half()
    mask = topk_mask(scores, 5_000)
    assert mask.shape == scores.shape and int(mask.sum()) == 5_000
    assert scores[mask].min() >= scores[~mask].max()


def test_topk_is_exact_when_the_sample_misleads() -> None:
    # The bracket samples every 37th score of 300,000 (a stride coprime with 2, 3 and 5). Make
    # exactly those scores outliers: the bracket misses and the full partition must take over.
    scores = torch.randn(300_000, generator=torch.Generator().manual_seed(0))
    scores[::37] += 100.0
    for k in (1_000, 150_000):
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[torch.topk(scores, k).indices] = True
        assert torch.equal(topk_mask(scores, k), expected)
