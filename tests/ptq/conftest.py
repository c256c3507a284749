from __future__ import annotations

import pytest
import torch

from qat.data.plays import play_files, read_play
from qat.models.registry import build_model
from qat.pretrained import load_tokenizer, minilm_path


@pytest.fixture(scope="session")
def minilm_ffn() -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's first FFN weight `(1536, 384)` and its real inputs on Shakespeare lines
    `(N, 384)`, float64."""
    model = build_model("minilm").eval()
    layer = model.model.encoder.layer[0].intermediate.dense
    text = read_play(sorted(play_files().values())[0])
    lines = [ln for ln in text.splitlines() if len(ln.split()) > 4][:96]
    batch = load_tokenizer(minilm_path())(lines, padding=True, return_tensors="pt")
    rows = []
    handle = layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])
    handle.remove()
    mask = batch["attention_mask"].bool()
    return layer.weight.detach().double(), rows[0][mask].double()
