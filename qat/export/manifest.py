"""The artifact's `manifest.json`: building it from an integer model, and checking one read back.

Everything in a manifest is data: layer kinds are looked up in the layer families
(`qat.export.families`), the model comes from the builder registry, and no name in it is ever
imported or unpickled.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Collection
from pathlib import PurePosixPath
from typing import Any

import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.quant.provenance import provenance

FORMAT = "qat-int-artifact"
# 2: biases of integer-path layers are int32 codes (s_x * s_w steps); 3: 2- and 3-bit codes
# packed densely (four, or eight in three bytes) instead of one per nibble
FORMAT_VERSION = 3
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"

class ArtifactError(ValueError):
    """An export artifact is malformed, corrupted, or cannot be written or rebuilt."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def versions() -> dict[str, str]:
    import safetensors

    import qat

    out = {
        "qat": qat.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    if "transformers" in sys.modules:
        out["transformers"] = sys.modules["transformers"].__version__
    return out


def build_manifest(
    model: nn.Module, tensors: dict[str, torch.Tensor], weights_bytes: int, sha256: str
) -> dict[str, Any]:
    """The manifest of `model` (an integer model) whose `tensors` were written to the file."""
    origin = provenance(model)
    name = origin.builder
    if name is None:
        raise ArtifactError(
            f"{type(model).__name__} has no builder in its provenance, so a loader could not "
            "rebuild it; "
            "build the model with qat.models.registry.build_model(name, **args)"
        )
    recipe = origin.recipe
    layers = {}
    for lname, mod in model.named_modules():
        if isinstance(mod, IntLayer):
            cfg = mod.layer_config()
            cfg["tensors"] = sorted(k for k in tensors if k.startswith(f"{lname}."))
            layers[lname] = cfg
    float_bytes = origin.float_bytes
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256, "bytes": weights_bytes},
        "builder": {"name": name, "args": origin.build_args},
        "recipe": recipe.to_dict() if recipe is not None else None,
        "layers": layers,
        "folded_bn": list(origin.folded_bn),
        # Container modules (MultiheadAttention) holding integer layers: rebuilt before them.
        "containers": origin.families.containers(model) if origin.families else {},
        "tensors": {
            k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()
        },
        "sizes": {
            "artifact_bytes": weights_bytes,
            "float32_state_dict_bytes": float_bytes,
            "ratio": weights_bytes / float_bytes if float_bytes else None,
        },
        "versions": versions(),
    }


def _need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ArtifactError(f"manifest: {where} has no {key!r}; the artifact is incomplete")
    if not isinstance(d[key], kind):
        raise ArtifactError(f"manifest: {where}.{key} has the wrong type ({type(d[key]).__name__})")
    return d[key]


def safe_file_name(name: Any) -> str:
    """`name` if it is a plain file name (no directories, no '..'); an error otherwise."""
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or ".." in name
        or PurePosixPath(name).name != name
    ):
        raise ArtifactError(
            f"manifest: file name {name!r} is not a plain file name inside the artifact "
            "(no '/', '\\' or '..'); refusing to read it"
        )
    return name


def parse_manifest(text: str, kinds: Collection[str]) -> dict[str, Any]:
    """Parse and check the manifest's structure and format version; layer kinds must be among
    `kinds` (the integer classes of the layer families the loader knows)."""
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"manifest.json is not valid JSON ({e}); the artifact is corrupted"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"manifest.json is not a {FORMAT} manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {version!r} is not supported: this qat reads version "
            f"{FORMAT_VERSION}; re-export the model with this qat, or load it with the qat "
            "version that wrote it"
        )
    weights = _need(m, "weights", dict, "manifest")
    safe_file_name(_need(weights, "file", str, "weights"))
    _need(weights, "sha256", str, "weights")
    builder = _need(m, "builder", dict, "manifest")
    _need(builder, "name", str, "builder")
    _need(builder, "args", dict, "builder")
    for key in ("layers", "tensors"):
        _need(m, key, dict, "manifest")
    _need(m, "folded_bn", list, "manifest")
    containers = m.setdefault("containers", {})  # absent in artifacts written before them
    if not isinstance(containers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in containers.items()):
        raise ArtifactError("manifest: 'containers' must map module names to class names")
    for lname, cfg in m["layers"].items():
        kind = _need(cfg, "kind", str, f"layers[{lname!r}]")
        if kind not in kinds:
            raise ArtifactError(
                f"manifest: layer {lname!r} has kind {kind!r}; known kinds: " + ", ".join(kinds)
            )
        _need(cfg, "args", dict, f"layers[{lname!r}]")
        _need(cfg, "specs", dict, f"layers[{lname!r}]")
    return m


def check_tensors(expected: dict[str, Any], found: dict[str, torch.Tensor]) -> None:
    """Every tensor the manifest lists is in the file with its dtype and shape, and no other."""
    for key, meta in expected.items():
        if key not in found:
            raise ArtifactError(
                f"tensor {key!r} listed in manifest.json is missing from {WEIGHTS_FILE}; "
                "the artifact is incomplete: re-export it"
            )
        t = found[key]
        if dtype_name(t.dtype) != meta.get("dtype") or list(t.shape) != meta.get("shape"):
            raise ArtifactError(
                f"tensor {key!r} is {dtype_name(t.dtype)}{list(t.shape)} in {WEIGHTS_FILE} but "
                f"{meta.get('dtype')}{meta.get('shape')} in manifest.json; re-export the artifact"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ArtifactError(f"{WEIGHTS_FILE} holds tensors the manifest does not list: {extra[:5]}")
