"""Measurements of a model: sparsity and parameter counts."""
