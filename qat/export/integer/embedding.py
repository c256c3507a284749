"""`IntEmbedding`: an integer `nn.Embedding`, gathering code rows and dequantizing them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qat.export.integer import packing
from qat.export.integer.layer import IntLayer
from qat.quant.spec import QuantSpec


class IntEmbedding(IntLayer):
    """Integer `nn.Embedding`: gathers code rows and dequantizes them (as training did).

    Example:
        >>> emb = IntEmbedding(10, 4, weight_spec=QuantSpec(bits=4, granularity="per_channel"))
        >>> emb(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 4])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        weight_spec: QuantSpec | None = None,
        input_spec: None = None,
        output_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        if input_spec is not None:
            raise ValueError("IntEmbedding: the input is integer indices; input_spec must be None")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        shape = (num_embeddings, embedding_dim)
        self._init_quant_state(shape, weight_spec, None, output_spec, bias=False)

    @classmethod
    def from_qat(cls, mod, weight_spec, input_spec, output_spec) -> IntEmbedding:
        if mod.max_norm is not None:
            raise ValueError("Embedding(max_norm=...) renormalizes its table on every lookup; "
                             "integer export does not support it")  # fmt: skip
        return cls(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, weight_spec,
                   input_spec, output_spec)  # fmt: skip

    def layer_args(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        ws = self.weight_spec
        if ws is None:
            return self.fake_quant_act("output", F.embedding(idx, self.float_weight))
        d = self.embedding_dim
        rows = self.weight_codes[idx]  # (*idx, D) or packed (*idx, ceil(D*bits/8))
        q = packing.unpack_rows(rows, ws, d) if packing.is_packed(ws) else rows
        s, z = self.weight_qparams()
        g = ws.granularity
        v = q.float()
        if g == "per_group":
            v = v.unflatten(-1, (-1, ws.group_size))  # (*idx, G, g)
            s, z = s[idx][..., None], z[idx][..., None]
        elif g == "per_channel" and ws.axis % 2 == 0:
            s, z = s[idx][..., None], z[idx][..., None]
        # Same expression as grid.dequantize: (q - z) * s in fp32.
        y = ((v - z) * s).reshape(*idx.shape, d)
        return self.fake_quant_act("output", y)
