"""`QATMultiheadAttention`: `nn.MultiheadAttention` with its two projections as fake-quant Linears.

`nn.MultiheadAttention` keeps its input projection as a raw `(3E, E)` parameter and reads its
`out_proj` weight inside `F.multi_head_attention_forward` without calling `out_proj`, so no
fake-quant layer can sit in it. This container computes the same attention with the two
projections as `QATLinear` children that it calls (`in_proj`, sharing the parameters
`in_proj_weight`/`in_proj_bias`, and `out_proj`): the recipe's weight and input specs apply to
both, its output spec to the block's output. `convert` turns the children into `IntLinear`s and
keeps this container, whose attention core (scores, softmax, weighted sum) stays float.
Supported: equal query/key/value sizes, no `add_bias_kv`, no `add_zero_attn`, dense inputs
(`nn.TransformerEncoder(..., enable_nested_tensor=False)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.modules import QATLinear
from qat.quant.spec import QuantSpec


def _linear_view(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An `nn.Linear` holding these very parameters (no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin


class QATMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention`, same call and results, with quantizable projections.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(2, 5, 8)
        >>> qmha = QATMultiheadAttention.from_float(mha)  # no specs: float, same numbers
        >>> torch.allclose(qmha(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    FLOAT_TYPE = nn.MultiheadAttention
    INTEGER_INPUTS = QATLinear.INTEGER_INPUTS
    OUTPUT_AXIS = 0
    # torch's fused TransformerEncoderLayer path reads the raw projection weights, which would
    # bypass the quantizers; it declines a module whose `_qkv_same_embed_dim` is False.
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj, self.out_proj = in_proj, out_proj
        self.training = mha.training

    @staticmethod
    def weight_shapes(mod: nn.MultiheadAttention) -> list[tuple[int, ...]]:
        return [tuple(mod.in_proj_weight.shape), tuple(mod.out_proj.weight.shape)]

    @staticmethod
    def activation_widths(mod: nn.MultiheadAttention) -> dict[str, int | None]:
        same = mod.kdim == mod.vdim == mod.embed_dim  # query, key and value share a quantizer
        return {"input": mod.embed_dim if same else None, "output": mod.embed_dim}

    @classmethod
    def from_float(
        cls,
        mod: nn.MultiheadAttention,
        weight: QuantSpec | None = None,
        input: QuantSpec | None = None,  # noqa: A002 - the recipe's key
        output: QuantSpec | None = None,
        name: str = "",
    ) -> QATMultiheadAttention:
        """The container over `mod`'s parameters (shared), quantized as the specs say."""
        unsupported = [k for k, bad in (("kdim/vdim", not mod._qkv_same_embed_dim),
                                        ("add_bias_kv", mod.bias_k is not None),
                                        ("add_zero_attn", mod.add_zero_attn)) if bad]  # fmt: skip
        if unsupported:
            raise ValueError(f"{name or 'MultiheadAttention'}: {', '.join(unsupported)} is not "
                             "supported for quantization; add the module to the recipe's ignore")
        in_proj = _linear_view(mod.in_proj_weight, mod.in_proj_bias)
        out_proj = _linear_view(mod.out_proj.weight, mod.out_proj.bias)
        if weight is not None or input is not None or output is not None:
            in_proj = QATLinear.from_float(in_proj, weight, input, None, f"{name}.in_proj")
            out_proj = QATLinear.from_float(out_proj, weight, input, output, f"{name}.out_proj")
        return cls(mod, in_proj, out_proj)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def _project(self, query, key, value):
        e = self.embed_dim
        if key is query and value is query:  # self-attention: one call
            return self.in_proj(query).split(e, dim=-1)
        q = self.in_proj(query)[..., :e]
        k = self.in_proj(key)[..., e : 2 * e]
        v = self.in_proj(value)[..., 2 * e :]
        return q, k, v

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested:
            raise ValueError("QATMultiheadAttention takes dense tensors: build the "
                             "nn.TransformerEncoder with enable_nested_tensor=False")  # fmt: skip
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E)
        n, h = q.shape[1], self.num_heads
        d = self.embed_dim // h

        def heads(t: torch.Tensor) -> torch.Tensor:  # (T, N, E) -> (N, H, T, D)
            return t.reshape(t.shape[0], n, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (N, H, L, S)
        scores = scores + self._mask(attn_mask, key_padding_mask, is_causal, scores)
        probs = torch.softmax(scores, dim=-1)
        used = F.dropout(probs, self.dropout, self.training) if self.dropout > 0 else probs
        out = (used @ v).permute(2, 0, 1, 3).reshape(q.shape[2], n, self.embed_dim)
        y = self.out_proj(out)  # (L, N, E)
        if not batched:
            y = y.squeeze(1)
        elif self.batch_first:
            y = y.transpose(0, 1)
        if not need_weights:
            return y, None
        w = probs.mean(1) if average_attn_weights else probs
        return y, (w if batched else w.squeeze(0))

    def _mask(self, attn_mask, key_padding_mask, is_causal, scores):
        """The additive float mask (0 or -inf) of `nn.MultiheadAttention`'s mask arguments."""
        n, h, lq, s = scores.shape
        total = torch.zeros((), dtype=scores.dtype, device=scores.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, s, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            m = _additive(attn_mask, scores.dtype)
            total = total + (m.reshape(n, h, lq, s) if m.dim() == 3 else m)
        if key_padding_mask is not None:
            total = total + _additive(key_padding_mask, scores.dtype)[:, None, None, :]
        return total


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True: not allowed to attend
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)
