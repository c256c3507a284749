"""GPTQ on one matrix: the same codes as a written-out reference, on the recipe's grid, and a
lower layer error than round-to-nearest on real weights and inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qat.ptq import GPTQConfig, gptq_quantize
from qat.ptq.gptq import weight_qparams
from qat.quant import QuantSpec, grid

SPECS = {
    "w4 per-channel": QuantSpec(bits=4, granularity="per_channel"),
    "w3g16 asymmetric": QuantSpec(bits=3, granularity="per_group", group_size=16,
                                  symmetric=False),  # fmt: skip
    "w8 per-tensor": QuantSpec(bits=8),
    "q4_0 (fp16 scales)": QuantSpec(bits=4, granularity="per_group", group_size=16,
                                    scale_dtype="fp16"),  # fmt: skip
    "w4 mse observer": QuantSpec(bits=4, granularity="per_channel", observer="mse"),
}


def reference_gptq(w, h, spec, percdamp, act_order):
    """GPTQ as the OBS update it is, one column at a time in float64, without Cholesky or
    blocks: quantize column j, move the remaining columns by `err * Hinv[j, rest] / Hinv[j, j]`,
    then eliminate j from the inverse Hessian."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    grouped = spec.granularity == "per_group"
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    if not grouped or act_order:
        scale, zp = weight_qparams(w.float(), spec)
    else:
        scale = torch.zeros(w.shape[0], cols // spec.group_size)
        zp = torch.zeros_like(scale)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.inv(h + percdamp * torch.diagonal(h).mean() * torch.eye(cols))
    codes = torch.zeros_like(w)
    for j in range(cols):
        col = int(perm[j])
        if grouped and not act_order and col % spec.group_size == 0:
            s, z = weight_qparams(w[:, j : j + spec.group_size].float(), spec)
            scale[:, col // spec.group_size], zp[:, col // spec.group_size] = s[:, 0], z[:, 0]
        if spec.granularity == "per_tensor":
            s, z = scale.double(), zp.double()
        elif grouped:
            s, z = scale[:, col // spec.group_size].double(), zp[:, col // spec.group_size].double()
        else:
            s, z = scale.double(), zp.double()
        q = torch.clamp(torch.round(w[:, j] / s) + z, spec.qmin, spec.qmax)
        codes[:, j] = q
        err = (w[:, j] - (q - z) * s) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes[:, torch.argsort(perm)].float(), scale, zp


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features and a few dead ones, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (mix + torch.eye(cols))
    x[:, :2] = 0
    return x


@pytest.mark.parametrize("act_order", [False, True], ids=["in order", "act_order"])
@pytest.mark.parametrize("name", list(SPECS))
def test_codes_and_scales_equal_the_written_out_reference(name, act_order):
    spec = SPECS[name]
    x = correlated_inputs(256, 64, 0)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = GPTQConfig(percdamp=0.01, block_size=32, act_order=act_order)
    q, s, z = gptq_quantize(w, h, spec, cfg)
    rq, rs, rz = reference_gptq(w, h, spec, 0.01, act_order)
    torch.testing.assert_close(s, rs.reshape(s.shape), rtol=0, atol=0)
    torch.testing.assert_close(z, rz.reshape(z.shape), rtol=0, atol=0)
    assert torch.equal(q, rq)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax and torch.equal(q, q.round())
    if spec.scale_dtype == "fp16":
        assert torch.equal(s, s.half().float())


def test_block_size_only_batches_the_updates():
    spec = SPECS["q4_0 (fp16 scales)"]
    x = correlated_inputs(256, 64, 2)
    h, w = 2 * x.T @ x / 256, torch.randn(8, 64, dtype=torch.float64)
    small = gptq_quantize(w, h, spec, GPTQConfig(block_size=16))[0]
    assert torch.equal(small, gptq_quantize(w, h, spec, GPTQConfig(block_size=64))[0])


def test_dequantized_codes_fake_quantize_to_themselves():
    """What GPTQ writes into the layer is a fixed point of the fake quantizer: `convert`
    finds exactly GPTQ's codes."""
    spec = SPECS["w3g16 asymmetric"]
    x = correlated_inputs(128, 32, 3).float()
    w = torch.randn(6, 32)
    q, s, z = gptq_quantize(w, 2 * x.T @ x / 128, spec)
    w_hat = grid.dequantize(q, s, z, spec)
    assert torch.equal(grid.quantize(w_hat, s, z, spec), q)


def test_a_grid_gptq_cannot_walk_is_refused():
    h = torch.eye(64)
    with pytest.raises(ValueError, match="block_size: 48 must be a multiple of .*group_size"):
        spec = dataclasses.replace(SPECS["w3g16 asymmetric"], group_size=32)
        gptq_quantize(torch.randn(4, 64), h, spec, GPTQConfig(block_size=48))
    with pytest.raises(ValueError, match="ptq.percdamp: got 0"):
        GPTQConfig(percdamp=0)


def layer_error(w, w_hat, x):
    return float(((x @ (w - w_hat).T) ** 2).sum())


@pytest.mark.parametrize("spec", [SPECS["w4 per-channel"], SPECS["q4_0 (fp16 scales)"]],
                         ids=["w4 per-channel", "q4_0"])  # fmt: skip
def test_lower_layer_error_than_round_to_nearest_on_real_weights(spec, minilm_ffn):
    """MiniLM's first FFN projection on its real inputs (Shakespeare lines): GPTQ's
    `||W X - W_hat X||^2` on held-out rows is well below round-to-nearest's."""
    w, x = minilm_ffn
    fit, held = x[: len(x) // 2], x[len(x) // 2 :]
    q, s, z = gptq_quantize(w, 2 * fit.T @ fit / len(fit), spec)
    gptq = layer_error(w, grid.dequantize(q, s, z, spec), held)
    rs, rz = weight_qparams(w, spec)
    rtn = layer_error(w, grid.dequantize(grid.quantize(w, rs, rz, spec), rs, rz, spec), held)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def _reduce_on_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from qat.ptq.hessian import Hessian

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    h = Hessian(3)
    h.add(torch.arange(6.0).reshape(2, 3) * (rank + 1))  # each rank its own rows
    h.reduce()
    out[rank] = h.matrix()
    dist.destroy_process_group()


def test_ranks_sum_their_rows_into_one_hessian():
    import socket

    import torch.multiprocessing as mp

    from qat.ptq.hessian import Hessian

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_reduce_on_rank, args=(port, out), nprocs=2)
    whole = Hessian(3)
    for r in (0, 1):
        whole.add(torch.arange(6.0).reshape(2, 3) * (r + 1))
    assert torch.equal(out[0], whole.matrix()) and torch.equal(out[1], whole.matrix())
