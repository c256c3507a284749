"""Observers: the MSE search against a written-out search, and its sample above a size."""

from pathlib import Path

import pytest
import torch

import qat
from qat.models.registry import build_model
from qat.quant import QuantSpec, grid
from qat.quant import observers as obs

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipe"


def written_out_mse_range(x: torch.Tensor, spec: QuantSpec) -> float:
    """The clip ratio search of `MSEObserver`, per tensor, one candidate at a time."""
    lo, hi = float(x.min()), float(x.max())
    best = (float("inf"), None)
    for i in range(obs.MSE_CANDIDATES):
        r = 1.0 - 0.8 * i / obs.MSE_CANDIDATES
        s, z = grid.qparams_from_range(torch.tensor(lo * r), torch.tensor(hi * r), spec)
        q = (torch.round(x / s) + z).clamp(*spec.qrange)
        err = float((((q - z) * s - x) ** 2).sum())
        if err < best[0]:
            best = (err, hi * r)
    return best[1]


def test_mse_observer_equals_the_written_out_search_below_the_sample_size():
    spec = QuantSpec(bits=4, symmetric=False, observer="mse")
    x = torch.randn(4096) ** 3  # heavy tails: clipping pays
    o = obs.build_observer(spec, (), role="input")
    o(x)
    assert o.max_val.item() == pytest.approx(written_out_mse_range(x, spec), rel=1e-6)


def _mse_max(x: torch.Tensor, spec: QuantSpec) -> float:
    o = obs.build_observer(spec, (), role="input")
    o(x)
    return o.max_val.item()


def test_mse_observer_samples_large_activations_and_stays_close(monkeypatch):
    spec = QuantSpec(bits=4, symmetric=False, observer="mse")
    x = torch.randn(1 << 17, generator=torch.Generator().manual_seed(0)) ** 3
    exact = written_out_mse_range(x, spec)
    monkeypatch.setattr(obs, "MSE_MAX_SAMPLES", 1 << 14)  # x is 8x the sample
    sampled = _mse_max(x, spec)
    assert sampled == _mse_max(x, spec)  # a fixed sample: the same answer every call
    step = 0.8 / obs.MSE_CANDIDATES * float(x.max())
    assert sampled != exact and abs(sampled - exact) <= 2 * step
    monkeypatch.setattr(obs, "MSE_MAX_SAMPLES", 1 << 17)  # no sampling at the size itself
    assert _mse_max(x, spec) == pytest.approx(exact, rel=1e-6)


def test_plan_names_the_cost_of_mse_activation_observers():
    gpt = build_model("gpt", preset="tiny", vocab_size=32)
    costly = qat.plan(gpt, RECIPES / "w4a4_lsq.yaml")
    n = sum(1 for lp in costly.layers if (s := lp.specs.get("input")) and s.observer == "mse")
    (note,) = costly.notes()
    assert n > 0 and note.startswith(f"cost: {n} activation quantizers use the mse observer, "
                                     "~40x the work of ema/minmax")
    assert note in str(costly) and note in costly.summary()
    assert qat.plan(gpt, RECIPES / "w8a8.yaml").notes() == []  # ema: no note
