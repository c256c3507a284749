"""Padded positions of a sentence batch stay out of activation observers, in calibration and in
the training steps before `freeze_observers`, on a real (tiny) BERT encoder: what sits under
the padding must not change a single scale."""

from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.quant import quantizers
from qat.quant.calibrate import calibrate
from qat.quant.tokens import observe_real_tokens
from qat.train.module import QATModule
from tests.train.test_dropout import tiny_encoder


def _recipe(observer: str) -> dict:
    return {"rules": [{"match": {"types": ["Linear"]},
                       "weight": {"bits": 4, "granularity": "per_channel", "symmetric": True},
                       "input": {"bits": 8, "observer": observer}}]}  # fmt: skip


def _batches() -> tuple[dict, dict]:
    """The same four sentences (lengths 12, 9, 5, 3) twice, with different tokens under the
    padding."""
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate((12, 9, 5, 3)):
        mask[i, :n] = 1
    ids = torch.randint(1, 100, (4, 12), generator=g)
    noise = torch.randint(1, 100, (4, 12), generator=g)
    return ({"input_ids": ids * mask, "attention_mask": mask},
            {"input_ids": torch.where(mask.bool(), ids, noise), "attention_mask": mask})


def _forward(model, b):
    return model(b["input_ids"], b["attention_mask"])


def _input_ranges(model) -> dict[str, torch.Tensor]:
    return {n: torch.stack([q.observer.min_val, q.observer.max_val]).flatten()
            for n, q in quantizers(model).items() if q.role == "input"}  # fmt: skip


def _calibrated(batch, mask=True, observer="minmax"):
    model = qat.prepare(tiny_encoder(), _recipe(observer))
    calibrate(model, [batch], 1, _forward, (lambda b: b["attention_mask"]) if mask else None)
    return _input_ranges(model)


@pytest.mark.parametrize("observer", ["minmax", "ema", "mse"])
def test_calibration_ranges_ignore_what_lies_under_the_padding(observer):
    a, b = (_calibrated(x, observer=observer) for x in _batches())
    assert all(torch.equal(a[n], b[n]) for n in a)
    unmasked = [_calibrated(x, mask=False, observer=observer) for x in _batches()]
    assert any(not torch.equal(unmasked[0][n], unmasked[1][n]) for n in a)  # it would reach


def test_calibration_ranges_are_those_of_the_sentences_alone():
    """The masked ranges equal those of each sentence run on its own, unpadded (min/max
    accumulate over the four calls)."""
    padded, _ = _batches()
    masked = _calibrated(padded)
    model = qat.prepare(tiny_encoder(), _recipe("minmax"))
    alone = [{"input_ids": padded["input_ids"][i:i + 1, :n],
              "attention_mask": padded["attention_mask"][i:i + 1, :n]}
             for i, n in enumerate((12, 9, 5, 3))]  # fmt: skip
    calibrate(model, alone, 4, _forward)
    for name, ranges in _input_ranges(model).items():
        torch.testing.assert_close(masked[name], ranges, rtol=1e-5, atol=1e-5)


def _one_step(batch, observer="ema", checkpointing=False) -> tuple[dict, dict, float]:
    """Input ranges after calibration and after one training step (with its backward)."""
    student = qat.prepare(tiny_encoder(), _recipe(observer))
    calibrate(student, [_batches()[0]], 1, _forward, lambda b: b["attention_mask"])
    before = _input_ranges(student)
    module = QATModule(student, objective="embedding", teacher=tiny_encoder(), dropout=0.0,
                       activation_checkpointing=checkpointing).train()  # fmt: skip
    loss = module.training_step(copy.deepcopy(batch), 0)
    loss.backward()  # activation checkpointing re-runs the forward here
    module.on_after_backward()
    return before, _input_ranges(student), loss.item()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_steps_observe_only_real_tokens(checkpointing):
    """Before `freeze_observers` an EMA observer moves on every training step: there too the
    padding is left out (with activation checkpointing, in the forward backward re-runs as
    well), and the loss, which never reads it, is unchanged by it."""
    (before, a, loss_a), (_, b, loss_b) = (_one_step(x, checkpointing=checkpointing)
                                           for x in _batches())  # fmt: skip
    assert any(not torch.equal(before[n], a[n]) for n in a)  # the step did observe
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)


def test_a_plain_forward_would_let_the_padding_in():
    """The control of the test above: the same step's forward without the mask."""
    states = []
    for batch in _batches():
        student = qat.prepare(tiny_encoder(), _recipe("ema"))
        calibrate(student, [_batches()[0]], 1, _forward, lambda b: b["attention_mask"])
        _forward(student.train(), batch)
        states.append(_input_ranges(student))
    assert any(not torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_observers_are_restored_after_an_error_and_learned_scales_left_to_the_optimizer():
    model = qat.prepare(tiny_encoder(), {"rules": [{"match": {"types": ["Linear"]},
        "input": {"bits": 8, "observer": "minmax", "learn": "lsq"}}]})  # fmt: skip
    batch = _batches()[0]
    calibrate(model, [batch], 1, _forward, lambda b: b["attention_mask"])
    scales = {n: q.scale.detach().clone() for n, q in quantizers(model).items()}
    with pytest.raises(RuntimeError, match="boom"), \
            observe_real_tokens(model.train(), batch["attention_mask"]):
        _forward(model, batch)  # calibrated and on: the optimizer owns these scales
        raise RuntimeError("boom")
    assert all(torch.equal(q.scale, scales[n]) for n, q in quantizers(model).items())
    assert all(bool(q.observer_enabled) for q in quantizers(model).values())
    assert not any(q._forward_pre_hooks for q in quantizers(model).values())
