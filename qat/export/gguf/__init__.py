"""GGUF (llama.cpp) export of Llama-family models from their integer codes.

- `blocks`: Q4_0 / Q8_0 blocks from a layer's trained codes and fp16 scales;
- `layout`: where each tensor of a model goes (qat's GPT, Hugging Face Llama) and the
  hyper-parameters llama.cpp reads;
- `vocab`: the tokenizer metadata (a character vocabulary, or carried over from a GGUF file);
- `writer`: `write_gguf` (an integer model), `write_float_gguf` (its float reference).
"""

from qat.export.gguf.blocks import BLOCK, gguf_type_for, q4_0_blocks, q8_0_blocks
from qat.export.gguf.layout import rope_permute
from qat.export.gguf.writer import write_float_gguf, write_gguf

__all__ = [
    "BLOCK", "gguf_type_for", "q4_0_blocks", "q8_0_blocks", "rope_permute", "write_float_gguf",
    "write_gguf",
]  # fmt: skip
