"""The artifact loader on random byte flips and truncations: a clear error every time."""

import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qat
from qat.export import ArtifactError, convert

from .helpers import recipe, trained

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, _ = trained("cnn", recipe("w4a8"))
    path = qat.save(convert(model), tmp_path_factory.mktemp("fuzz") / "art")
    with torch.no_grad():
        return path, qat.load(path).eval()(X)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["weights.safetensors", "manifest.json"]),
       data=st.data(), truncate=st.booleans())
def test_flips_and_truncations_give_a_clear_error(artifact, tmp_path, which, data, truncate):
    """Every damaged artifact is refused with `ArtifactError`, or (a flip the format cannot
    see, e.g. in JSON whitespace) loads into a model that computes exactly the original's."""
    artifact, want = artifact
    work = Path(tempfile.mkdtemp(dir=tmp_path)) / "art"
    shutil.copytree(artifact, work)
    f = work / which
    blob = bytearray(f.read_bytes())
    if truncate:
        cut = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:cut]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    f.write_bytes(bytes(blob))

    def no_pickle(*a, **k):
        raise AssertionError("the loader unpickled something")

    old = pickle.loads, pickle.load
    pickle.loads = pickle.load = no_pickle
    try:
        try:
            model = qat.load(work)
        except ArtifactError as e:
            assert str(e)
        else:
            with torch.no_grad():
                assert torch.equal(model.eval()(X), want), "a damaged artifact loaded changed"
    finally:
        pickle.loads, pickle.load = old
