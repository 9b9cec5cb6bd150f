"""Exports: safetensors with a manifest, compacted or masked, and loading them back."""

from sparsekit.export.loader import load_compact, read_export
from sparsekit.export.manifest import Manifest
from sparsekit.export.writer import export_model, export_run

__all__ = ["Manifest", "export_model", "export_run", "load_compact", "read_export"]
