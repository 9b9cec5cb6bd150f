"""training.distillation: DeiT's loss on fixed tensors, teachers read from local files (ViT and
CNN, adapted like pretrained weights, wrong ones refused through the CLI), distilled students
end to end with sparse phases, and resume with a teacher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.recipe import load_recipe
from sparsekit.recipe.distillation import Distillation
from sparsekit.run_folder.checkpoint import load_checkpoint
from sparsekit.train.distillation import DistillationLoss, build_teacher
from sparsekit.train.loss import make_loss
from sparsekit.train.trainer import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# The teacher of most tests: a 2-block ViT for digits (8 px, 1 channel, 10 classes), patches of
# 4 px (digits' default, which the teacher gets as the student does).
TEACHER = {"img_size": 8, "patch_size": 4, "depth": 2, "num_classes": 10, "in_chans": 1}


def teacher_file(
    path: Path, name: str = "vit_tiny_patch16_224", wrap: str | None = None, **kwargs
) -> Path:
    """A timm model's weights saved at `path` (safetensors, or torch.save, wrapped under
    `wrap` as training checkpoints are)."""
    torch.manual_seed(123)
    model = timm.create_model(name, pretrained=False, **{**TEACHER, **kwargs})
    state = model.state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path


def recipe(weights: Path | str, epochs: int = 2, phases: list | None = None, **distil) -> dict:
    return {
        "name": "distil",
        "training": {
            "epochs": epochs,
            "batch_size": 64,
            "schedule": {"warmup": 0},
            "optimizer": {"lr": 1e-3},
            "distillation": {
                "type": "hard",
                "teacher": "vit_tiny_patch16_224",
                "teacher_weights": str(weights),
                "teacher_args": {"depth": 2},
                **distil,
            },
        },
        "phases": phases or [],
    }


def run(data: dict, out: Path, model: str = "vit_tiny_patch16_224", **kwargs) -> dict:
    config = RunConfig(model=model, data="digits", output=out, extra={"depth": 2}, **kwargs)
    return train(load_recipe(data), config)


def epoch_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in lines if r["event"] == "epoch"]


class Fixed(nn.Module):
    """A teacher that answers every batch with the same logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        return self.logits


def config(kind: str, alpha: float = 0.3, tau: float = 2.0) -> Distillation:
    return Distillation(
        type=kind, alpha=alpha, tau=tau, teacher="vit_tiny_patch16_224", teacher_weights="t.pth"
    )


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_loss_is_deits_formula(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    cls, dist, teach = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    labels = torch.randint(0, 5, (6,), generator=g)
    images = torch.zeros(6, 1, 8, 8)
    alpha, tau = 0.3, 2.0
    base = nn.CrossEntropyLoss(label_smoothing=0.1)
    teacher = Fixed(teach)
    got = DistillationLoss(base, teacher, config(kind, alpha, tau))(images, (cls, dist), labels)
    assert teacher.seen == [images]  # the batch the student saw
    # DeiT losses.py, written out: the base loss on the class token's output only...
    base_loss = base(cls, labels)
    if kind == "hard":  # ...cross-entropy of the distillation output against the teacher's argmax
        distill = -F.log_softmax(dist, 1)[torch.arange(6), teach.argmax(1)].mean()
    else:  # ...or KL(teacher || student) at tau, summed, x tau^2 / numel (DeiT's normalisation)
        p_t, log_p_s = F.softmax(teach / tau, 1), F.log_softmax(dist / tau, 1)
        distill = (p_t * (p_t.log() - log_p_s)).sum() * tau * tau / dist.numel()
    assert torch.allclose(got, base_loss * (1 - alpha) + distill * alpha, atol=1e-6)
    # A model without a distillation token distils on its class output.
    plain = DistillationLoss(base, Fixed(teach), config(kind, alpha, tau))(images, cls, labels)
    mixed = DistillationLoss(base, Fixed(teach), config(kind, alpha, tau))(
        images, (cls, cls), labels
    )
    assert torch.equal(plain, mixed)


def test_make_loss_wraps_the_recipes_base_loss_and_needs_its_teacher() -> None:
    training = load_recipe(recipe("t.pth")).training
    logits = torch.randn(4, 10)
    teach = torch.randn(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    loss = make_loss(training, soft_targets=False, teacher=Fixed(teach))
    smoothed = 0.5 * F.cross_entropy(logits, labels, label_smoothing=0.1)  # training's default
    expected = smoothed + 0.5 * F.cross_entropy(logits, teach.argmax(1))
    assert torch.allclose(loss(torch.zeros(4), logits, labels), expected)
    # Under mixup the base loss is timm's soft-target cross-entropy of the mixed targets.
    soft = torch.softmax(torch.randn(4, 10), 1)
    mixed = make_loss(training, soft_targets=True, teacher=Fixed(teach))
    expected = 0.5 * -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    expected = expected + 0.5 * F.cross_entropy(logits, teach.argmax(1))
    assert torch.allclose(mixed(torch.zeros(4), logits, soft), expected)
    with pytest.raises(ValueError, match="teacher"):
        make_loss(training, soft_targets=False)
    with pytest.raises(ValueError, match="teacher"):
        plain = load_recipe({"name": "p"}).training
        make_loss(plain, soft_targets=False, teacher=Fixed(teach))


def test_the_teacher_gets_no_gradient_and_stays_in_eval(tmp_path: Path) -> None:
    from sparsekit.train.data import build_data

    weights = teacher_file(tmp_path / "t.safetensors")
    teacher, notes = build_teacher(
        load_recipe(recipe(weights)).training.distillation,
        build_data("digits"),
        torch.device("cpu"),
    )
    assert not teacher.training and notes == []
    assert not any(p.requires_grad for p in teacher.parameters())
    student = torch.randn(4, 10, requires_grad=True)
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, config("soft"))(
        torch.randn(4, 1, 8, 8), student, torch.tensor([0, 1, 2, 3])
    )
    loss.backward()
    assert student.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_a_teacher_changes_the_run_and_alpha_zero_is_the_run_without(tmp_path: Path) -> None:
    plain = recipe("unused.pth", epochs=1)
    del plain["training"]["distillation"]
    run(plain, tmp_path / "plain")
    # The teacher: the run without distillation, trained on digits, read from its checkpoint.
    weights = tmp_path / "plain" / "checkpoint.pt"
    run(recipe(weights, epochs=1), tmp_path / "distilled")
    run(recipe(weights, epochs=1, alpha=0.0), tmp_path / "alpha0")
    without, with_teacher = epoch_losses(tmp_path / "plain"), epoch_losses(tmp_path / "distilled")
    assert all(abs(a - b) > 1e-3 for a, b in zip(without, with_teacher, strict=True))
    # Building the teacher draws no random number the run sees, and with alpha 0 its term adds
    # exact zeros: the very run without distillation, to the bit.
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "alpha0" / "checkpoint.pt")["model"]
    c = load_checkpoint(tmp_path / "distilled" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert not any("teacher" in key for key in c)  # the teacher is no part of the checkpoint


def test_a_distilled_student_trains_its_distillation_token_with_sparse_phases(
    tmp_path: Path, monkeypatch
) -> None:
    seen: list[bool] = []
    call = DistillationLoss.__call__

    def spy(self, images, outputs, targets):
        seen.append(isinstance(outputs, tuple) and len(outputs) == 2)
        return call(self, images, outputs, targets)

    monkeypatch.setattr(DistillationLoss, "__call__", spy)
    phases = [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "10 steps",
            "min_update_interval": "1 steps",
            "end": "80%",
            "targets": {"roles": ["qkv", "proj", "fc1", "fc2", "head"]},
        },
        {"kind": "token_select", "keep_ratio": 0.75, "before_block": 1},
    ]
    weights = teacher_file(tmp_path / "teacher.pth", wrap="model")  # a training checkpoint
    out = tmp_path / "run"
    summary = run(
        recipe(weights, epochs=1, phases=phases, type="soft", tau=3.0),
        out,
        model="deit_tiny_distilled_patch16_224",
    )
    assert len(seen) == 23 and all(seen)  # every training forward: (class, distillation) logits
    assert summary["val_acc"] > 0.15  # it learns (chance: 0.1)
    model = load_checkpoint(out / "checkpoint.pt")["model"]
    assert model["dist_token"].shape == (1, 1, 192)
    mask = load_checkpoint(out / "checkpoint.pt")["session"]["modifiers"][0]["state"]["masks"]
    assert mask["head_dist"].shape == mask["head"].shape  # both heads are the head role's
    result = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output


def test_resume_with_a_teacher_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    weights = teacher_file(tmp_path / "teacher.safetensors")
    phases = [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.6,
            "update_every": "7 steps",
            "min_update_interval": "1 steps",
        }
    ]
    data = recipe(weights, epochs=2, phases=phases, type="soft", tau=2.0, alpha=0.7)
    full = run(data, tmp_path / "full")
    assert run(data, tmp_path / "split", stop_after_epoch=1) == {"stopped_at_epoch": 1}
    resumed = run(data, tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    masks_a = a["session"]["modifiers"][0]["state"]["masks"]
    masks_b = b["session"]["modifiers"][0]["state"]["masks"]
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert full["val_acc"] == resumed["val_acc"]
    assert epoch_losses(tmp_path / "full") == epoch_losses(tmp_path / "split")


def test_a_cnn_teacher_of_other_channels_is_adapted(tmp_path: Path) -> None:
    """DeiT's teacher is a CNN (regnety_160): any timm model works; one without an image size
    takes none, and a first convolution for RGB is summed to the data's one channel, as timm
    adapts pretrained weights."""
    from sparsekit.train.data import build_data

    weights = tmp_path / "cnn.pth"
    torch.manual_seed(0)
    rgb = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3)
    torch.save(rgb.state_dict(), weights)
    cfg = Distillation(type="hard", teacher="test_resnet", teacher_weights=str(weights))
    teacher, notes = build_teacher(cfg, build_data("digits"), torch.device("cpu"))
    assert any("converted from 3 to 1 input channels" in line for line in notes), notes
    gray = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher(gray), rgb.eval()(gray.expand(-1, 3, -1, -1)), atol=1e-5)


def test_a_relative_teacher_path_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch
) -> None:
    from sparsekit.train.data import build_data

    teacher_file(tmp_path / "teacher.safetensors")
    monkeypatch.chdir(tmp_path)
    training = load_recipe(recipe("teacher.safetensors")).training
    teacher, _ = build_teacher(training.distillation, build_data("digits"), torch.device("cpu"))
    assert teacher.num_classes == 10


def apply(tmp_path: Path, data: dict, *args: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return runner.invoke(
        app,
        [
            "apply",
            str(path),
            "--model",
            "vit_tiny_patch16_224",
            "--data",
            "digits",
            "--model-arg",
            "depth=2",
            "--output",
            str(tmp_path / "out"),
            *args,
        ],
    )


def one_paragraph(result) -> str:
    assert "Traceback" not in result.output, result.output
    return re.sub(r"\s+", " ", result.output)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such teacher weights file"),
        ("damaged", "not a readable safetensors file"),
        ("pickled", "refused: it pickles Python objects"),
        ("unknown", "timm has no model named 'vit_tinny_patch16_224'"),
        ("classes", "predicts 5 classes, but the data has 10"),
        ("headless", "holds no classifier weights (head.weight)"),
        ("architecture", "do not fit teacher VisionTransformer"),
        ("denied", "training.distillation.teacher_args.pretrained: not a teacher argument"),
        ("patch", "Give the patch size it was trained with"),
    ],
)
def test_a_teacher_that_cannot_teach_is_a_clear_error(
    tmp_path: Path, case: str, message: str
) -> None:
    weights = tmp_path / "teacher.safetensors"
    distil: dict = {}
    if case == "damaged":
        weights.write_bytes(b"\x00" * 64)
    elif case == "pickled":
        weights = tmp_path / "teacher.pth"
        torch.save({"model": teacher_file(tmp_path / "x.safetensors")}, weights)  # a Path object
    elif case == "unknown":
        distil["teacher"] = "vit_tinny_patch16_224"
    elif case == "classes":
        teacher_file(weights, num_classes=5)
    elif case == "headless":
        teacher_file(weights, num_classes=0)
    elif case == "architecture":
        teacher_file(weights, depth=3)
    elif case == "denied":
        distil["teacher_args"] = {"depth": 2, "pretrained": True}
    elif case == "patch":
        distil["teacher_args"] = {"depth": 2, "patch_size": 16}
    if case not in ("missing", "damaged", "pickled", "classes", "headless", "architecture"):
        teacher_file(weights)
    result = apply(tmp_path, recipe(weights, **distil))
    assert result.exit_code == 1, result.output
    assert message in one_paragraph(result), result.output
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("type", "medium", "allowed values: hard, soft"),
        ("alpha", 1.5, "less than or equal to 1"),
        ("tau", 0, "greater than 0"),
        ("teacher_weights", "teacher.onnx", "weights file ending in .safetensors"),
        ("teacher_args", {"num_classes": 5}, "the data decides num_classes"),
        ("teacher_args", {"depth": [[2]]}, "depth=[[2]] is not a plain value"),
        ("teacher_args", {"mlp_ratio": float("nan")}, "NaN and infinity are refused"),
        ("teacher", "../x", "should match pattern"),
        ("teachr", "x", "unknown key; did you mean 'teacher'"),
    ],
)
def test_bad_distillation_fields_are_line_numbered(
    tmp_path: Path, field: str, value, message: str
) -> None:
    data = recipe("teacher.safetensors")
    data["training"]["distillation"][field] = value
    result = apply(tmp_path, data)
    assert result.exit_code == 2, result.output
    text = one_paragraph(result)
    assert re.search(rf"training\.distillation\.{field}(\.\w+)? \(line \d+\)", text), text
    assert message in text


def test_the_teacher_path_can_be_set_where_the_run_starts(tmp_path: Path) -> None:
    weights = teacher_file(tmp_path / "mine.safetensors")
    result = apply(
        tmp_path,
        recipe("/shared/teams/teacher.safetensors", epochs=1),
        "--set",
        f"training.distillation.teacher_weights={weights}",
    )
    assert result.exit_code == 0, result.output
    assert "supervises the student's class output" in one_paragraph(result)
    path = tmp_path / "recipe.yaml"
    result = runner.invoke(app, ["recipe", "show", str(path), "--dataset-size", "1437"])
    assert result.exit_code == 0, result.output
    shown = "distillation: hard (teacher's top class), alpha 0.5, teacher vit_tiny_patch16_224"
    assert shown in one_paragraph(result)


def test_every_distillation_field_is_documented_and_files_are_those_of_checkpoint() -> None:
    from sparsekit.models import WEIGHT_SUFFIXES
    from sparsekit.recipe.distillation import TEACHER_SUFFIXES

    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert "### training.distillation" in text
    assert [f for f in Distillation.model_fields if f"`{f}`" not in text] == []
    assert TEACHER_SUFFIXES == WEIGHT_SUFFIXES


def test_resume_refuses_a_teacher_file_that_changed(tmp_path: Path) -> None:
    """The recipe names the teacher's file, not its contents: the checkpoint holds a hash of
    the teacher's weights, and a resume with other weights at that path is refused."""
    from sparsekit.errors import SparsekitError

    weights = teacher_file(tmp_path / "teacher.safetensors")
    data = recipe(weights, epochs=2)
    assert run(data, tmp_path / "r", stop_after_epoch=1) == {"stopped_at_epoch": 1}
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["teacher_sha256"]
    torch.manual_seed(7)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TEACHER)
    save_file(other.state_dict(), str(weights))
    with pytest.raises(SparsekitError, match="are not those the run was trained with"):
        run(data, tmp_path / "r", resume=True)
