"""The llama-style GPT: names, causality, rotary maths, loss at init, learning on real text."""

import math
from fnmatch import fnmatch

import pytest
import torch
import torch.fx
from torch import nn

from qat.data.plays import play_files, read_play
from qat.data.vocab import CharVocab
from qat.models import GPT, build_model
from qat.models.gpt import apply_rotary, rotary_tables


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("gpt", **{"preset": "tiny", "vocab_size": 67, "block_size": 32, **overrides})


@pytest.fixture(scope="module")
def hamlet_batch():
    text = read_play(play_files()["hamlet"])
    vocab = CharVocab.from_texts([text])
    ids = torch.tensor(vocab.encode(text[20000 : 20000 + 8 * 65])).view(8, 65)
    return vocab.size, ids[:, :-1], ids[:, 1:]


def test_presets_and_shapes():
    small = build_model("gpt", vocab_size=90, block_size=64)
    assert isinstance(small, GPT) and len(small.blocks) == 4 and small.config.d_model == 128
    model = tiny()
    assert len(model.blocks) == 2 and model.config.d_model == 64
    idx = torch.randint(0, 67, (3, 32))
    logits = model(idx)
    assert logits.shape == (3, 32, 67) and logits.dtype == torch.float32
    assert model(idx[:, :5]).shape == (3, 5, 67)


def test_module_names_fit_recipe_globs():
    names = {name: type(m) for name, m in tiny().named_modules()}
    attn = sorted(n for n in names if fnmatch(n, "blocks.*.attn.*"))
    mlp = sorted(n for n in names if fnmatch(n, "blocks.*.mlp.*"))
    assert attn == [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "koqv"]
    assert len(mlp) == 6 and all(names[n] is nn.Linear for n in attn + mlp)
    assert names["tok_emb"] is nn.Embedding and names["lm_head"] is nn.Linear
    assert sum(t is nn.Linear for t in names.values()) == 2 * 7 + 1


def test_tied_head_shares_the_embedding():
    model = tiny(tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny()
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    idx = torch.randint(0, 67, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 67
    torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_rotary_matches_complex_multiplication():
    x = torch.randn(2, 3, 10, 8)
    cos, sin = rotary_tables(8, 10, theta=10000.0)
    z = torch.complex(x[..., :4], x[..., 4:])
    pos = torch.arange(10)[:, None] * (10000.0 ** (-torch.arange(0, 8, 2) / 8))[None]
    ref = z * torch.polar(torch.ones_like(pos), pos)
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.cat([ref.real, ref.imag], -1))


def test_fx_trace_matches_eager_and_long_inputs_are_refused():
    model = tiny().eval()
    traced = torch.fx.symbolic_trace(model)
    idx = torch.randint(0, 67, (2, 17))
    torch.testing.assert_close(traced(idx), model(idx))
    with pytest.raises(AssertionError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_loss_at_init_is_close_to_log_vocab(hamlet_batch):
    vocab_size, x, y = hamlet_batch
    model = build_model("gpt", preset="small", vocab_size=vocab_size, block_size=64)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(vocab_size)) < 0.1


def test_a_few_steps_on_one_batch_drive_the_loss_down(hamlet_batch):
    vocab_size, x, y = hamlet_batch
    torch.manual_seed(0)
    model = build_model("gpt", preset="tiny", vocab_size=vocab_size, block_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_appends_tokens():
    model = tiny().eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 40, top_k=5)
    assert out.shape == (2, 43) and out.max() < 67
    greedy = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert torch.equal(
        greedy, model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    )


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'"):
        build_model("gpt", preset="huge")
    with pytest.raises(ValueError, match="unknown GPT option\\(s\\) \\['n_layers'\\]"):
        build_model("gpt", n_layers=3)
    with pytest.raises(ValueError, match="heads of even size"):
        build_model("gpt", preset=None, d_model=30, n_head=4)
