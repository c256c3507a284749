"""Entry point. Until the Lightning/Hydra trainer lands: a demo of the quantization core."""

from __future__ import annotations

import torch
from torch import nn

from qat.quant import QuantSpec
from qat.quant.modules import QATLinear


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    float_layer = nn.Linear(64, 64)
    ref = float_layer(x)
    for bits in (8, 4, 2):
        layer = QATLinear.from_float(
            float_layer,
            weight=QuantSpec(bits=bits, granularity="per_channel"),
            input=QuantSpec(bits=8, symmetric=False),
            name="fc",
        )
        y = layer(x)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean())
        print(f"W{bits}A8 per-channel Linear(64, 64): SQNR {sqnr.item():.1f} dB")


if __name__ == "__main__":
    main()
