"""`write_gguf`: a Llama-family integer model as a GGUF file for llama.cpp.

Linear weights on llama.cpp's grids (symmetric, groups of 32, 4 or 8 bits, fp16 scales) are
written as Q4_0 / Q8_0 blocks from the trained codes; everything else as F32.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qat.export.gguf.blocks import weight_array
from qat.export.gguf.layout import Layout, layout_of, rope_permute
from qat.export.gguf.vocab import add_char_vocab, copy_tokenizer
from qat.export.integer.layer import IntLayer
from qat.io import atomic_path


def write_gguf(
    model: nn.Module,
    path: str | Path,
    vocab: list[str] | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write integer `model` (what `qat.convert` made and the parity gate checked: the same
    road to integer codes as the artifact and ONNX) as a GGUF file, atomically.

    `model` is qat's llama-style GPT or a Hugging Face Llama causal LM. The tokenizer is
    copied from GGUF file `tokenizer_from` (a pretrained model's source file), or else built
    from `vocab`, a character vocabulary (id -> string; id 0 the unknown token).
    """
    if not any(isinstance(m, IntLayer) for m in model.modules()):
        raise ValueError("write_gguf takes the integer model that qat.convert (or qat.load) made, "
                         "not the prepared fake-quant model: it writes the converted codes")
    return _write(model, path, vocab, tokenizer_from)


def write_float_gguf(
    model: nn.Module,
    path: str | Path,
    vocab: list[str] | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """The float model (no quantizers) as an F32 GGUF file: the reference llama.cpp's own
    quantizer (`llama_model_quantize`) starts from. Arguments as `write_gguf`."""
    if any(isinstance(m, IntLayer) or hasattr(m, "weight_quant") for m in model.modules()):
        raise ValueError("write_float_gguf takes the float model; write an integer one with "
                         "write_gguf")  # fmt: skip
    return _write(model, path, vocab, tokenizer_from)


def _write(model: nn.Module, path: str | Path, vocab, tokenizer_from) -> Path:
    import gguf

    layout = layout_of(model)
    arrays = [(name, *_array(model.get_submodule(mod), mod, heads, norm))
              for name, mod, heads, norm in layout.tensors()]  # fmt: skip
    path = Path(path)
    with atomic_path(path, "GGUF file") as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _add_hparams(w, layout)
        if tokenizer_from is not None:
            copy_tokenizer(w, gguf, tokenizer_from, layout.vocab)
        else:
            add_char_vocab(w, gguf, vocab, layout.vocab)
        for name, arr, kind in arrays:
            raw = None if kind == "F32" else getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _array(mod: nn.Module, name: str, heads: int | None, norm: bool):
    if norm:
        return mod.weight.detach().float().numpy(), "F32"
    arr, kind = weight_array(mod, name)
    return (rope_permute(arr, heads) if heads else arr), kind


def _add_hparams(w, layout: Layout) -> None:
    w.add_name(layout.name)
    w.add_context_length(layout.context)
    w.add_embedding_length(layout.width)
    w.add_block_count(layout.layers)
    w.add_feed_forward_length(layout.ffn)
    w.add_head_count(layout.heads)
    w.add_head_count_kv(layout.kv_heads)
    w.add_rope_dimension_count(layout.head_dim)
    if layout.head_dim * layout.heads != layout.width:
        w.add_key_length(layout.head_dim)
        w.add_value_length(layout.head_dim)
    w.add_rope_freq_base(layout.rope_theta)
    w.add_layer_norm_rms_eps(layout.norm_eps)
    w.add_vocab_size(layout.vocab)
