"""Where each tensor of a Llama-family model goes in a GGUF file, and the hyper-parameters
llama.cpp reads: qat's own GPT and Hugging Face `LlamaForCausalLM` (SmolLM2, Llama, ...).

Both keep the query/key rows in the rotate-half order of HF Llama; llama.cpp rotates
interleaved pairs, so the q rows are permuted per query head and the k rows per KV head
(grouped-query attention has fewer), as `convert_hf_to_gguf.py` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

# GGUF block tensor -> module path inside one block, for each layout.
_GPT_BLOCK = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
              "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}  # fmt: skip
_HF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}  # fmt: skip
NORMS = ("attn_norm", "ffn_norm")


@dataclass(frozen=True)
class Layout:
    """A model's GGUF hyper-parameters and tensor names (see `layout_of`)."""

    name: str
    context: int
    width: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    vocab: int
    embed: str
    norm: str
    head: str
    block: str  # module path of block i: `block.format(i)`
    block_tensors: dict[str, str]

    def tensors(self) -> list[tuple[str, str, int | None, bool]]:
        """`(GGUF name, module path, heads to RoPE-permute rows by or None, is a norm)`, in
        file order. The output matrix is written even when tied to the embedding: convert
        may have quantized the two differently."""
        out = [("token_embd.weight", self.embed, None, False)]
        for i in range(self.layers):
            for key, sub in self.block_tensors.items():
                heads = {"attn_q": self.heads, "attn_k": self.kv_heads}.get(key)
                out.append((f"blk.{i}.{key}.weight", f"{self.block.format(i)}.{sub}", heads,
                            key in NORMS))  # fmt: skip
        out += [("output_norm.weight", self.norm, None, True),
                ("output.weight", self.head, None, False)]  # fmt: skip
        return out


def layout_of(model: nn.Module) -> Layout:
    """The layout of qat's GPT or of a Hugging Face Llama causal LM; ValueError otherwise."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(model, "blocks") and hasattr(model, "lm_head"):
        return Layout("qat-gpt", cfg.block_size, cfg.d_model, cfg.n_layer, cfg.mlp_hidden,
                      cfg.n_head, cfg.n_head, cfg.d_model // cfg.n_head, float(cfg.rope_theta),
                      float(cfg.norm_eps), cfg.vocab_size, "tok_emb", "norm", "lm_head",
                      "blocks.{}", _GPT_BLOCK)  # fmt: skip
    for prefix, lm in (("", model), ("model.", getattr(model, "model", None))):  # or HFLogits
        lm_cfg = getattr(lm, "config", None)
        if getattr(lm_cfg, "model_type", None) == "llama" and hasattr(lm, "lm_head"):
            return _hf_llama(lm_cfg, prefix)
    raise ValueError("GGUF export supports qat's llama-style GPT (builder 'gpt') and Hugging "
                     f"Face Llama causal LMs (LlamaForCausalLM), not {type(model).__name__}")


def _hf_llama(cfg, prefix: str) -> Layout:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export: rope_type {rope['rope_type']!r} is not written yet "
                         "(only default RoPE)")  # fmt: skip
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Layout(getattr(cfg, "name_or_path", "") or "llama", cfg.max_position_embeddings,
                  cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, heads, kv,
                  head_dim, float(theta), float(cfg.rms_norm_eps), cfg.vocab_size,
                  f"{prefix}model.embed_tokens", f"{prefix}model.norm", f"{prefix}lm_head",
                  f"{prefix}model.layers.{{}}", _HF_BLOCK)  # fmt: skip


def rope_permute(t: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs, per head (as convert_hf_to_gguf
    does). Rows move whole, so a row's quantization blocks move with it unchanged.

    Example:
        >>> rope_permute(np.arange(8)[:, None], 2).ravel().tolist()  # 2 heads of 4 rows
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    return (
        t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:])
        .swapaxes(1, 2)
        .reshape(t.shape)
    )
