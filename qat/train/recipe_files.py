"""`recipe=path/to/my.yaml`: a recipe file of one's own, read by Hydra like a shipped one.

Hydra resolves `recipe=NAME` in the `configs/recipe/` group only. This config source sits
after it on the search path and answers for options that end in `.yaml`/`.yml` (absolute,
or relative to the working directory), so `recipe=...` takes a shipped name or a file,
field overrides (`recipe.schedule.calibrate=5`) and sweeps (`-m recipe=w8a8,my.yaml`) work
on both. A missing file, a YAML syntax error or an invalid key is one line naming the file
(and line and column).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.errors import ConfigCompositionException
from hydra.plugins.config_source import ConfigResult, ConfigSource
from omegaconf import OmegaConf

from qat.quant.recipe import Recipe

GROUP = "recipe/"
SUFFIXES = (".yaml", ".yml")
SEARCH_PATH = "qat-recipe-file://"  # named in configs/train.yaml's hydra.searchpath


def read_recipe_file(path: Path) -> dict:
    """The validated mapping in a recipe file; `ValueError` naming file, line and column."""
    if not path.is_file():
        raise ValueError(f"recipe file {path} does not exist (recipe= takes a name from "
                         "configs/recipe/ or a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"recipe file {where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe file {path}: invalid YAML: {e}") from None
    try:
        Recipe.from_dict(data)
    except ValueError as e:
        raise ValueError(f"recipe file {path}: {e}") from None
    return data


class RecipeFileSource(ConfigSource):
    """Serves `recipe/<path>.yaml` from the file system (Hydra's ConfigSource plugin API)."""

    @staticmethod
    def scheme() -> str:
        return SEARCH_PATH.split("://")[0]

    @staticmethod
    def _file(config_path: str) -> Path | None:
        if not config_path.startswith(GROUP) or not config_path.endswith(SUFFIXES):
            return None
        return Path(config_path[len(GROUP) :]).expanduser()

    def is_config(self, config_path: str) -> bool:
        return self._file(config_path) is not None

    def is_group(self, config_path: str) -> bool:
        return False

    def available(self) -> bool:
        return True

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        return []  # "available options" lists the shipped recipes only

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        try:
            data = read_recipe_file(path)
        except ValueError as e:  # Hydra prints a compact exception as its message alone
            raise ConfigCompositionException(str(e)) from None
        return ConfigResult(
            config=OmegaConf.create(data or {}),
            path=f"{SEARCH_PATH}{path.parent}",
            provider="qat",
            header={"package": None},
        )


def register_recipe_files() -> None:
    """Let Hydra resolve the search path entry `qat-recipe-file://` (idempotent)."""
    Plugins.instance().register(RecipeFileSource)
