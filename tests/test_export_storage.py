"""Compressed storage of sparse tensors (values plus a packed bitmask): bit-exact round trips at
several sparsities and dtypes, auto keeping dense tensors dense, smaller files, the hash
catching edited values, mask bits and shapes, damaged compressed tensors refused (exit 1 through
the CLI), and format-2 exports (all dense) still loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sparsekit.cli.main import app
from sparsekit.errors import SparsekitError
from sparsekit.export import export_model, load_compact, read_export
from sparsekit.export.manifest import ADDED_FIELDS, Manifest, canonical_json
from sparsekit.export.sparse_storage import MASK, VALUES, pack, unpack
from sparsekit.hashing import tensors_sha256
from sparsekit.models import ModelSpec, create_model
from sparsekit.surgery.masks import topk_mask

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
runner = CliRunner()


def bits(t: torch.Tensor) -> torch.Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.reshape(-1).view(width)


def sparse_tensor(shape, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    keep = torch.rand(shape, generator=g) >= sparsity
    t = t * keep
    flat = t.view(-1)
    flat[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 0.0]).to(dtype)  # odd values kept
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_values_and_mask_give_the_tensor_back_bit_for_bit(dtype, sparsity) -> None:
    tensor = sparse_tensor((37, 13), sparsity, dtype)  # 481 positions: the last byte is padded
    stored, shapes, loaded = pack({"w": tensor}, "auto")
    back = unpack(Path("f"), stored, shapes)["w"]
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(bits(back), bits(loaded["w"]))  # what the hash is computed over
    if sparsity < 0.5:
        assert shapes == {} and torch.equal(bits(back), bits(tensor))  # dense: as it was
        return
    assert shapes == {"w": [37, 13]}
    # Bit for bit, NaN and inf included; -0.0 is the zero it is equal to.
    expected = torch.where(tensor == 0, torch.zeros((), dtype=dtype), tensor)
    assert torch.equal(bits(back), bits(expected))
    assert torch.isnan(back.view(-1)[1]) and bits(back)[1] == bits(tensor)[1]
    values, mask = stored["w" + VALUES], stored["w" + MASK]
    assert values.dtype == dtype and values.dim() == 1
    assert mask.dtype == torch.uint8 and mask.numel() == (37 * 13 + 7) // 8
    assert values.numel() == int(torch.count_nonzero(tensor))


def test_the_mask_is_little_endian_bits_of_row_major_positions() -> None:
    tensor = torch.zeros(2, 8)
    tensor[0, 0], tensor[1, 1], tensor[1, 7] = 1.0, 2.0, 3.0  # positions 0, 9, 15
    stored = pack({"w": tensor.repeat(4, 1)}, "auto").stored  # 64 positions: worth compressing
    assert stored["w" + MASK][:2].tolist() == [0b00000001, 0b10000010]
    assert stored["w" + VALUES][:3].tolist() == [1.0, 2.0, 3.0]


def test_auto_keeps_what_compression_would_not_shrink() -> None:
    tensors = {
        "dense": torch.randn(64, 64),
        "slightly_sparse": sparse_tensor((64, 64), 0.02, torch.float32),  # 2% zeros: no gain
        "ints": torch.zeros(64, 64, dtype=torch.int64),
        "sparse": sparse_tensor((64, 64), 0.5, torch.float32),
    }
    stored, shapes, _ = pack(tensors, "auto")
    assert list(shapes) == ["sparse"]
    assert stored["dense"] is tensors["dense"] and stored["ints"] is tensors["ints"]
    stored, shapes, _ = pack(tensors, "dense")
    assert shapes == {} and stored.keys() == tensors.keys()
    with pytest.raises(SparsekitError, match="not an export storage"):
        pack(tensors, "zip")
    with pytest.raises(SparsekitError, match="reserves"):
        pack({"a:values": torch.zeros(3)}, "auto")


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks of the largest weights of every 2-D block weight, at `sparsity`."""
    return {
        name: topk_mask(p.abs(), round((1 - sparsity) * p.numel()))
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and p.dim() == 2
    }


def masked_export(tmp: Path, sparsity: float, storage: str, compact: bool = False) -> Path:
    spec = ModelSpec("deit_tiny_patch16_224", SMALL)
    torch.manual_seed(0)
    model = create_model(spec)
    out = tmp / f"{storage}-{sparsity}-{compact}"
    masks = magnitude_masks(model, sparsity)
    export_model(spec, model.state_dict(), out, masks, compact=compact, storage=storage)
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_compressed_exports_load_equal_to_dense_ones_and_are_smaller(tmp_path, sparsity) -> None:
    auto, dense = (
        masked_export(tmp_path, sparsity, "auto"),
        masked_export(tmp_path, sparsity, "dense"),
    )
    m_auto, t_auto = read_export(auto)
    m_dense, t_dense = read_export(dense)
    assert m_dense.compressed == {}
    assert {f"blocks.{i}.{k}.weight" for i in (0, 1) for k in ("attn.qkv", "mlp.fc1")} <= set(
        m_auto.compressed
    )
    assert t_auto.keys() == t_dense.keys()
    assert all(torch.equal(t_auto[k], t_dense[k]) for k in t_auto)  # -0.0 == 0.0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_compact(auto)(x), load_compact(dense)(x))
    ratio = (auto / "model.safetensors").stat().st_size / (
        dense / "model.safetensors"
    ).stat().st_size
    assert ratio < (0.62 if sparsity == 0.5 else 0.2)


def test_a_compact_export_is_compressed_too(tmp_path) -> None:
    out = masked_export(tmp_path, 0.7, "auto", compact=True)
    manifest, _ = read_export(out)
    assert manifest.compact and manifest.compressed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert any(k.endswith(MASK) for k in f.keys())  # noqa: SIM118


def resaved(folder: Path, edit_tensors=None, edit_record=None) -> Path:
    """The export's file saved again with its stored tensors and/or manifest edited (the hash
    left as it was)."""
    file = folder / "model.safetensors"
    stored = load_file(file)
    with safe_open(str(file), "pt") as f:
        record = json.loads(f.metadata()["sparsekit"])
    if edit_tensors:
        edit_tensors(stored, record)
    if edit_record:
        edit_record(record)
    out = folder.parent / f"edited-{folder.name}.safetensors"
    save_file(stored, out, {"sparsekit": json.dumps(record)})
    return out


def first_compressed(record: dict) -> str:
    """A compressed weight of the export (its biases, all zero at init, hold no values)."""
    assert "blocks.0.attn.qkv.weight" in record["compressed"]
    return "blocks.0.attn.qkv.weight"


def edit_value(stored, record):
    name = first_compressed(record) + VALUES
    stored[name] = stored[name].clone()
    stored[name][0] += 1.0


def move_a_mask_bit(stored, record):
    """Clear the first set bit and set the first clear one: the same number of values."""
    name = first_compressed(record) + MASK
    mask = stored[name].clone()
    flat = torch.from_numpy(__import__("numpy").unpackbits(mask.numpy(), bitorder="little"))
    on, off = int(flat.nonzero()[0]), int((flat == 0).nonzero()[0])
    for p, value in ((on, 0), (off, 1)):
        mask[p // 8] = (int(mask[p // 8]) & ~(1 << (p % 8))) | (value << (p % 8))
    stored[name] = mask


def transpose_a_shape(record):
    name = first_compressed(record)
    record["compressed"][name] = list(reversed(record["compressed"][name]))


@pytest.mark.parametrize(
    ("edit_tensors", "edit_record"),
    [(edit_value, None), (move_a_mask_bit, None), (None, transpose_a_shape)],
    ids=["value", "mask bit", "shape"],
)
def test_the_hash_catches_edited_values_mask_bits_and_shapes(
    tmp_path, edit_tensors, edit_record
) -> None:
    edited = resaved(masked_export(tmp_path, 0.5, "auto"), edit_tensors, edit_record)
    with pytest.raises(SparsekitError, match="do not match the hash"):
        load_compact(edited)


def drop_values(stored, record):
    del stored[first_compressed(record) + VALUES]


def shorten_mask(stored, record):
    name = first_compressed(record) + MASK
    stored[name] = stored[name][:-1].clone()


def set_a_mask_bit(stored, record):
    name = first_compressed(record) + MASK
    mask = stored[name].clone()
    mask[0] = 0xFF
    mask[1] = 0xFF
    stored[name] = mask


def pad_bits(stored, record):
    """A 3x3 compressed tensor whose mask sets a bit past its 9 positions."""
    stored["extra" + VALUES] = torch.ones(2)
    stored["extra" + MASK] = torch.tensor([1, 0b10], dtype=torch.uint8)
    record["compressed"]["extra"] = [3, 3]


def mask_as_float(stored, record):
    name = first_compressed(record) + MASK
    stored[name] = stored[name].float()


def stray_entry(stored, record):
    stored["nobody" + VALUES] = torch.ones(2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop_values, r":values' is missing"),
        (shorten_mask, "its mask is torch.uint8 of shape"),
        (set_a_mask_bit, "its mask sets .* positions but it holds"),
        (pad_bits, "mask bits past its 9 positions are set"),
        (mask_as_float, "its mask is torch.float32"),
        (stray_entry, "manifest lists no such tensor"),
    ],
    ids=["no values", "short mask", "popcount", "padding", "mask dtype", "stray"],
)
def test_damaged_compressed_tensors_are_refused_by_the_cli(tmp_path, edit, message) -> None:
    edited = resaved(masked_export(tmp_path, 0.5, "auto"), edit)
    with pytest.raises(SparsekitError, match=message):
        read_export(edited)
    result = runner.invoke(app, ["inspect", str(edited)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "is damaged" in result.output and "Export it again" in result.output


def format_2_sha256(record: dict, tensors: dict[str, torch.Tensor]) -> str:
    """export_sha256 as format 2 computed it: every field but sha256, canonical JSON."""
    fields = {k: v for k, v in record.items() if k != "sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    digest = hashlib.sha256()
    digest.update(f"sparsekit-export|{len(text)}|".encode())
    digest.update(text)
    digest.update(tensors_sha256(tensors).encode())
    return digest.hexdigest()


def test_a_format_2_export_still_loads(tmp_path) -> None:
    dense = masked_export(tmp_path, 0.5, "dense")
    manifest, tensors = read_export(dense)
    record = json.loads(manifest.model_dump_json())
    for name in ADDED_FIELDS:  # the fields format 2 did not have
        record.pop(name, None)
    for block in record["blocks"]:
        block.pop("branches")
    record["format_version"] = 2
    record["sha256"] = format_2_sha256(record, tensors)
    save_file(tensors, tmp_path / "v2.safetensors", {"sparsekit": json.dumps(record)})
    old, _ = read_export(tmp_path / "v2.safetensors")
    assert old.format_version == 2 and old.compressed == {} and old.preprocessing is None
    assert canonical_json(old) == canonical_json(Manifest.model_validate(record))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "v2.safetensors")(x), load_compact(dense)(x))
