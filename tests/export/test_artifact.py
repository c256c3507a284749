"""`save` / `load`: round trip, manifest, sizes, and a clear error for each kind of damage."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qat
from qat.export import ArtifactError, IntLayer, convert, read_manifest
from qat.export import artifact as artifact_mod
from qat.models.registry import build_model
from qat.quant.provenance import provenance

from .helpers import LLAMA, recipe, trained


@pytest.fixture(scope="module")
def gpt_int():
    model, batches = trained("gpt", recipe("w4g32_a8dyn"))
    return convert(model), batches


def _calibrated(model, r, batch):
    qat.prepare(model, r)
    model(batch)
    return convert(model.eval())


@pytest.mark.parametrize(
    "kind,name", [("gpt", "w4g32_a8dyn"), ("cnn", "w4a8"), ("llama", "w8a8"), ("cnn", "w8")]
)
def test_round_trip_runs_bit_identically(tmp_path, kind, name):
    model, batches = trained(kind, recipe(name))
    int_model = convert(model)
    path = qat.save(int_model, tmp_path / "art", extra={"run": "test"})
    loaded = qat.load(path)
    assert type(loaded) is type(int_model) and not loaded.training
    assert sum(isinstance(m, IntLayer) for m in loaded.modules()) == sum(
        isinstance(m, IntLayer) for m in int_model.modules()
    )
    with torch.no_grad():
        for b in batches:
            assert torch.equal(loaded(b), int_model(b))
    assert provenance(loaded).recipe.to_dict() == provenance(model).recipe.to_dict()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]


def test_manifest_records_everything_needed(tmp_path, gpt_int):
    int_model, batches = gpt_int
    report = qat.export.parity_report(trained("gpt", recipe("w4g32_a8dyn"))[0], int_model, batches)
    path = qat.save(int_model, tmp_path / "gpt", parity=report)
    m = json.loads((path / "manifest.json").read_text())
    digest = hashlib.sha256((path / "weights.safetensors").read_bytes()).hexdigest()
    assert m["format_version"] == qat.export.FORMAT_VERSION and m["weights"]["sha256"] == digest
    assert m["builder"] == {"name": "gpt", "args": provenance(int_model).build_args}
    assert m["recipe"]["rules"][0]["weight"]["group_size"] == 32
    assert {"qat", "torch", "safetensors", "python"} <= set(m["versions"])
    q = m["layers"]["blocks.0.attn.q_proj"]
    assert q["kind"] == "IntLinear" and q["specs"]["weight"]["bits"] == 4
    assert q["specs"]["input"]["dynamic"] is True
    assert q["tensors"] == [
        "blocks.0.attn.q_proj.weight_codes",
        "blocks.0.attn.q_proj.weight_scale",
    ]
    assert m["tensors"]["blocks.0.attn.q_proj.weight_codes"] == {
        "dtype": "uint8",
        "shape": [64, 32],
    }
    assert m["parity"]["output"]["top1"] == 1.0 and m["extra"] is None
    assert m["sizes"]["artifact_bytes"] == (path / "weights.safetensors").stat().st_size


@pytest.mark.parametrize(
    "name,lo,hi", [("w8", 0.24, 0.27), ("w4g32", 0.14, 0.16), ("w4g32_a8dyn", 0.15, 0.17)]
)
def test_artifact_size_against_float32(tmp_path, name, lo, hi):
    torch.manual_seed(0)
    gpt = build_model("gpt", preset="small", vocab_size=67, block_size=16)
    int_model = _calibrated(gpt, recipe(name), torch.randint(0, 67, (1, 16)))
    sizes = read_manifest(qat.save(int_model, tmp_path / name))["sizes"]
    fresh = build_model("gpt", preset="small", vocab_size=67)
    float_bytes = 4 * sum(t.numel() for t in fresh.state_dict().values())
    assert sizes["float32_state_dict_bytes"] == float_bytes
    assert lo <= sizes["ratio"] <= hi, sizes


@pytest.fixture
def saved(tmp_path, gpt_int):
    return qat.save(gpt_int[0], tmp_path / "art")


def _rewrite_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_flipped_byte_is_a_checksum_error(saved):
    w = saved / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError, match="checksum mismatch.*corrupted, truncated or was modified"
    ):
        qat.load(saved)


def test_truncated_file_is_an_error_even_with_a_matching_checksum(saved):
    w = saved / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        qat.load(saved)
    digest = hashlib.sha256(w.read_bytes()).hexdigest()
    _rewrite_manifest(saved, lambda m: m["weights"].update(sha256=digest))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        qat.load(saved)


def test_wrong_format_version(saved):
    _rewrite_manifest(saved, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99 is not supported.*reads version 3"):
        qat.load(saved)


def test_missing_tensor(saved):
    w = saved / "weights.safetensors"
    tensors = load_file(w)
    del tensors["lm_head.weight_scale"]
    save_file(tensors, w)
    digest = hashlib.sha256(w.read_bytes()).hexdigest()
    _rewrite_manifest(saved, lambda m: m["weights"].update(sha256=digest))
    with pytest.raises(ArtifactError, match="'lm_head.weight_scale' .* missing from weights"):
        qat.load(saved)


def test_tensor_with_the_wrong_dtype(saved):
    _rewrite_manifest(saved, lambda m: m["tensors"]["lm_head.weight_codes"].update(dtype="int8"))
    with pytest.raises(ArtifactError, match="'lm_head.weight_codes' is uint8.* but int8"):
        qat.load(saved)


def test_unknown_builder_is_refused(saved):
    _rewrite_manifest(saved, lambda m: m["builder"].update(name="os.system"))
    with pytest.raises(ArtifactError, match="builder 'os.system' is not registered"):
        qat.load(saved)


@pytest.mark.parametrize("bad", ["../weights.safetensors", "sub/weights.safetensors", ".."])
def test_file_names_with_paths_are_refused(saved, bad):
    _rewrite_manifest(saved, lambda m: m["weights"].update(file=bad))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        qat.load(saved)


def test_unknown_layer_kind_and_mismatched_module_are_refused(saved):
    _rewrite_manifest(saved, lambda m: m["layers"]["lm_head"].update(kind="Pickle"))
    with pytest.raises(ArtifactError, match="kind 'Pickle'; known kinds: IntLinear"):
        qat.load(saved)
    _rewrite_manifest(saved, lambda m: m["layers"]["lm_head"].update(kind="IntEmbedding"))
    with pytest.raises(ArtifactError, match="'lm_head', but the rebuilt model has Linear there"):
        qat.load(saved)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="is not a qat export artifact"):
        qat.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        qat.load(tmp_path)


@pytest.mark.parametrize("where", ["safetensors_bytes", "_write_manifest", "fsync_path"])
def test_crash_during_save_leaves_no_artifact(tmp_path, gpt_int, monkeypatch, where):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(artifact_mod, where, crash)
    with pytest.raises(KeyboardInterrupt):
        qat.save(gpt_int[0], tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_overwrite(tmp_path, gpt_int):
    path = qat.save(gpt_int[0], tmp_path / "art")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        qat.save(gpt_int[0], path)
    qat.save(gpt_int[0], path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert qat.load(path) is not None


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(qat.load(saved).lm_head, IntLayer)


def test_model_without_a_builder_cannot_be_saved(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(cfg)
    int_model = _calibrated(model, recipe("w8"), torch.randint(0, 100, (1, 4)))
    with pytest.raises(ArtifactError, match="no builder in its provenance.*build_model"):
        qat.save(int_model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_is_one_clear_error_and_leaves_nothing(
    tmp_path, gpt_int, monkeypatch
):
    from qat.io import WriteError

    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name == "weights.safetensors":
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(WriteError, match=r"could not write export artifact .*art: No space "
                       r"left on device\. Nothing partial was left behind"):
        qat.save(gpt_int[0], tmp_path / "art")
    assert list(tmp_path.iterdir()) == []
