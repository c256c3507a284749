"""Hydra finds qat's plugins here (the `hydra_plugins` namespace it scans): `recipe=FILE.yaml`."""

from qat.train.recipe_files import RecipeFileSource, RecipeSearchPath

__all__ = ["RecipeFileSource", "RecipeSearchPath"]
