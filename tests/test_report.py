"""`sparsekit report`: PNGs and a self-contained HTML page from run folders alone."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from sparsekit import load_recipe
from sparsekit.cli.main import app
from sparsekit.train.trainer import RunConfig, train

RECIPE = {
    "name": "r",
    "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
    "phases": [
        {"kind": "unstructured_dst", "sparsity": 0.5, "update_every": "3 steps"},
        {"kind": "head_prune_grow", "head_density": 0.67, "update_every": "3 steps"},
    ],
}


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_renders_every_run(tmp_path: Path) -> None:
    runs = []
    for name, phases in (("sparse", RECIPE["phases"]), ("dense", [])):
        config = RunConfig(
            model="vit_tiny_patch16_224", data="synthetic", output=tmp_path / name,
            extra={"depth": 2},
        )  # fmt: skip
        train(load_recipe({**RECIPE, "phases": phases}), config, Console(quiet=True))
        runs.append(str(tmp_path / name))
    result = CliRunner().invoke(app, ["report", *runs, "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["curves.png", "heads-sparse.png", "index.html", "sparsity.png", "tradeoff.png"]
    page = (tmp_path / "report" / "index.html").read_text()
    for name in ("sparse", "dense"):
        assert re.search(rf"<td>{name}</td>", page)  # every run is listed
    parser = Images()
    parser.feed(page)
    assert len(parser.sources) == 4
    for source in parser.sources:  # embedded, decodable, and not blank
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        pixels = np.asarray(image.convert("L"), dtype=float)
        assert image.size[0] > 100 and pixels.std() > 1.0


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no metrics.jsonl" in result.output
