"""The contract every registered phase kind keeps, run over all of them (a new kind is tested
by adding it to `recipe/phases/__init__.py`), and the rule that nothing outside a kind's own
files compares kind names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit

from sparsekit import Session, Timeline, compile_recipe, load_recipe
from sparsekit.modifiers import MODIFIERS, modifier_for
from sparsekit.recipe.phases import PHASE_KINDS, PHASES
from sparsekit.surgery.tokens import selection_of

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 3, 4
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _recipe(config: type):
    phase = dict(config.example)
    if config.scheduled_updates:  # updates inside this short run
        phase |= {"update_every": "3 steps", "min_update_interval": "1 steps"}
    return load_recipe(
        {
            "name": "contract",
            "training": {"epochs": EPOCHS, "batch_size": 8, "schedule": {"warmup": 0}},
            "phases": [phase],
        }
    )


def _session(config: type, seed: int = 0) -> tuple[Session, torch.nn.Module]:
    torch.manual_seed(seed)
    model = tiny_vit(global_pool="avg")
    timeline = Timeline(EPOCHS, STEPS)
    modifiers = compile_recipe(_recipe(config), model, timeline)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Session(model, optimizer, modifiers, timeline), model


def _train(session: Session, model: torch.nn.Module, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        session.batch_start()
        F.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        session.optimizer.step()
        session.optimizer.zero_grad()
        session.after_optimizer_step()


def _assert_plain(model: torch.nn.Module) -> None:
    """`model` is what timm builds: the same modules and attributes, no hooks, no forward of
    its own, and it computes what a fresh timm model with its state dict computes."""
    fresh = tiny_vit(global_pool="avg")
    ours, theirs = dict(model.named_modules()), dict(fresh.named_modules())
    assert ours.keys() == theirs.keys()
    for name, module in ours.items():
        assert type(module) is type(theirs[name]), name
        assert vars(module).keys() == vars(theirs[name]).keys(), name
        assert "forward" not in vars(module), name
        for hooks in HOOK_DICTS:
            assert not getattr(module, hooks, {}), f"{name}.{hooks}"
    assert selection_of(model) is None
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_every_kind_is_registered_for_its_config() -> None:
    assert set(MODIFIERS) == set(PHASES)
    assert len(set(PHASE_KINDS)) == len(PHASES)
    for config in PHASES:
        modifier = modifier_for(config)
        assert modifier.config_type is config and modifier.kind == config.kind_name()
        assert config.modifier == modifier.__module__


@pytest.mark.parametrize("config", PHASES, ids=PHASE_KINDS)
def test_kind_contract(config: type) -> None:
    """Validate, compile on a tiny ViT, train, round-trip the state, close."""
    recipe = _recipe(config)
    (phase,) = recipe.phases
    assert type(phase) is config
    assert isinstance(phase.describe(Timeline(EPOCHS, STEPS)), str)

    before = {n for n, _ in tiny_vit(global_pool="avg").named_parameters()}
    session, model = _session(config)
    (modifier,) = session.modifiers
    assert type(modifier) is modifier_for(config) and modifier.config == phase
    added = {n for n, _ in model.named_parameters()} - before
    assert bool(added) == config.adds_parameters

    _train(session, model, 2 * STEPS)
    assert bool(modifier.masks()) == config.masks_weights
    if config.dense_window:
        assert not modifier.masks() and not modifier.unit_masks()

    # The state round-trips: a second session on the same model state takes it back whole.
    state = session.state_dict()
    twin, twin_model = _session(config, seed=5)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(state)
    assert _equal(twin.state_dict(), state)
    assert _equal(twin.masks(), session.masks())
    assert _equal(twin.unit_masks(), session.unit_masks())

    described = modifier_for(config).describe_on(phase, 0, model, "tiny")
    assert (described is not None) == config.per_block

    session.close()
    _assert_plain(model)
    session.close()  # twice does nothing
    twin.close()
    _assert_plain(twin_model)


@pytest.mark.parametrize("config", PHASES, ids=PHASE_KINDS)
def test_closing_keeps_what_the_masks_compute(config: type) -> None:
    """A closed model computes what the masked one did (token selection aside: a plain timm
    model has no place for it)."""
    session, model = _session(config)
    _train(session, model, 2 * STEPS)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.eval()
    if config.adds_parameters:  # the selection off: what the plain model will compute
        selection_of(model).enabled = False
    with torch.no_grad():
        masked = model(x)
    with Session(model, None, session.modifiers, session.timeline):
        pass
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-6)


def test_a_closed_session_takes_no_steps() -> None:
    session, _ = _session(PHASES[1])
    session.close()
    with pytest.raises(Exception, match="closed"):
        session.batch_start()


def _kind_files() -> dict[str, set[Path]]:
    """A kind's own files: its config and its modifier."""
    files = {}
    for config in PHASES:
        modifier = modifier_for(config)
        files[config.kind_name()] = {
            Path(__import__(config.__module__, fromlist=["_"]).__file__).resolve(),
            Path(__import__(modifier.__module__, fromlist=["_"]).__file__).resolve(),
        }
    return files


def test_no_module_compares_kind_names_outside_its_own_files() -> None:
    kinds = _kind_files()
    found = []
    for path in sorted((ROOT / "sparsekit").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                for item in ast.walk(side):
                    kind = item.value if isinstance(item, ast.Constant) else None
                    if kind in kinds and path.resolve() not in kinds[kind]:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {kind}")
    assert not found, f"kind names compared outside their kind's files: {found}"
