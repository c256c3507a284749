"""Small float models (CNN with BatchNorm, llama-style GPT), the HF adapter, a registry."""

from qat.models.cnn import CNNConfig, DigitsResNet, build_cnn
from qat.models.gpt import GPT, PRESETS, GPTConfig, build_gpt
from qat.models.hf import (
    HFEncoder,
    HFLogits,
    build_hf_causal_lm,
    build_hf_classifier,
    build_hf_encoder,
    build_minilm,
    mean_pool,
)
from qat.models.registry import build_model, model_names, register

__all__ = [
    "CNNConfig",
    "DigitsResNet",
    "GPT",
    "GPTConfig",
    "HFEncoder",
    "HFLogits",
    "PRESETS",
    "build_cnn",
    "build_gpt",
    "build_hf_causal_lm",
    "build_hf_classifier",
    "build_hf_encoder",
    "build_minilm",
    "build_model",
    "mean_pool",
    "model_names",
    "register",
]
