"""Exports: safetensors with a manifest, compacted or masked, and loading them back; ONNX."""

from sparsekit.export.loader import load_compact, read_export
from sparsekit.export.manifest import Manifest
from sparsekit.export.onnx import convert_export, export_onnx, export_run_onnx
from sparsekit.export.preprocessing import eval_transform
from sparsekit.export.writer import export_model, export_run

__all__ = [
    "Manifest",
    "convert_export",
    "eval_transform",
    "export_model",
    "export_onnx",
    "export_run",
    "export_run_onnx",
    "load_compact",
    "read_export",
]
