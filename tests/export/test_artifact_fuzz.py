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


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, _ = trained("cnn", recipe("w4a8"))
    path = qat.save(convert(model), tmp_path_factory.mktemp("fuzz") / "art")
    return path


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["weights.safetensors", "manifest.json"]),
       data=st.data(), truncate=st.booleans())
def test_flips_and_truncations_give_a_clear_error(artifact, tmp_path, which, data, truncate):
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
            # Only a flip the format cannot see (e.g. JSON whitespace) may load; it must run.
            model(torch.randn(2, 1, 8, 8))
    finally:
        pickle.loads, pickle.load = old
