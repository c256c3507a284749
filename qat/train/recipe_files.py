"""`recipe=path/to/my.yaml`: a recipe file of one's own, read by Hydra like a shipped one.

Hydra resolves `recipe=NAME` in the `configs/recipe/` group only. This config source, put first
on the search path by `RecipeSearchPath` (both found by Hydra in `hydra_plugins/`), answers for
options ending in `.yaml`/`.yml` that name an existing file (absolute, or relative to the
working directory) or contain a `/`, so a file of one's own wins over a shipped recipe of the
same name. Field overrides (`recipe.schedule.calibrate=5`) and sweeps (`-m
recipe=w8a8,my.yaml`) work on both; the recipe's keys are checked after the overrides, by
preflight. A missing file or a YAML syntax error is one line naming the file (and line and
column).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.errors import ConfigCompositionException
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from qat.quant.recipe import yaml_error

GROUP = "recipe/"
SUFFIXES = (".yaml", ".yml")
SCHEME = "qat-recipe-file"


def read_recipe_file(path: Path) -> DictConfig:
    """The mapping in a recipe file, read as Hydra reads configs (OmegaConf); `ValueError`
    naming the file (and where) for a missing file, a syntax error or no mapping."""
    if not path.is_file():
        raise ValueError(f"recipe file {path} does not exist (recipe= takes a name from "
                         "configs/recipe/ or a path to a .yaml file)")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe file {yaml_error(path, e)}") from None
    if not isinstance(data, DictConfig) or not data:
        raise ValueError(f"recipe file {path}: got {'an empty file' if not data else 'a list'}; "
                         "a recipe is a mapping with rules (see configs/recipe/)")
    return data


class RecipeFileSource(ConfigSource):
    """Serves `recipe/<path>.yaml` from the file system (Hydra's ConfigSource plugin API)."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    @staticmethod
    def _file(config_path: str) -> Path | None:
        if not config_path.startswith(GROUP) or not config_path.endswith(SUFFIXES):
            return None
        path = Path(config_path[len(GROUP) :]).expanduser()
        return path if path.is_file() or "/" in config_path[len(GROUP) :] else None

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
        return ConfigResult(config=data, path=f"{SCHEME}://{path.parent}", provider="qat",
                            header={"package": None})  # fmt: skip


class RecipeSearchPath(SearchPathPlugin):
    """Puts `RecipeFileSource` before the shipped configs, so an existing file wins."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.prepend(provider="qat", path=f"{SCHEME}://")
