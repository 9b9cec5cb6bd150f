"""sparsekit: train sparse Vision Transformers end to end (SViTE) and ship them smaller and faster.

Public API (everything else is internal and may change)::

    recipe = sparsekit.load_recipe("recipes/svite_small.yaml", ["training.epochs=30"])
    session = sparsekit.Session.from_recipe(recipe, model, optimizer, steps_per_epoch=len(loader))
    ...  # train, then
    sparsekit.export_run("runs/svite_small-deit_small", "export", compact=True)
    model = sparsekit.load_compact("export")  # a plain timm model, pruned heads removed
"""

from sparsekit.errors import RecipeError, SparsekitError
from sparsekit.recipe import Recipe, dump_recipe, load_recipe
from sparsekit.version import __version__ as __version__  # re-exported

__all__ = [
    "Recipe",
    "RecipeError",
    "Session",
    "SparsekitError",
    "Timeline",
    "compile_recipe",
    "dump_recipe",
    "export_model",
    "export_run",
    "load_compact",
    "load_recipe",
]


def __getattr__(name: str):
    """Import the torch-side API lazily so `sparsekit recipe ...` starts without torch."""
    if name == "Session":
        from sparsekit.session import Session

        return Session
    if name == "compile_recipe":
        from sparsekit.compiler import compile_recipe

        return compile_recipe
    if name == "Timeline":
        from sparsekit.timeline import Timeline

        return Timeline
    if name in ("export_model", "export_run", "load_compact"):
        import sparsekit.export

        return getattr(sparsekit.export, name)
    raise AttributeError(f"module 'sparsekit' has no attribute {name!r}")
