"""A Llama distilled on tokens of a pretrained tokenizer (SmolLM2's), exported as a GGUF that
llama.cpp runs with that tokenizer: `experiment=smollm2_q4_0`'s road, on a tiny model."""

from pathlib import Path

import gguf
import pytest

from qat.data import GGUFTokenizer
from qat.pretrained import smollm2_gguf
from qat.train.run import run

llama_cpp = pytest.importorskip("llama_cpp")

TINY_LLAMA = ("+model.args.config={model_type:llama,vocab_size:49152,hidden_size:64,"
              "num_hidden_layers:2,num_attention_heads:4,num_key_value_heads:2,"
              "intermediate_size:128,max_position_embeddings:64,tie_word_embeddings:true}")


def test_distilled_llama_on_gguf_tokens_exports_a_gguf_with_its_tokenizer(make_cfg):
    cfg = make_cfg([
        "experiment=smollm2_q4_0", "model.builder=hf_causal_lm",
        TINY_LLAMA, "+model.args.seed=0", "data.block_size=32", "data.batch_size=2",
        "data.max_eval_blocks=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "threads=2",
    ])  # fmt: skip
    res = run(cfg)
    assert res["qat"]["test/ppl"] > 1 and res["export"]["test/ppl"] == pytest.approx(
        res["qat"]["test/ppl"], rel=1e-4)  # fmt: skip
    path = Path(res["artifacts"]["gguf"])
    gate = res["artifacts"]["gguf_parity"]  # llama.cpp against the integer model, at export
    assert gate["top1"] >= 0.9 and gate["rel"] <= 0.1
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["token_embd.weight"] == "Q8_0"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"  # SmolLM2's BPE
    text = "ROMEO: But soft, what light through yonder window breaks?"
    tok = GGUFTokenizer(path)
    try:
        assert tok.encode(text) == GGUFTokenizer(smollm2_gguf()).encode(text)
        assert tok.decode(tok.encode(text)) == text
    finally:
        tok.close()


def test_loading_the_real_gguf_prints_no_library_progress_bars():
    """train.py on the shipped SmolLM2 GGUF: transformers' tqdm bars (dequantizing the GGUF,
    loading weights) stay off; the run's one line is the error it was asked to hit."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "train.py"), "experiment=smollm2_q4_0",
                           "ckpt_path=/no/such.ckpt"], capture_output=True, text=True,
                          timeout=300, cwd=root, env=env)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ckpt_path=/no/such.ckpt does not exist" in out
    for bar in ("Converting and de-quantizing", "Loading weights", "it/s]"):
        assert bar not in out, out[-2000:]
