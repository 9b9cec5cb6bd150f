"""`sparsekit report`: PNGs and a self-contained HTML page from run folders alone."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_vit
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from sparsekit import load_recipe
from sparsekit.analysis.token_map import selectors_passed
from sparsekit.cli.main import app
from sparsekit.surgery.tokens import Placement, TokenSelection, kept_count, selection_of
from sparsekit.train.trainer import RunConfig, train

RECIPE = {
    "name": "r",
    "training": {"epochs": 2, "batch_size": 32, "schedule": {"warmup": 0}},
    "phases": [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "3 steps",
            "min_update_interval": "1 steps",
        },
        {
            "kind": "head_prune_grow",
            "head_density": 0.67,
            "update_every": "3 steps",
            "min_update_interval": "1 steps",
        },
    ],
}


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


TOKENS = {"kind": "token_select", "placements": [
    {"before_block": 0, "keep_ratio": 0.75}, {"before_block": 1, "keep_ratio": 0.5},
]}  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two finished runs (sparse with heads and tokens, and dense) and their report."""
    tmp_path = tmp_path_factory.mktemp("report")
    runs = []
    for name, phases in (("sparse", [*RECIPE["phases"], TOKENS]), ("dense", [])):
        config = RunConfig(
            model="vit_tiny_patch16_224", data="synthetic", output=tmp_path / name,
            extra={"depth": 2},
        )  # fmt: skip
        train(load_recipe({**RECIPE, "phases": phases}), config, Console(quiet=True))
        runs.append(str(tmp_path / name))
    result = CliRunner().invoke(app, ["report", *runs, "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    return tmp_path / "report", ["sparse", "dense"]


def test_report_renders_every_run(report: tuple[Path, list[str]]) -> None:
    folder, names = report
    files = sorted(p.name for p in folder.iterdir())
    assert files == [
        "curves.png", "heads-sparse.png", "index.html", "layers-sparse.png", "sparsity.png",
        "tokens-sparse.png", "tradeoff.png",
    ]  # fmt: skip
    page = (folder / "index.html").read_text()
    for name in names:
        assert re.search(rf"<td>{name}</td>", page)  # every run is listed
    parser = Images()
    parser.feed(page)
    assert len(parser.sources) == 6
    for source in parser.sources:  # embedded, decodable, and not blank
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        pixels = np.asarray(image.convert("L"), dtype=float)
        assert image.size[0] > 100 and pixels.std() > 1.0


def test_report_opens_in_a_headless_browser(report: tuple[Path, list[str]]) -> None:
    """Chromium loads the page and every PNG: each image decodes to a real size, the page
    lists every run, and what it paints is not blank."""
    folder, names = report
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto((folder / "index.html").as_uri())
        sizes = page.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(sizes) == 6
        assert all(done and w > 100 and h > 100 for done, w, h in sizes), sizes
        runs = page.evaluate(
            "Array.from(document.querySelectorAll('tr td:first-child')).map(c => c.textContent)"
        )
        assert runs == names
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"))
        assert shot.shape[0] > 800 and shot.std() > 5.0
        for png in sorted(folder.glob("*.png")):
            page.goto(png.as_uri())
            width = page.evaluate("document.images.length && document.images[0].naturalWidth")
            assert width > 100, png.name


@contextlib.contextmanager
def headless_browser():
    """Chromium driven by Playwright. CI installs both and sets SPARSEKIT_REQUIRE_BROWSER, so
    there a missing browser fails the test; elsewhere it is skipped."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        if os.environ.get("SPARSEKIT_REQUIRE_BROWSER"):
            pytest.fail("chromium and playwright are required (SPARSEKIT_REQUIRE_BROWSER is set)")
        pytest.skip("no chromium or playwright here (CI installs both)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
            ],
        )  # fmt: skip
        try:
            yield browser
        finally:
            browser.close()


def test_token_map_names_the_patches_each_selector_keeps() -> None:
    """The map's "kept" patches are the top-k of the scorer on the embedded patches, and the
    second selector keeps a subset of the first's."""
    torch.manual_seed(0)
    model = tiny_vit(depth=2).eval()
    TokenSelection(model, [Placement(0, 0.75), Placement(1, 0.5)])
    images = torch.randn(3, 3, 32, 32)
    passed = selectors_passed(model, images)
    patches = model.patch_embed.num_patches
    assert passed.shape == (3, patches)
    first, second = kept_count(patches, 0.75), kept_count(kept_count(patches, 0.75), 0.5)
    assert ((passed >= 1).sum(1) == first).all() and ((passed == 2).sum(1) == second).all()
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        scores = model.token_selectors["0"](x[:, model.num_prefix_tokens :])
    expected = torch.zeros_like(passed, dtype=torch.bool).scatter_(
        1, scores.topk(first, dim=1).indices, True
    )
    assert torch.equal(passed >= 1, expected)
    assert selection_of(model).trace is None  # tracing is switched off again


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no metrics.jsonl" in result.output


def test_report_replaces_only_an_earlier_report(
    report: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """-o follows the export's rule: a folder of the user's files is refused untouched; an
    earlier sparsekit report is replaced, its stale plots removed."""
    runs = [str(report[0].parent / name) for name in report[1]]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("<html>my own page</html>")
    (mine / "plot.png").write_bytes(b"mine")
    result = CliRunner().invoke(app, ["report", *runs, "-o", str(mine)])
    assert result.exit_code == 1 and "not an earlier sparsekit report" in result.output
    assert (mine / "index.html").read_text() == "<html>my own page</html>"
    assert sorted(p.name for p in mine.iterdir()) == ["index.html", "plot.png"]

    again = tmp_path / "again"
    shutil.copytree(report[0], again)
    (again / "heads-old-run.png").write_bytes(b"a plot of a run no longer reported")
    result = CliRunner().invoke(app, ["report", runs[1], "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert not (again / "heads-old-run.png").exists()
    assert not (again / "heads-sparse.png").exists()  # only the dense run now


def test_report_refuses_damaged_run_files_by_name(
    report: tuple[Path, list[str]], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(report[0].parent / "sparse", run)
    (run / "summary.json").write_text('{"model": "x", "val_acc": "high"}')
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "summary.json is damaged or was edited" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "mask_update", "epoch": 2, "heads": {"blocks.0.attn": [99999999]}}\n')
    result = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "out")])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "metrics.jsonl is damaged" in message and "line" in message
