"""Compile-time rules: the ones that need the model or the dataset size."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import dst_recipe, tiny_vit

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.errors import RecipeError, SparsekitError


def test_windows_resolve_to_steps() -> None:
    recipe = load_recipe(dst_recipe(start="1 epoch", end="75%", update_every="3 steps"))
    (dst,) = compile_recipe(recipe, tiny_vit(), Timeline(4, 10))
    assert (dst.start_step, dst.end_step, dst.update_every) == (10, 30, 3)


def test_warmup_overlap_in_mixed_units_is_caught_in_steps() -> None:
    recipe = load_recipe(
        {
            "name": "t",
            "training": {"epochs": 4, "schedule": {"warmup": 0}},
            "phases": [
                {"kind": "dense_warmup", "end": "100 steps"},
                {"kind": "unstructured_dst", "start": 1, "sparsity": 0.5},
            ],
        }
    )
    with pytest.raises(RecipeError, match="inside the dense warm-up"):
        compile_recipe(recipe, tiny_vit(), Timeline(4, 60))


def test_same_weights_in_two_phases_with_patterns() -> None:
    recipe = load_recipe(
        {
            "name": "t",
            "training": {"epochs": 4, "schedule": {"warmup": 0}},
            "phases": [
                {"kind": "unstructured_dst", "sparsity": 0.5, "targets": {"roles": ["fc1"]}},
                {
                    "kind": "unstructured_dst",
                    "sparsity": 0.3,
                    "targets": {"roles": ["fc1", "fc2"], "include": ["blocks.1.*"]},
                },
            ],
        }
    )
    with pytest.raises(RecipeError, match="both make blocks.1.mlp.fc1.weight sparse"):
        compile_recipe(recipe, tiny_vit(), Timeline(4, 10))


def test_disjoint_phases_compile() -> None:
    recipe = load_recipe(
        {
            "name": "t",
            "training": {"epochs": 4, "schedule": {"warmup": 0}},
            "phases": [
                {"kind": "unstructured_dst", "sparsity": 0.5, "targets": {"roles": ["fc1"]}},
                {"kind": "unstructured_dst", "sparsity": 0.3, "targets": {"roles": ["fc2"]}},
            ],
        }
    )
    assert len(compile_recipe(recipe, tiny_vit(), Timeline(4, 10))) == 2


def test_targets_matching_nothing_is_a_recipe_error() -> None:
    recipe = load_recipe(dst_recipe(targets={"roles": ["fc1"], "include": ["nothing.*"]}))
    with pytest.raises(RecipeError, match=r"phases\[0\] \(unstructured_dst\): no weights"):
        compile_recipe(recipe, tiny_vit(), Timeline(4, 10))


def test_empty_window_in_steps() -> None:
    recipe = load_recipe(dst_recipe(start="3 steps", end="2%"))
    with pytest.raises(RecipeError, match="empty for this run"):
        compile_recipe(recipe, tiny_vit(), Timeline(4, 10))


def test_wrapped_model_names_the_inner_module() -> None:
    wrapped = torch.nn.DataParallel(tiny_vit())
    with pytest.raises(SparsekitError, match=r"model\.module"):
        compile_recipe(load_recipe(dst_recipe()), wrapped, Timeline(4, 10))


def test_empty_loader_is_a_clear_error() -> None:
    with pytest.raises(SparsekitError, match="data loader empty"):
        Session.from_recipe(load_recipe(dst_recipe()), tiny_vit(), None, steps_per_epoch=0)


def test_load_recipe_leaves_the_callers_dict_alone() -> None:
    source = dst_recipe()
    before = copy.deepcopy(source)
    load_recipe(source, ["phases[0].sparsity=0.9", "training.epochs=8"])
    assert source == before


def test_phase_without_kind() -> None:
    with pytest.raises(RecipeError, match="has no `kind`; allowed values: dense_warmup"):
        load_recipe({"name": "t", "phases": [{"sparsity": 0.5}]})
