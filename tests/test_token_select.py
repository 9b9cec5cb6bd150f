"""SViTE+ token selection: deterministic gathered eval, exact masked training, export and cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit
from rich.console import Console

from sparsekit import Session, compile_recipe, load_recipe
from sparsekit.analysis.cost import model_cost
from sparsekit.errors import SparsekitError
from sparsekit.export import export_run, load_compact
from sparsekit.models import create_model
from sparsekit.modifiers.token_select import TokenSelect
from sparsekit.run_folder.records import read_metrics
from sparsekit.run_folder.trained_run import open_run
from sparsekit.surgery.tokens import Placement, TokenSelection, kept_count
from sparsekit.timeline import Timeline
from sparsekit.train.trainer import RunConfig, train

TWO_STAGES = [Placement(0, 0.75), Placement(1, 0.5)]


def seen_lengths(model: torch.nn.Module) -> list[int]:
    """Record the sequence length each block receives in the next forward."""
    lengths: list[int] = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    return lengths


def test_eval_selection_is_deterministic_and_gathers_exactly_k() -> None:
    torch.manual_seed(0)
    model = tiny_vit(depth=3).eval()  # 16 patches + class token
    selection = TokenSelection(model, TWO_STAGES)
    lengths = seen_lengths(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert lengths[:3] == [1 + 12, 1 + 6, 1 + 6]  # ceil(0.75 x 16), then ceil(0.5 x 12)
    assert selection.tokens_per_block(16) == [13, 7, 7]
    assert kept_count(197 - 1, 0.95) == 187  # the paper's "5% data sparsity" on DeiT at 224


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("vit_tiny_patch16_224", {}),  # class token, 'token' pool
        ("vit_medium_patch16_gap_256", {}),  # no class token, 'avg' pool
        ("vit_base_patch16_reg4_gap_256", {}),  # register tokens, 'avg' pool
        ("deit_tiny_distilled_patch16_224", {}),  # class + distillation tokens
        ("vit_tiny_patch16_224", {"global_pool": "max"}),
        ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": True}),
    ],
)
def test_masked_training_forward_equals_gathered_forward(name: str, extra: dict) -> None:
    torch.manual_seed(0)
    model = tiny_vit(name, depth=3, **extra)
    selection = TokenSelection(model, TWO_STAGES)
    selection.noise = False  # the same hard choice as eval: the deterministic top-k
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        masked = model.train()(x)
        gathered = model.eval()(x)
    if isinstance(masked, tuple):  # distilled models return two heads in training
        masked = (masked[0] + masked[1]) / 2
    assert torch.allclose(masked, gathered, atol=1e-4)


def test_training_selection_is_noisy_and_trains_the_scorer() -> None:
    torch.manual_seed(0)
    model = tiny_vit().train()
    selection = TokenSelection(model, [Placement(0, 0.5)])
    selection.temperature = 1.0
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    grad = model.token_selectors["0"].score.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    kept = []
    for _ in range(5):
        model(x)
        kept.append(selection._alive.clone())
    assert any(not torch.equal(kept[0], k) for k in kept[1:])  # Gumbel noise explores


def token_recipe(**phase) -> dict:
    return {
        "name": "tokens",
        "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
        "phases": [{"kind": "token_select", "keep_ratio": 0.75, **phase}],
    }


def test_temperature_anneals_geometrically_over_the_window() -> None:
    model = tiny_vit()
    recipe = load_recipe(token_recipe(start="25%", end="75%"))
    (modifier,) = compile_recipe(recipe, model, Timeline(2, 10))
    assert isinstance(modifier, TokenSelect)
    assert modifier.temperature(5) == pytest.approx(10.0)
    assert modifier.temperature(10) == pytest.approx(1.0)
    assert modifier.temperature(15) == pytest.approx(0.1)
    assert modifier.temperature(19) == pytest.approx(0.1)


def test_selection_is_off_before_the_phase_starts() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    recipe = load_recipe(token_recipe(start="50%"))
    modifiers = compile_recipe(recipe, model, Timeline(2, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    session = Session(model, optimizer, modifiers, Timeline(2, 4))
    lengths = seen_lengths(model.eval())
    session.batch_start()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert lengths[0] == 17
    session.step = 4
    session.batch_start()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert lengths[-1] == 13


def test_an_optimizer_without_the_scorer_is_refused() -> None:
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters())  # built before the scorer existed
    session = Session.from_recipe(load_recipe(token_recipe()), model, optimizer, 4)
    with pytest.raises(SparsekitError, match="Build the optimizer after compiling"):
        session.batch_start()


def test_models_that_read_every_token_are_refused() -> None:
    with pytest.raises(SparsekitError, match="reads every token"):
        TokenSelection(tiny_vit(global_pool="avgmax"), [Placement(0, 0.5)])
    pooled = tiny_vit("vit_base_patch16_siglip_224")
    pooled.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(17, 768))
    with pytest.raises(SparsekitError, match="position embedding per token"):
        TokenSelection(pooled, [Placement(0, 0.5)])


def test_attention_pooling_attends_to_the_kept_tokens_only() -> None:
    """SigLIP's attention pool is given the key mask in masked training, and sees only the
    kept tokens once they are gathered: both forwards compute the same (noise off)."""
    model = tiny_vit("vit_base_patch16_siglip_224", embed_dim=64, num_heads=4)
    assert model.global_pool == "map"
    selection = TokenSelection(model, TWO_STAGES)
    selection.noise = False
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        gathered = model.eval()(x)
        masked = model.train()(x)
    torch.testing.assert_close(masked, gathered, rtol=1e-5, atol=1e-5)
    selection.remove()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(x), gathered, atol=1e-5)
    with pytest.raises(SparsekitError, match="blocks 0 to 1"):
        TokenSelection(tiny_vit(), [Placement(5, 0.5)])


def test_cost_counts_the_shorter_sequences() -> None:
    model = tiny_vit(depth=3).eval()
    dense = model_cost(model)
    TokenSelection(model, TWO_STAGES)
    cost = model_cost(model)
    assert [b.tokens for b in cost.blocks] == [13, 7, 7]
    assert cost.flops < dense.flops
    block = dense.blocks[0]
    linear = block.flops - 4 * 17 * 17 * 192
    expected = linear * 13 // 17 + 4 * 13 * 13 * 192
    assert cost.blocks[0].flops == expected


SVITE_PLUS = {
    "name": "svite_plus",
    "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
    "phases": [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "5 steps",
            "min_update_interval": "1 steps",
        },
        {
            "kind": "head_prune_grow",
            "head_density": 0.67,
            "mlp_density": 0.5,
            "update_every": "5 steps",
            "min_update_interval": "1 steps",
        },
        {"kind": "token_select", "keep_ratio": 0.5},
    ],
}


def test_short_real_run_with_all_three_phases_exports_loads_and_matches(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Digits at 8 px with 4 px patches: 4 patch tokens, 2 kept.
    config = RunConfig(model="deit_tiny", data="digits", output=out)
    summary = train(load_recipe(SVITE_PLUS), config, Console(quiet=True))
    epochs = [r for r in read_metrics(out) if r.get("event") == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] and summary["val_acc"] > 0.15
    manifest = export_run(out, tmp_path / "export")
    assert [(t.before_block, t.keep_ratio) for t in manifest.token_selection] == [(0, 0.5)]
    loaded = load_compact(tmp_path / "export")

    # The model as it trained (gates, masks and selector), in eval mode: it gathers too.
    run = open_run(out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    trained = create_model(run.spec)
    timeline = Timeline(run.recipe.training.epochs, ckpt["steps_per_epoch"])
    session = Session(trained, None, compile_recipe(run.recipe, trained, timeline), timeline)
    trained.load_state_dict(run.weights)
    session.load_state_dict(ckpt["session"])
    session.step = timeline.total_steps
    session.batch_start()
    lengths = seen_lengths(loaded)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), trained.eval()(x), atol=1e-4)
    assert lengths[0] == 1 + 2
    cost = model_cost(loaded)
    assert cost.blocks[0].tokens == 3
    assert cost.flops < 0.75 * model_cost(create_model(run.spec)).flops


FAMILIES = [
    ("eva02_tiny_patch14_224", {"img_size": 28}),  # rotary embeddings gathered by position
    ("vit_base_patch16_rope_mixed_224", {}),  # rotary embeddings per head
    ("beit_base_patch16_224", {}),  # a relative position bias table per block
    ("vit_relpos_base_patch16_rpn_224", {}),  # a bias from RelPosMlp, res-post-norm blocks
    ("vit_relpos_medium_patch16_cls_224", {}),  # a bias table with a class token
    ("vit_srelpos_small_patch16_224", {}),  # a bias shared by all blocks
    ("vit_base_patch16_siglip_224", {}),  # attention pooling
    ("naflexvit_base_patch16_gap", {}),  # NaFlexViT on image batches
]


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_positions_follow_the_kept_tokens_in_every_family(name: str, size: dict) -> None:
    """Masked training and the gathered forward compute the same, with rotary embeddings and
    relative position biases (noise and dropout off): each kept token keeps its position."""
    from sparsekit.models import ModelSpec, create_model

    kwargs = {"img_size": 32, "depth": 3, "num_classes": 5, "patch_size": 4, **size}
    if name.startswith("eva02"):
        kwargs["patch_size"] = 7
    torch.manual_seed(0)
    model = create_model(ModelSpec(name, kwargs))
    with torch.no_grad():  # timm starts position tables and biases at zero
        for p in model.parameters():
            p.normal_(0, 0.2)
    for module in model.modules():  # RelPosMlp's dropout would differ between the forwards
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    selection = TokenSelection(model, [Placement(1, 0.5), Placement(2, 0.5)])
    selection.noise = False
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        gathered = model.eval()(x)
        masked = model.train()(x)
        selection.gather_in_training = True
        gathered_training = model(x)
    torch.testing.assert_close(masked, gathered, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gathered_training, gathered, rtol=1e-5, atol=1e-6)
    selection.remove()
    assert not any("forward" in vars(m) or "get_bias" in vars(m) for m in model.modules())
    with torch.no_grad():  # the selection changed the result: the comparison above is not empty
        assert not torch.allclose(model.eval()(x), gathered, atol=1e-4)


def test_naflex_patch_sequences_are_refused_with_the_reason() -> None:
    """NaFlexViT given padded patch sequences builds its own attention mask: the selector
    refuses rather than mislay the padding."""
    from timm.models.naflexvit import NaFlexVit

    model = tiny_vit("naflexvit_base_patch16_gap", patch_size=4, embed_dim=64, num_heads=4)
    assert isinstance(model, NaFlexVit)
    TokenSelection(model, [Placement(0, 0.5)])
    patches = torch.randn(2, 16, 4 * 4 * 3)
    coord = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 12:] = False  # the second sequence is padded
    inputs = {
        "patches": patches,
        "patch_coord": coord.reshape(1, 16, 2).expand(2, -1, -1),
        "patch_valid": valid,
    }
    with pytest.raises(SparsekitError, match="takes image batches"), torch.no_grad():
        model.eval()(inputs)
