"""`export_model` (convert, gate, save in one call) and the runnable docstring examples."""

import json
from pathlib import Path

import pytest
import torch

import qat
from qat.export import IntLayer, ParityError, export_model

from .helpers import recipe, trained

REPO = Path(__file__).resolve().parents[2]


def test_export_model_gates_prints_and_saves_the_report(tmp_path):
    model, batches = trained("cnn", recipe("w4a8"))
    lines: list[str] = []
    int_model, report, path = export_model(model, batches, tmp_path / "cnn", log=lines.append)
    assert "output" in lines[0] and report.output.top1 == 1.0
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["parity"]["output"]["rel"] == report.output.rel
    with torch.no_grad():
        assert torch.equal(qat.load(path)(batches[0]), int_model(batches[0]))


def test_failed_gate_raises_and_writes_nothing(tmp_path):
    model, batches = trained("cnn", recipe("w8a8"))

    def forward(m, batch):  # an integer model that is off by 1e-3 of the logits' scale
        out = m(batch)
        return out * 1.001 if isinstance(m.conv1, IntLayer) else out

    # 1e-3 in fp32: printed 1.000e-03 or 9.999e-04 as the logits' magnitudes round
    with pytest.raises(
        ParityError, match=r"(?s)output: relative error (1\.000e-03|9\.99\de-04) > 1\.0e-04.*top1"
    ):
        export_model(model, batches, tmp_path / "cnn", forward=forward, log=None)
    assert list(tmp_path.iterdir()) == []
