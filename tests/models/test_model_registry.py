"""The model registry: names, JSON-only arguments, recorded build arguments."""

import json

import pytest
from torch import nn

from qat.models import build_model, model_names, register
from qat.quant.provenance import provenance


def test_builtin_names():
    assert {"cnn", "gpt", "hf_encoder", "hf_causal_lm", "hf_classifier", "minilm"} <= set(
        model_names()
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; known models: cnn, gpt"):
        build_model("resnet50")


def test_arguments_must_be_json_primitives():
    with pytest.raises(ValueError, match="must be JSON primitives"):
        build_model("cnn", widths=[8], num_classes=object())
    with pytest.raises(ValueError, match="use lists instead of tuples"):
        build_model("cnn", widths=(8, 16))


def test_build_args_round_trip_through_json():
    model = build_model("gpt", preset="tiny", vocab_size=50, block_size=16, tie_weights=True)
    assert provenance(model).builder == "gpt"
    args = json.loads(json.dumps(provenance(model).build_args))
    again = build_model(provenance(model).builder, **args)
    assert again.config == model.config


def test_a_name_is_registered_once():
    @register("test_only_identity")
    def identity() -> nn.Module:
        return nn.Identity()

    assert isinstance(build_model("test_only_identity"), nn.Identity)
    with pytest.raises(ValueError, match="already registered"):
        register("test_only_identity")(lambda: nn.Identity())
