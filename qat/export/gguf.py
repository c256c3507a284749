"""GGUF (llama.cpp) export of the llama-style GPT, with Q4_0 / Q8_0 blocks taken from the
integer model's codes and scales.

A Linear whose weight spec is symmetric, per group of 32, 4 or 8 bits, maps exactly onto
llama.cpp's Q4_0 / Q8_0: one fp16 scale per 32 weights and `value = code * scale`
(Q4_0 stores `code + 8` in nibbles: element j in the low nibble of byte j, element j + 16 in
the high one). With `scale_dtype: fp16` in the recipe the file holds exactly what was trained.
Other tensors are written as F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat.export.integer.layer import IntLayer
from qat.io import atomic_path

BLOCK = 32


def gguf_type_for(mod: nn.Module, name: str) -> str:
    """`Q4_0`, `Q8_0` or `F32`: how an integer layer's weight (or a float module's) is stored."""
    s = mod.weight_spec if isinstance(mod, IntLayer) else None
    if s is None:
        return "F32"
    ok = s.symmetric and not s.narrow_range and s.granularity == "per_group"
    if ok and s.group_size == BLOCK and s.bits in (4, 8):
        if s.scale_dtype != "fp16":
            raise ValueError(
                f"{name}: GGUF stores fp16 block scales; train with scale_dtype: fp16 "
                "so the file holds exactly the trained weights"
            )
        return "Q4_0" if s.bits == 4 else "Q8_0"
    return "F32"


def q4_0_blocks(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """(out, in) codes in [-8, 7] and (out, in/32) scales -> (out, in/32 * 18) uint8."""
    out, n = q.shape
    nib = (q.reshape(out, n // BLOCK, BLOCK) + 8).to(torch.uint8).numpy()
    packed = nib[..., :16] | (nib[..., 16:] << 4)  # (out, G, 16)
    d = s.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    return np.concatenate([d, packed], axis=-1).reshape(out, -1)


def q8_0_blocks(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    """(out, in) int8 codes and (out, in/32) scales -> (out, in/32 * 34) uint8."""
    out, n = q.shape
    qs = q.reshape(out, n // BLOCK, BLOCK).numpy().view(np.uint8)
    d = s.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def _rope_permute(t: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf does).

    Rows move whole, so a row's quantization blocks move with it unchanged.
    """
    return (
        t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:])
        .swapaxes(1, 2)
        .reshape(t.shape)
    )


def _tensor(model: nn.Module, name: str, permute_heads: int | None = None):
    mod = model.get_submodule(name)
    kind = gguf_type_for(mod, name)
    if kind == "F32":
        data = mod.dequantized_weight() if isinstance(mod, IntLayer) else mod.weight
        arr = data.detach().float().numpy()
    else:  # the codes and fp16 scales convert stored: what the parity gate checked
        q, s = mod.int_weight().to(torch.int8), mod.weight_scale.float()  # (out, in), (out, G)
        arr = q4_0_blocks(q, s) if kind == "Q4_0" else q8_0_blocks(q, s)
    if permute_heads:
        arr = _rope_permute(arr, permute_heads)
    return arr, kind


def write_gguf(model: nn.Module, path: str | Path, vocab: list[str] | None = None) -> Path:
    """Write the llama-style `GPT` as a GGUF file, atomically, from its integer `model` (what
    `qat.convert` made and the parity gate checked: the same road to integer codes as the
    artifact and ONNX).

    `vocab` is the character vocabulary (id -> string; id 0 the unknown token).
    """
    import gguf

    if not any(isinstance(m, IntLayer) for m in model.modules()):
        raise ValueError("write_gguf takes the integer model that qat.convert (or qat.load) made, "
                         "not the prepared fake-quant model: it writes the converted codes")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks") or not hasattr(model, "lm_head"):
        raise ValueError("GGUF export supports qat's llama-style GPT (builder 'gpt') only")
    path = Path(path)
    with atomic_path(path, "GGUF file") as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name("qat-gpt")
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.mlp_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        w.add_rope_dimension_count(cfg.d_model // cfg.n_head)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        _add_vocab(w, gguf, vocab, cfg.vocab_size)
        for name, arr, kind in _tensors(model, cfg):
            raw = None if kind == "F32" else getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _tensors(model: nn.Module, cfg):
    def norm(name: str) -> np.ndarray:
        return model.get_submodule(name).weight.detach().float().numpy()

    yield ("token_embd.weight", *_tensor(model, "tok_emb"))
    for i in range(len(model.blocks)):
        p, b = f"blk.{i}", f"blocks.{i}"
        yield (f"{p}.attn_norm.weight", norm(f"{b}.attn_norm"), "F32")
        yield (f"{p}.attn_q.weight", *_tensor(model, f"{b}.attn.q_proj", cfg.n_head))
        yield (f"{p}.attn_k.weight", *_tensor(model, f"{b}.attn.k_proj", cfg.n_head))
        yield (f"{p}.attn_v.weight", *_tensor(model, f"{b}.attn.v_proj"))
        yield (f"{p}.attn_output.weight", *_tensor(model, f"{b}.attn.o_proj"))
        yield (f"{p}.ffn_norm.weight", norm(f"{b}.mlp_norm"), "F32")
        yield (f"{p}.ffn_gate.weight", *_tensor(model, f"{b}.mlp.gate_proj"))
        yield (f"{p}.ffn_up.weight", *_tensor(model, f"{b}.mlp.up_proj"))
        yield (f"{p}.ffn_down.weight", *_tensor(model, f"{b}.mlp.down_proj"))
    yield ("output_norm.weight", norm("norm"), "F32")
    yield ("output.weight", *_tensor(model, "lm_head"))


def _add_vocab(w, gguf, vocab: list[str] | None, size: int) -> None:
    if vocab is None:
        vocab = ["<unk>"] + [chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in range(1, size)]
    if len(vocab) != size:
        raise ValueError(
            f"vocabulary has {len(vocab)} entries but the model's vocab_size is {size}"
        )
    # SentencePiece-style: a space is '▁'; id 0 is the unknown token.
    tokens = ["<unk>"] + [t.replace(" ", "\u2581") for t in vocab[1:]]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * size)
    w.add_token_types([gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * (size - 1))
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
