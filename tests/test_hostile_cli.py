"""Hostile command lines and damaged run folders, for every command: each either works or ends
with sparsekit's own paragraph (`error: ...`, exit code 1, or 2 for usage and recipes) or
click's usage message (exit code 2), never a traceback, a hang or a write outside its folder.

Derandomized like tests/test_hostile_recipes.py: CI tries the same inputs every run, so a
failure always reproduces; the session report prints how many were tried.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sparsekit.cli.main import app

TRIED: Counter = Counter()  # reported at the end of the test session (see conftest.py)
OUTCOMES: Counter = Counter()  # per command: ok, error, usage
runner = CliRunner()

RECIPE = {
    "name": "hostile",
    "training": {"epochs": 1, "batch_size": 64, "schedule": {"warmup": 0}},
    "phases": [
        {
            "kind": "head_prune_grow",
            "head_density": 0.5,
            "update_every": "2 steps",
            "min_update_interval": "1 steps",
        },
        {"kind": "token_select", "keep_ratio": 0.75},
    ],
}
MODEL = ["--model", "vit_tiny_patch16_224", "--data", "synthetic", "--model-arg", "depth=1"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A finished run (heads and tokens, so every kind of state is in it) and its export."""
    root = tmp_path_factory.mktemp("good")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = runner.invoke(app, ["apply", str(recipe), *MODEL, "--output", str(root / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(root / "run"), "-o", str(root / "export")])
    assert result.exit_code == 0, result.output
    user = root / "users-folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (root / "a-file").write_text("not a folder")
    return {
        "root": root,
        "recipe": recipe,
        "run": root / "run",
        "export": root / "export",
        "user": user,
        "file": root / "a-file",
    }


def check(args: list[str], kind: str) -> str:
    """Run the command; return 'ok', 'error' or 'usage'. Anything else fails the test."""
    outcome = _outcome(args)
    TRIED[kind] += 1
    OUTCOMES[f"{kind}: {outcome}"] += 1
    return outcome


def _outcome(args: list[str]) -> str:
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: {type(result.exception).__name__}") from result.exception
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 0:
        return "ok"
    assert result.exit_code in (1, 2), (args, result.exit_code, result.output)
    if "error:" in result.output:
        message = result.output.split("error:", 1)[1].strip()
        assert message and len(message) < 3000, (args, result.output)
        return "error"
    assert result.exit_code == 2 and "Error" in result.output, (args, result.output)  # click
    return "usage"


SETTINGS = settings(
    max_examples=int(os.environ.get("SPARSEKIT_HOSTILE_EXAMPLES", 100)),
    deadline=None,  # a valid combination trains a tiny model for one epoch
    derandomize=os.environ.get("SPARSEKIT_HOSTILE_RANDOM") is None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

STRINGS = [
    "", " ", "-", "--", "x", "0", "-1", "1e999", "nan", "∞", "ñ", "\u202e", "a" * 300,
    "../..", "/", "/proc/nope/x", "\x00", "!!python/object/apply:os.system ['true']",
    "!!timestamp 2001-12-14#x", "!!binary x", "[" * 200 + "]" * 200, "{a: [1, {b: 2}]}", "~",
]  # fmt: skip
INTS = ["-1", "0", "1", "2", "7", str(2**31), str(2**70), "1.5", "abc", ""]
strings = st.sampled_from(STRINGS)
ints = st.sampled_from(INTS)


def paths(good: dict[str, Path], tmp: Path) -> st.SearchStrategy[str]:
    """Paths a hostile user might give: files, folders that are not sparsekit's, missing ones,
    the run and the export themselves, and odd strings."""
    named = [str(good[k]) for k in ("run", "export", "user", "file", "recipe")]
    return st.sampled_from(
        [*named, str(tmp / "new"), str(tmp / "new" / "deeper"), "/", "/proc/nope", "\x00x", ""]
    )


MODEL_ARG_KEYS = [
    "depth", "embed_dim", "num_heads", "mlp_ratio", "act_layer", "qkv_bias", "class_token",
    "global_pool", "reg_tokens", "no_embed_class", "device", "pretrained_cfg_overlay",
    "checkpoint_path", "num_classes", "weight_init", "pos_embed", "img_size", "1x", "",
]  # fmt: skip
SET_PATHS = [
    "training.epochs", "training.batch_size", "training.optimizer.lr", "training.seed", "name",
    "phases[0].head_density", "phases[1].keep_ratio", "phases[9].x", "training", "phases",
    "phases[0].kind", "training.schedule.warmup", "a..b", "[0]",
]  # fmt: skip


@st.composite
def apply_args(draw, good: dict[str, Path], tmp: Path) -> list[str]:
    options = {
        "--img-size": ints,
        "--patch-size": ints,
        "--workers": st.sampled_from(["-1", "0", "1", str(10**9), "x"]),
        "--stop-after-epoch": st.sampled_from(["-1", "0", "1", "x"]),
        "--epochs": st.sampled_from(["-1", "0", "1", "100001", str(2**70), "x"]),
        "--batch-size": st.sampled_from(["-1", "0", "64", str(10**7), "x"]),
        "--lr": st.sampled_from(["nan", "inf", "-1", "0", "1e308", "1e-3", "x"]),
        "--device": st.sampled_from(
            ["meta", "mps", "cuda:99", "cuda:-1", "foo", "", "cpu", "cpu:0", "xpu", "auto"]
        ),
        "--data": st.sampled_from(["", "/", "/nonexistent", "digits", str(good["user"])]),
        "--output": paths(good, tmp),
        "--model": st.sampled_from(
            [
                *("", "nope", "resnet18", "deit_tiny", "deit_smal", "../x"),
                *(
                    "eva02_tiny_patch14_224",
                    "beit_base_patch16_224",
                    "swin_tiny_patch4_window7_224",
                ),
                "naflexvit_base_patch16_gap",
            ]
        ),
        "--checkpoint": paths(good, tmp)
        | st.just(str(good["export"] / "model.safetensors"))
        | st.just(str(good["file"].with_suffix(".safetensors"))),
        "--bad-images": st.sampled_from(["skip", "refuse", "x"]),
        "--set": st.builds(lambda p, v: f"{p}={v}", st.sampled_from(SET_PATHS), strings | ints),
        "--model-arg": st.builds(
            lambda k, v: f"{k}={v}", st.sampled_from(MODEL_ARG_KEYS), strings | ints
        ),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4))
    args = []
    for option in chosen:
        args += [option, draw(options[option])]
    if draw(st.booleans()):
        args.append("--resume")
    return args


def test_hostile_apply_arguments(good: dict[str, Path], tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("apply")

    @SETTINGS
    @given(args=apply_args(good, tmp))
    def attempt(args: list[str]) -> None:
        out = ["--output", str(tmp / f"run{TRIED['apply'] % 7}")]
        # Options given twice: the last one counts, so hostile ones come after the base ones;
        # one epoch at most keeps a valid combination cheap.
        full = ["apply", str(good["recipe"]), *MODEL, *out, *args, "--stop-after-epoch", "1"]
        check(full, "apply")
        assert (good["user"] / "notes.txt").read_text() == "mine"  # the user's folder untouched
        assert sorted(p.name for p in good["user"].iterdir()) == ["notes.txt"]

    attempt()


def test_hostile_export_inspect_report_recipe_arguments(
    good: dict[str, Path], tmp_path_factory
) -> None:
    tmp = tmp_path_factory.mktemp("others")
    path = paths(good, tmp)
    commands = st.one_of(
        st.builds(
            lambda run, out, mode: ["export", run, "-o", out, mode],
            path,
            path,
            st.sampled_from(["--compact", "--masked"]),
        ),
        st.builds(
            lambda target, extra: ["inspect", target, *extra],
            path,
            st.lists(st.sampled_from(["--json", "--convention", "paper", "runtime", "x"])),
        ),
        st.builds(
            lambda model, recipe, option, value: [
                "inspect",
                "--model",
                model,
                "--recipe",
                recipe,
                option,
                value,
            ],
            st.sampled_from(
                [
                    "deit_tiny",
                    "nope",
                    "",
                    "resnet18",
                    "vit_giant_patch14_224",
                    "eva02_tiny_patch14_224",
                ]
            ),
            path,
            st.sampled_from(
                ["--img-size", "--patch-size", "--num-classes", "--dataset-size", "--set"]
            ),
            strings | ints,
        ),
        st.builds(lambda runs, out: ["report", *runs, "-o", out], st.lists(path, max_size=3), path),
        st.builds(
            lambda target, extra: ["bench", target, "--iters", "1", "--warmup", "0", *extra],
            path,
            st.lists(
                st.sampled_from(
                    [
                        "--batch-size",
                        "0",
                        "1",
                        "-3",
                        "99999",
                        "--dtype",
                        "float16",
                        "x",
                        "--threads",
                        "--no-onnx",
                        "--json",
                        "--device",
                        "meta",
                    ]
                ),
                max_size=4,
            ),  # fmt: skip
        ),
        st.builds(
            lambda target, data, extra: ["eval", target, "--data", data, *extra],
            path,
            path,
            st.lists(
                st.sampled_from(["--batch-size", "0", "2", "--json", "--workers"]), max_size=3
            ),
        ),
        st.builds(
            lambda sub, file, extra: ["recipe", sub, file, *extra],
            st.sampled_from(["validate", "show"]),
            path,
            st.lists(st.sampled_from(["--model", "deit_tiny", "nope", "--img-size", "0", "3"])),
        ),
    )

    @SETTINGS
    @given(args=commands)
    def attempt(args: list[str]) -> None:
        check(args, args[0])
        assert sorted(p.name for p in good["user"].iterdir()) == ["notes.txt"]

    attempt()


# --- damaged run folders ------------------------------------------------------------------
RUN_FILES = ["run.json", "recipe.yaml", "checkpoint.pt", "metrics.jsonl", "summary.json",
             "val_samples.safetensors", ".sparsekit-run"]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def damage(folder: Path, file: str, how: str, data, seed: int) -> None:
    """Damage one file of a copied run folder the way disks, crashes and people do."""
    path = folder / file
    rng = random.Random(seed)
    raw = path.read_bytes() if path.is_file() else b""
    if how == "delete":
        path.unlink(missing_ok=True)
    elif how == "truncate":
        path.write_bytes(raw[: rng.randrange(len(raw) + 1)])
    elif how == "flip" and raw:
        at = rng.randrange(len(raw))
        path.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :])
    elif how == "json":
        path.write_text(json.dumps(data))
    elif how == "edit-json" and file in ("run.json", "summary.json"):
        record = json.loads(raw)
        key = rng.choice(sorted(record))
        record[key] = data
        path.write_text(json.dumps(record))
    elif how == "edit-line" and file == "metrics.jsonl":
        lines = raw.decode().splitlines()
        lines[rng.randrange(len(lines))] = json.dumps(data)
        path.write_text("\n".join(lines) + "\n")
    elif how == "folder":
        path.unlink(missing_ok=True)
        path.mkdir()
    elif how == "recipe-edit" and file == "recipe.yaml":
        path.write_text(raw.decode().replace("head_density: 0.5", "head_density: 0.75"))
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))


def test_damaged_run_folders(good: dict[str, Path], tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("damaged")

    @SETTINGS
    @given(
        file=st.sampled_from(RUN_FILES),
        how=st.sampled_from(
            [
                "delete",
                "truncate",
                "flip",
                "json",
                "edit-json",
                "edit-line",
                "folder",
                "recipe-edit",
                "garbage",
            ]
        ),  # fmt: skip
        data=json_values,
        seed=st.integers(0, 2**32 - 1),
        command=st.sampled_from(["export", "inspect", "report", "resume"]),
    )
    def attempt(file: str, how: str, data, seed: int, command: str) -> None:
        folder = tmp / "run"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(tmp / "out", ignore_errors=True)
        shutil.copytree(good["run"], folder)
        damage(folder, file, how, data, seed)
        args = {
            "export": ["export", str(folder), "-o", str(tmp / "out")],
            "inspect": ["inspect", str(folder)],
            "report": ["report", str(folder), "-o", str(tmp / "out")],
            "resume": [
                "apply",
                str(folder / "recipe.yaml"),
                *MODEL,
                "--output",
                str(folder),
                "--resume",
            ],  # fmt: skip
        }[command]
        check(args, f"damaged run folder, {command}")

    attempt()


# --- damaged exports ----------------------------------------------------------------------
def damage_export(folder: Path, how: str, data, seed: int) -> None:
    """Damage an export: its bytes, its manifest (re-saved with the same tensors), or its
    side files."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    rng = random.Random(seed)
    if how in ("manifest-value", "manifest-drop"):
        with safe_open(str(file), "pt") as f:
            manifest = json.loads(f.metadata()["sparsekit"])
        node, key = manifest, None
        while True:  # walk down to a random field
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys)
            if not isinstance(node[key], dict | list) or not node[key] or rng.random() < 0.4:
                break  # an empty container is a field to damage, not one to walk into
            node = node[key]
        if key is not None:
            if how == "manifest-drop":
                del node[key]
            else:
                node[key] = data
        save_file(load_file(str(file)), str(file), metadata={"sparsekit": json.dumps(manifest)})
    elif how == "metadata-garbage":
        save_file(load_file(str(file)), str(file), metadata={"sparsekit": str(data)})
    elif how == "side-files":
        (folder / "config.json").write_text(json.dumps(data))
        (folder / "recipe.yaml").unlink()
    else:
        damage(folder, "model.safetensors", how, data, seed)


def test_damaged_exports(good: dict[str, Path], tmp_path_factory) -> None:
    tmp = tmp_path_factory.mktemp("exports")

    @SETTINGS
    @given(
        how=st.sampled_from(
            [
                "manifest-value",
                "manifest-drop",
                "metadata-garbage",
                "side-files",
                "truncate",
                "flip",
                "garbage",
                "delete",
            ]
        ),  # fmt: skip
        data=json_values,
        seed=st.integers(0, 2**32 - 1),
        command=st.sampled_from(["inspect", "replace", "bench"]),
    )
    def attempt(how: str, data, seed: int, command: str) -> None:
        folder = tmp / "export"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good["export"], folder)
        damage_export(folder, how, data, seed)
        args = {
            "inspect": ["inspect", str(folder)],
            "replace": ["export", str(good["run"]), "-o", str(folder)],  # over a damaged one
            "bench": ["bench", str(folder), "--batch-size", "1", "--iters", "1", "--no-onnx"],
        }[command]
        check(args, f"damaged export, {command}")

    attempt()


def test_hostile_cli_input_count_is_large() -> None:
    """Runs last in this module: hundreds of hostile inputs were tried (see the session report),
    and the valid path was among them."""
    if sum(TRIED.values()) == 0:
        pytest.skip("run together with the hypothesis tests of this module")
    assert sum(TRIED.values()) >= 300, TRIED
    assert OUTCOMES["apply: ok"] and OUTCOMES["apply: error"] and OUTCOMES["apply: usage"], OUTCOMES
