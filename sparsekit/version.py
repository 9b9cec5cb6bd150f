"""sparsekit's version, in a module of its own: exports record it, and importing it loads
nothing else (the package's `__init__` imports the torch-side API lazily, export among it)."""

__version__ = "0.1.0"
