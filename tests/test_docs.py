"""The docs build strictly, document every recipe field, and their runnable examples run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    # The runnable examples are pulled into the pages by snippet lines; a mangled line would
    # leave the page without them and still build.
    site = tmp_path / "site"
    assert "own_loop_demo" in (site / "own_loop" / "index.html").read_text()
    assert "ddp_demo" in (site / "distributed" / "index.html").read_text()


def test_own_loop_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "own_loop.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0.8000 sparse" in result.stdout, result.stdout


def test_ddp_own_loop_example_runs_under_torchrun() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(ROOT / "docs" / "examples" / "own_loop_ddp.py"),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 2:") == 1, result.stdout  # rank 0 alone prints


def test_every_recipe_field_is_documented() -> None:
    """Each field of every recipe model, phase kinds included, appears in the recipe reference."""
    from sparsekit.recipe import schema

    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    models = [
        schema.Recipe, schema.Training, schema.Optimizer, schema.Schedule, schema.Targets,
        schema.TokenPlacement, schema.Data, *schema.PHASES,
    ]  # fmt: skip
    missing = [
        f"{model.__name__}.{field}"
        for model in models
        for field in model.model_fields
        if f"`{field}`" not in text
    ]
    assert not missing, f"fields missing from docs/recipes.md: {missing}"
    for kind in schema.PHASE_KINDS:
        assert f"### kind: {kind}" in text
