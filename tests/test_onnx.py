"""ONNX export: the compacted model with its token selectors, run in ONNX Runtime on real photos
(scikit-learn's sample images) at two batch sizes and matched against PyTorch; token selection
is TopK + Gather in the graph; what cannot be exported, and damaged exports, are refused
without leaving a file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparsekit import load_recipe  # noqa: E402
from sparsekit.analysis.cost import model_cost  # noqa: E402
from sparsekit.cli.main import app  # noqa: E402
from sparsekit.errors import SparsekitError  # noqa: E402
from sparsekit.export import export_model, export_run, load_compact  # noqa: E402
from sparsekit.export.baked import baked_model  # noqa: E402
from sparsekit.export.onnx import OPSET, export_onnx, relative_difference  # noqa: E402
from sparsekit.models import ModelSpec, create_model  # noqa: E402
from sparsekit.run_folder.trained_run import open_run  # noqa: E402
from sparsekit.support import end_to_end, sample_photos, support_of  # noqa: E402
from sparsekit.surgery.geometry import input_size  # noqa: E402
from sparsekit.surgery.tokens import Placement, TokenSelection, kept_count  # noqa: E402
from sparsekit.train.trainer import RunConfig, train  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    """`sparsekit ARGS...`: exit code and output with rich's line wrapping undone."""
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def photos(model: torch.nn.Module, count: int) -> np.ndarray:
    """`count` crops of scikit-learn's two sample photos (a temple in China, a flower), each
    resized to the model's input and normalised with its timm mean and std: (count, C, H, W)."""
    from sklearn.datasets import load_sample_images
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    channels, height, width = input_size(model)
    images = load_sample_images().images  # two 427 x 640 RGB photos
    out = []
    for i in range(count):
        image = images[i % 2]
        side = min(image.shape[:2]) - 40 * (i // 2)  # a different crop each round
        top = (image.shape[0] - side) // 2
        left = (image.shape[1] - side) * (i // 2 % 3) // 2
        crop = Image.fromarray(image[top : top + side, left : left + side])
        crop = crop.resize((width, height), Image.BICUBIC)
        pixels = np.asarray(crop, dtype=np.float32) / 255.0
        mean = np.asarray(config["mean"], dtype=np.float32)
        std = np.asarray(config["std"], dtype=np.float32)
        out.append(((pixels - mean) / std).transpose(2, 0, 1)[:channels])
    return np.stack(out)


def check_matches(onnx_file: Path, model: torch.nn.Module, batches=(1, 6)) -> None:
    """ONNX Runtime (CPU) on real photos at each batch size equals the PyTorch model."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    for batch in batches:
        x = photos(model, batch)
        with torch.no_grad():
            expected = model(torch.from_numpy(x))
        got = torch.from_numpy(session.run(None, {"pixel_values": x})[0])
        assert got.shape == expected.shape == (batch, model.num_classes)
        assert relative_difference(got, expected) < TOLERANCE, batch
        assert expected.abs().max() > 1e-3  # a real output, not zeros matching zeros


def op_types(onnx_file: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(onnx_file)).graph.node}


def initializer_elements(onnx_file: Path) -> int:
    graph = onnx.load(str(onnx_file)).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer)


# --- a compacted export whose blocks differ: heads 2 and 1 of 3, other MLP widths ----------


def uneven_export(out: Path, compact: bool = True) -> Path:
    """An export of a tiny ViT with per-block head counts and MLP widths and a token selector
    before block 1 (8 of 16 patches kept)."""
    spec = ModelSpec("vit_tiny_patch16_224", SMALL)
    torch.manual_seed(0)
    model = create_model(spec)
    placements = [Placement(1, 0.5)]
    TokenSelection(model, placements)
    units = {
        "blocks.0.attn": torch.tensor([True, False, True]),
        "blocks.1.attn": torch.tensor([False, True, False]),
        "blocks.0.mlp": torch.arange(768) % 2 == 0,  # 384 of 768
        "blocks.1.mlp": torch.arange(768) % 3 == 0,  # 256
    }
    export_model(spec, model.state_dict(), out, unit_masks=units, placements=placements,
                 compact=compact)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Path]:
    """The export and its ONNX conversion through the CLI (`export EXPORT --format onnx`)."""
    root = tmp_path_factory.mktemp("uneven")
    export = uneven_export(root / "export")
    code, output = invoke("export", str(export), "--format", "onnx")
    assert code == 0, output
    assert f"opset {OPSET}" in output and "TopK" in output
    return export, root / "export-onnx" / "model.onnx"  # the default: beside the export


def test_compacted_export_matches_pytorch_on_real_photos(uneven) -> None:
    export, file = uneven
    model = load_compact(export)
    assert [b.attn.num_heads for b in model.blocks] == [2, 1]
    assert [b.mlp.fc2.in_features for b in model.blocks] == [384, 256]
    check_matches(file, model)
    # The graph's batch is symbolic; the rest is the model's input.
    dims = onnx.load(str(file)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    # The compacted weights, not the full-size ones: pruned units are absent from the graph.
    compact_params = model_cost(model).params
    dense_params = model_cost(create_model(ModelSpec("vit_tiny_patch16_224", SMALL))).params
    assert abs(initializer_elements(file) - compact_params) < 0.01 * compact_params
    assert initializer_elements(file) < 0.75 * dense_params
    assert sorted(p.name for p in file.parent.iterdir()) == ["model.onnx"]


def test_token_selection_is_topk_and_gather_in_the_graph(uneven, tmp_path) -> None:
    _, file = uneven
    graph = onnx.load(str(file)).graph
    ops = {node.op_type for node in graph.node}
    assert "TopK" in ops and ops & {"GatherElements", "Gather"}
    assert {op.domain for op in onnx.load(str(file)).opset_import} >= {""}
    assert [op.version for op in onnx.load(str(file)).opset_import if op.domain == ""] == [OPSET]
    # The selector keeps k = 8 of the 16 patches: one TopK asks for exactly that many.
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    topk = [n for n in graph.node if n.op_type == "TopK"]  # the selection, and its sort
    assert all(n.input[1] in constants for n in topk)  # k constant, as TensorRT needs
    largest = [next(a.i for a in n.attribute if a.name == "largest") for n in topk]
    assert sorted(largest) == [0, 1]
    assert [constants[n.input[1]].tolist() for n in topk] == [[kept_count(16, 0.5)]] * 2
    assert "GatherElements" in ops  # the kept tokens' features, gathered by index
    # Without a selector there is no TopK: it is the selection, not something of timm's.
    plain = create_model(ModelSpec("vit_tiny_patch16_224", SMALL)).eval()
    bare = export_onnx(plain, tmp_path / "plain.onnx")
    assert "TopK" not in op_types(bare)
    check_matches(bare, plain, batches=(3,))


def test_masked_export_is_compacted_and_replaces_the_earlier_onnx(uneven, tmp_path) -> None:
    export, file = uneven
    masked = uneven_export(tmp_path / "masked", compact=False)
    out = file.parent  # the earlier conversion's folder: sparsekit's, so it is replaced
    before = file.stat().st_mtime_ns
    code, output = invoke("export", str(masked), "--format", "onnx", "-o", str(out))
    assert code == 0, output
    assert file.stat().st_mtime_ns != before
    assert "3 heads in 2 blocks" in output  # 2 + 1 of 3 + 3: the zero heads removed
    check_matches(file, load_compact(export), batches=(2,))
    compact_params = model_cost(load_compact(export)).params
    assert abs(initializer_elements(file) - compact_params) < 0.01 * compact_params
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- a real run of the built-in trainer --------------------------------------------------------

RECIPE = {
    "name": "onnx",
    "training": {"epochs": 1, "batch_size": 64, "schedule": {"warmup": 0}},
    "phases": [
        {
            "kind": "unstructured_dst",
            "sparsity": 0.5,
            "update_every": "2 steps",
            "min_update_interval": "1 steps",
        },
        {
            "kind": "head_prune_grow",
            "head_density": 0.67,
            "mlp_density": 0.5,
            "update_every": "2 steps",
            "min_update_interval": "1 steps",
        },
        {"kind": "token_select", "keep_ratio": 0.5},
    ],
}


def test_a_trained_run_exports_to_onnx_through_the_cli(tmp_path) -> None:
    run = tmp_path / "run"
    config = RunConfig(model="deit_tiny", data="synthetic", output=run, extra={"depth": 2})
    train(load_recipe(RECIPE), config, Console(quiet=True))
    code, output = invoke("export", str(run), "--format", "onnx")
    assert code == 0, output
    file = run / "export-onnx" / "model.onnx"
    opened = open_run(run)
    model = baked_model(opened.spec, opened.weights, opened.masks, opened.unit_masks,
                        opened.placements)  # fmt: skip
    assert "TopK" in op_types(file)
    check_matches(file, model)
    # The same as the safetensors export of the run, loaded back.
    export_run(run, tmp_path / "export")
    check_matches(file, load_compact(tmp_path / "export"), batches=(4,))
    record = {p.key: p.value for p in onnx.load(str(file)).metadata_props}["sparsekit"]
    assert '"token_selection": [{"before_block": 0, "keep_ratio": 0.5}]' in record


# --- refusals ------------------------------------------------------------------------------


def test_missing_onnx_packages_name_the_extra_and_write_nothing(tmp_path, monkeypatch) -> None:
    export = uneven_export(tmp_path / "e")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails
    out = tmp_path / "onnx"
    code, output = invoke("export", str(export), "--format", "onnx", "-o", str(out))
    assert code == 1, output
    assert "onnxscript" in output and "pip install 'sparsekit[onnx]'" in output
    assert "Traceback" not in output and not out.exists()


def test_a_model_the_exporter_cannot_convert_is_refused_without_a_file(tmp_path) -> None:
    class MedianCentred(torch.nn.Module):
        """A user's own layer on the logits: torch's exporter has no ONNX function for
        aten.median."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.median(dim=1, keepdim=True).values

    model = create_model(ModelSpec("vit_tiny_patch16_224", SMALL)).eval()
    model.head = torch.nn.Sequential(model.head, MedianCentred())
    with pytest.raises(SparsekitError, match="cannot convert.*aten.median.*Nothing was written"):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary one
    code, output = invoke("export", str(tmp_path / "nothing"), "--format", "onnx")
    assert code == 1 and "not a finished sparsekit run folder" in output
    assert list(tmp_path.iterdir()) == []


def test_damaged_export_and_masked_option_are_refused(tmp_path) -> None:
    export = uneven_export(tmp_path / "e")
    data = bytearray((export / "model.safetensors").read_bytes())
    data[-9] ^= 0xFF  # one byte of the last tensor
    (export / "model.safetensors").write_bytes(bytes(data))
    out = tmp_path / "onnx"
    code, output = invoke("export", str(export), "--format", "onnx", "-o", str(out))
    assert code == 1 and "modified or damaged" in output, output
    assert not out.exists()
    code, output = invoke("export", str(export), "--format", "onnx", "--masked")
    assert code == 2 and "compacted model" in output
    code, output = invoke("export", str(export), "--format", "onnx", "--best")
    assert code == 2 and "run folder" in output


def test_a_folder_of_other_files_is_refused_untouched(uneven, tmp_path) -> None:
    export, _ = uneven
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.onnx").write_bytes(b"someone else's model")
    code, output = invoke("export", str(export), "--format", "onnx", "-o", str(tmp_path / "mine"))
    assert code == 1 and "not an earlier sparsekit ONNX export" in output
    assert (tmp_path / "mine" / "model.onnx").read_bytes() == b"someone else's model"
    # The library call is as careful with a file.
    with pytest.raises(SparsekitError, match="not an ONNX file sparsekit wrote"):
        export_onnx(load_compact(export), tmp_path / "mine" / "model.onnx")


# One model per family and attention class beyond timm's `Attention` (the tests above): what
# the support matrix trained, exported compacted and loaded back, in ONNX Runtime.
FAMILIES = [
    "eva02_tiny_patch14_224",  # EvaAttention, rotary embeddings, SwiGLU, token selection
    "vit_base_patch16_rope_mixed_224",  # AttentionRope with per-head rope, token selection
    "beit_base_patch16_224",  # relative position bias table per head
    "vit_relpos_base_patch16_rpn_224",  # RelPosMlp bias, res-post-norm blocks
    "vit_small_r26_s32_224",  # hybrid: a ResNet stem
    "naflexvit_base_patch16_gap",  # NaFlexViT on plain images
    "vit_dwee_patch16_reg1_gap_256",  # DiffAttention, registers, token selection
    "vit_pwee_patch16_reg1_gap_256",  # parallel scaling blocks: heads and neurons in one in_proj
    "vit_dpwee_patch16_reg1_gap_256",  # the same, differential heads and a fused out_proj
    "vit_small_patch16_18x2_224",  # two attentions and two MLPs per block, pruned apart
]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_to_onnx(name: str, tmp_path) -> None:
    support = support_of(name)
    _, loaded = end_to_end(support, sample_photos())
    export_onnx(loaded, tmp_path / "model.onnx")
    check_matches(tmp_path / "model.onnx", loaded, batches=(1, 3))
