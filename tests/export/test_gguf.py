"""GGUF: read back with the gguf package's own reader and dequantizer; compare to training."""

from pathlib import Path

import numpy as np
import pytest
import torch

import qat
from qat.export.gguf import rope_permute, write_gguf
from qat.models.registry import build_model

gguf = pytest.importorskip("gguf")
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipe"


def trained_gpt(recipe: str):
    torch.manual_seed(0)
    model = build_model("gpt", preset="tiny", vocab_size=67, block_size=32)
    qat.prepare(model, RECIPES / recipe)
    x = torch.randint(0, 67, (4, 32))
    qat.quant.calibrate(model, [x], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):  # move weights and learned scales away from their initial values
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("recipe,qtype", [("w4g32.yaml", "Q4_0"), ("w8g32.yaml", "Q8_0")])
def test_gguf_weights_equal_the_fake_quant_weights_bit_for_bit(tmp_path, recipe, qtype):
    model = trained_gpt(recipe)
    vocab = ["\ufffd"] + [chr(c) for c in range(32, 32 + 66)]
    path = write_gguf(qat.convert(model), tmp_path / "model.gguf", vocab=vocab)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    n_head = model.config.n_head
    checked = 0
    for i, blk in enumerate(model.blocks):
        for gname, mod, perm in [
            ("attn_q", blk.attn.q_proj, True),
            ("attn_k", blk.attn.k_proj, True),
            ("attn_v", blk.attn.v_proj, False),
            ("attn_output", blk.attn.o_proj, False),
            ("ffn_gate", blk.mlp.gate_proj, False),
            ("ffn_up", blk.mlp.up_proj, False),
            ("ffn_down", blk.mlp.down_proj, False),
        ]:
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == qtype
            got = gguf.quants.dequantize(t.data, t.tensor_type)
            want = mod.quantized_weight().detach().numpy()
            if perm:
                want = rope_permute(want, n_head)
            np.testing.assert_array_equal(got.reshape(want.shape), want)
            checked += 1
    out = tensors["output.weight"]
    got = gguf.quants.dequantize(out.data, out.tensor_type)
    np.testing.assert_array_equal(got.reshape(67, -1), model.lm_head.quantized_weight().detach())
    assert checked == 14
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F32"
    np.testing.assert_array_equal(emb.data.reshape(67, -1), model.tok_emb.weight.detach())
    # Metadata: llama architecture keys and the character vocabulary.
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    toks = fields["tokenizer.ggml.tokens"]
    assert bytes(toks.parts[toks.data[5]]).decode() == vocab[5]
    assert bytes(toks.parts[toks.data[1]]).decode() == " "  # literal, for llama.cpp's rwkv matcher
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "rwkv"


def test_q4_0_nibble_order_matches_llama_cpp():
    from qat.export.gguf import q4_0_blocks

    q = torch.arange(-8, 24).remainder(16).sub(8).reshape(1, 32).to(torch.int8)
    blk = q4_0_blocks(q, torch.tensor([[0.5]]))
    assert blk.shape == (1, 18)
    # Element j in the low nibble of byte j, element j + 16 in the high nibble.
    for j in range(16):
        assert blk[0, 2 + j] & 0x0F == int(q[0, j]) + 8
        assert blk[0, 2 + j] >> 4 == int(q[0, j + 16]) + 8


def test_gguf_refuses_fp32_block_scales_and_other_models(tmp_path):
    model = trained_gpt("w4g32_a8dyn.yaml")
    fq = model.blocks[0].attn.q_proj.weight_quant
    object.__setattr__(fq.spec, "scale_dtype", "fp32")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj: GGUF stores fp16 block scales"):
        write_gguf(qat.convert(model), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match=r"takes the integer model that qat\.convert"):
        write_gguf(model, tmp_path / "m.gguf")  # the prepared model: its weights are float
    with pytest.raises(ValueError, match="llama-style GPT.*Hugging Face Llama"):
        cnn = qat.prepare(build_model("cnn"), RECIPES / "w8.yaml")
        cnn(torch.randn(2, 1, 8, 8))  # calibrates the weight observers
        write_gguf(qat.convert(cnn.eval()), tmp_path / "c.gguf")
