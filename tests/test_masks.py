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
