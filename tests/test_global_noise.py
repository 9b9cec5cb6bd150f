"""Stochastic depth and dropout noise: each rank draws its rows of the one-process draw."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit
from timm.layers import DropPath
from torch import nn

from sparsekit.errors import SparsekitError
from sparsekit.surgery import global_noise
from sparsekit.surgery.global_noise import GlobalBatchNoise, batch_rows


def noisy(**kwargs) -> nn.Module:
    return tiny_vit(
        drop_path_rate=0.3, drop_rate=0.2, proj_drop_rate=0.1, pos_drop_rate=0.1, **kwargs
    ).train()


def test_one_process_draws_exactly_what_timm_draws() -> None:
    model, x = noisy(), torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    expected, state = model(x), torch.get_rng_state()
    noise = GlobalBatchNoise(model)
    assert len(noise.modules) == 10  # 3 DropPath (block 0's rate is 0) and 7 Dropout
    torch.manual_seed(3)
    assert torch.equal(model(x), expected)
    assert torch.equal(torch.get_rng_state(), state)
    noise.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    torch.manual_seed(3)
    assert torch.equal(model(x), expected)


def shares(total: int, world: int) -> list[tuple[int, int]]:
    """(start, size) of each rank: equal shares, or as many as fit for an uneven batch."""
    share = -(-total // world)
    return [(r * share, min(share, total - r * share)) for r in range(world)]


@pytest.mark.parametrize(("total", "world"), [(6, 2), (6, 3), (7, 2), (10, 4)])
def test_each_rank_draws_its_rows_of_the_one_process_draw(
    total: int, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even shares (the rank's place from torch.distributed) and an uneven batch (stated with
    batch_rows); the generator advances alike on every rank and in one process."""
    modules = [DropPath(0.4), nn.Dropout(0.3), DropPath(0.5, scale_by_keep=False)]
    x = torch.randn(total, 5, 8)
    for module in modules:
        model = nn.Sequential(module).train()
        GlobalBatchNoise(model)
        torch.manual_seed(11)
        whole, state = model(x), torch.get_rng_state()
        for rank, (start, size) in enumerate(shares(total, world)):
            torch.manual_seed(11)
            if total % world:
                with batch_rows(start, total):
                    mine = model(x[start : start + size])
            else:
                monkeypatch.setattr(global_noise, "rank_and_world", lambda r=rank: (r, world))
                mine = model(x[start : start + size])
                monkeypatch.undo()
            assert torch.equal(mine, whole[start : start + size]), (module, rank)
            assert torch.equal(torch.get_rng_state(), state)


def test_a_vit_rank_computes_its_rows_of_the_one_process_forward() -> None:
    model, x = noisy(depth=3), torch.randn(8, 3, 32, 32)
    timm_own = noisy(depth=3)
    timm_own.load_state_dict(model.state_dict())
    GlobalBatchNoise(model)
    torch.manual_seed(5)
    whole = model(x)
    torch.manual_seed(5)
    with batch_rows(4, 8):
        assert torch.allclose(model(x[4:]), whole[4:], atol=1e-5)
    torch.manual_seed(5)  # timm's own draw on the rank gives other drops
    assert not torch.allclose(timm_own(x[4:]), whole[4:], atol=1e-3)


def test_rows_that_do_not_fit_and_tensors_not_batch_first_are_refused() -> None:
    model = nn.Sequential(DropPath(0.2)).train()
    GlobalBatchNoise(model)
    with pytest.raises(SparsekitError, match="run past the global batch of 6"), batch_rows(4, 6):
        model(torch.ones(3, 4))
    with pytest.raises(SparsekitError, match="outside a global batch"), batch_rows(6, 6):
        pass
    flat = nn.Sequential(nn.Flatten(0, 1), nn.Dropout(0.5)).train()
    GlobalBatchNoise(flat)
    with pytest.raises(SparsekitError, match="12 rows in a forward pass of 4 samples"):
        flat(torch.ones(4, 3, 5))


def test_eval_draws_nothing_and_inplace_and_certain_dropout_work() -> None:
    model = nn.Sequential(DropPath(0.3), nn.Dropout(0.5, inplace=True), nn.Dropout(1.0))
    GlobalBatchNoise(model)
    x, state = torch.randn(4, 6), torch.get_rng_state()
    assert torch.equal(model.eval()(x), x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.train()(x.clone()), torch.zeros(4, 6))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"attn_drop_rate": 0.1}, "attn_drop_rate=0"), ({"patch_drop_rate": 0.25}, "patch_drop_rate")],
)
def test_noise_out_of_reach_is_refused_under_distributed(
    kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = tiny_vit(**kwargs).train(), torch.randn(2, 3, 32, 32)
    GlobalBatchNoise(model)
    model(x)  # one process: nothing to refuse
    monkeypatch.setattr(global_noise, "rank_and_world", lambda: (0, 2))
    model.eval()(x)  # evaluation draws no noise
    with pytest.raises(SparsekitError, match=message):
        model.train()(x)


def test_every_rank_resumes_the_cuda_generator_it_draws_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 0 writes the checkpoint and drew from cuda:0; rank 1 draws from cuda:1, whose state
    in rank 0's process never moved. On resume rank 1's device takes cuda:0's state."""
    from sparsekit.run_folder.checkpoint import capture_rng, restore_rng

    devices = {0: torch.tensor([7]), 1: torch.tensor([1])}  # cuda:0 advanced, cuda:1 as seeded
    current = [0]
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [devices[0], devices[1]])
    monkeypatch.setattr(cuda, "set_rng_state_all", lambda s: devices.update(enumerate(s)))
    monkeypatch.setattr(cuda, "get_rng_state", lambda: devices[current[0]])
    monkeypatch.setattr(cuda, "set_rng_state", lambda s: devices.update({current[0]: s}))
    state = capture_rng()  # rank 0
    devices.update({0: torch.tensor([0]), 1: torch.tensor([0])})
    current[0] = 1  # rank 1
    restore_rng(state)
    assert devices[1].item() == 7


def test_a_distributed_run_refuses_out_of_reach_noise_when_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(global_noise, "rank_and_world", lambda: (1, 2))
    with pytest.raises(SparsekitError, match="attn_drop_rate=0"):
        GlobalBatchNoise(tiny_vit(attn_drop_rate=0.1))


def test_the_relative_position_mlp_keeps_torchs_dropout() -> None:
    """RelPosMlp's dropout acts on a bias all samples share (not batch-first): it is left to
    torch, one draw per forward alike on every rank, and training runs."""
    import timm

    from sparsekit.surgery.global_noise import GlobalBatchNoise

    model = timm.create_model(
        "vit_relpos_base_patch16_rpn_224", pretrained=False, img_size=32, patch_size=8, depth=2
    ).train()
    noise = GlobalBatchNoise(model)
    shared = [m for m in model.modules() if type(m).__name__ == "RelPosMlp"][0]
    dropouts = [m for m in shared.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and not any("forward" in vars(m) for m in dropouts)
    model(torch.randn(3, 3, 32, 32)).sum().backward()
    noise.remove()
