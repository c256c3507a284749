"""`save` / `load`: the export artifact (`weights.safetensors` + `manifest.json`), atomically.

`save` writes into a hidden temporary directory next to the target, fsyncs the files and the
directory, then renames it into place: a crash at any point leaves no directory at the target
(at most a `.<name>.tmp-*` directory beside it). `load` checks the format version and the
weights' sha256, that every tensor is present with its dtype and shape, rebuilds the model
through the builder registry only, and reads tensors with safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from qat.export import manifest as mf
from qat.export.families import shipped
from qat.export.manifest import ArtifactError
from qat.export.parity.report import ParityReport
from qat.io import fsync_path, replace_dir, writing
from qat.models import registry
from qat.quant.family import Families
from qat.quant.provenance import record
from qat.quant.recipe import Recipe
from qat.quant.spec import QuantSpec


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: contiguous, tied tensors stored apart."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    parity: ParityReport | dict | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the integer `model` (from `qat.convert`) as an artifact directory; return its path.

    `parity` (a `ParityReport` or its dict) and `extra` (JSON data) go into the manifest. An
    existing `directory` is an error unless `overwrite`, which replaces it after the new
    artifact is complete.

    Example:
        >>> import qat, tempfile
        >>> cnn = qat.models.registry.build_model("cnn", widths=[4])
        >>> m = qat.prepare(cnn, "configs/recipe/w8.yaml")
        >>> _ = m(torch.randn(2, 1, 8, 8))
        >>> path = qat.save(qat.convert(m.eval()), tempfile.mkdtemp() + "/cnn-w8")
        >>> sorted(p.name for p in path.iterdir())
        ['manifest.json', 'weights.safetensors']
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    tensors = _tensors(model)
    with writing(target, "export artifact"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with writing(target, "export artifact"):
            _write_into(tmp, model, tensors, parity, extra)
            replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_into(
    tmp: Path,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    parity: ParityReport | dict | None,
    extra: dict[str, Any] | None,
) -> None:
    """The weights (serialized in memory, so a full disk is a plain `OSError`) and the
    manifest, fsynced, into the fresh folder `tmp`."""
    data = safetensors_bytes(tensors, metadata={"format": mf.FORMAT})
    weights = tmp / mf.WEIGHTS_FILE
    with weights.open("wb") as f:
        f.write(data)
    fsync_path(weights)
    manifest = mf.build_manifest(model, tensors, len(data), hashlib.sha256(data).hexdigest())
    if parity is not None:
        manifest["parity"] = parity.to_dict() if isinstance(parity, ParityReport) else parity
    manifest["extra"] = extra
    _write_manifest(tmp / mf.MANIFEST_FILE, manifest)
    fsync_path(tmp / mf.MANIFEST_FILE)
    fsync_path(tmp)


def read_manifest(
    directory: str | os.PathLike, families: Families | None = None
) -> dict[str, Any]:
    """The checked manifest of an artifact (format and version verified, weights not read)."""
    path = Path(directory) / mf.MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: {directory} is not a qat export artifact")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path} is not valid UTF-8 JSON ({e.reason} at byte {e.start}): "
                            "the manifest is damaged; export the model again") from None
    return mf.parse_manifest(text, (families or shipped()).kinds())


def _read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    name = mf.safe_file_name(manifest["weights"]["file"])
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["weights"]["sha256"]:
        raise ArtifactError(
            f"checksum mismatch for {path}: sha256 {digest} but the manifest says "
            f"{manifest['weights']['sha256']}; the file is corrupted, truncated or was modified"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    mf.check_tensors(manifest["tensors"], tensors)
    return tensors


def _replace(model: nn.Module, name: str, make, expect: tuple[type, ...]) -> None:
    """Put `make()` where the rebuilt model has a module of type `expect` called `name`."""
    try:
        old = model.get_submodule(name) if name else None
    except AttributeError:
        old = None
    if not isinstance(old, expect):
        raise ArtifactError(
            f"manifest names module {name!r}, but the rebuilt model has "
            f"{type(old).__name__ if old is not None else 'no such module'} there (expected "
            f"{' or '.join(t.__name__ for t in expect)}); were the builder arguments changed?"
        )
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, make())


def _layer(name: str, cfg: dict[str, Any], int_type: type[nn.Module]) -> nn.Module:
    specs = {}
    for role, spec in cfg["specs"].items():
        if role not in ("weight", "input", "output"):
            raise ArtifactError(f"manifest: layer {name!r} has an unknown spec role {role!r}")
        specs[f"{role}_spec"] = (
            None if spec is None else QuantSpec.from_dict(spec, path=f"{name}.{role}")
        )
    try:
        return int_type(**cfg["args"], **specs)
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"manifest: cannot rebuild layer {name!r} ({cfg['kind']}): {e}"
        ) from None


def load(directory: str | os.PathLike, families: Families | None = None) -> nn.Module:
    """Rebuild the integer model saved by `save`, ready to run (eval mode); its layer kinds
    are looked up in `families`.

    Example:
        >>> import qat, tempfile
        >>> cnn = qat.models.registry.build_model("cnn", widths=[4])
        >>> m = qat.prepare(cnn, "configs/recipe/w8.yaml")
        >>> _ = m(torch.randn(2, 1, 8, 8))
        >>> path = qat.save(qat.convert(m.eval()), tempfile.mkdtemp() + "/cnn-w8")
        >>> type(qat.load(path).conv1).__name__
        'IntConv2d'
    """
    directory = Path(directory)
    try:
        return _load(directory, families or shipped())
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        # A field that passed the manifest's structural checks but not the model's rules.
        raise ArtifactError(
            f"{directory}: the manifest describes something that cannot be rebuilt "
            f"({type(e).__name__}: {e}); the artifact is damaged or was edited"
        ) from None


def _load(directory: Path, families: Families) -> nn.Module:
    manifest = read_manifest(directory, families)
    tensors = _read_tensors(directory, manifest)
    name, args = manifest["builder"]["name"], manifest["builder"]["args"]
    if name not in registry.model_names():
        raise ArtifactError(
            f"model builder {name!r} is not registered; known builders: "
            f"{', '.join(registry.model_names())}. Register it (qat.models.registry.register) "
            "before loading; an artifact cannot name code to run"
        )
    try:
        model = registry.build_model(name, **args)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"builder {name!r} refused the manifest's arguments: {e}") from None
    for bn in manifest["folded_bn"]:
        _replace(model, bn, nn.Identity, (nn.BatchNorm1d, nn.BatchNorm2d))
    for cname, kind in manifest["containers"].items():
        container = families.of_container(kind)
        if container is None:
            raise ArtifactError(f"manifest: module {cname!r} is a {kind}, which no layer family "
                                "the loader was given knows")  # fmt: skip
        _replace(model, cname, lambda c=cname, f=container: f.qat_type.from_float(
            model.get_submodule(c), name=c), (container.float_type,))  # fmt: skip
    for lname, cfg in manifest["layers"].items():
        family = families.of_kind(cfg["kind"])
        _replace(model, lname, lambda n=lname, c=cfg, f=family: _layer(n, c, f.int_type),
                 (family.float_type,))  # fmt: skip
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"tensors do not fit the rebuilt model: {e}") from None
    recipe = manifest.get("recipe")
    record(model, families=families, recipe=None if recipe is None else Recipe.from_dict(recipe),
           folded_bn=tuple(manifest["folded_bn"]),
           float_bytes=(manifest.get("sizes") or {}).get("float32_state_dict_bytes"))  # fmt: skip
    return model.eval()
