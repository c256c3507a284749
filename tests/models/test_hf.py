"""The Hugging Face adapter: the real MiniLM offline, and tiny models from config dicts."""

import pytest
import torch

from qat.models import HFEncoder, build_model, mean_pool
from qat.pretrained import minilm_path
from qat.quant.provenance import provenance

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


@pytest.fixture(scope="module")
def minilm():
    return build_model("minilm").eval()


@pytest.fixture(scope="module")
def batch():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_minilm_is_the_pretrained_22m_bert(minilm):
    assert isinstance(minilm, HFEncoder) and minilm.config.model_type == "bert"
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216
    assert provenance(minilm).build_args == {} and minilm.normalize


@torch.no_grad()
def test_minilm_embeddings_equal_transformers_used_directly(minilm, batch):
    reference = transformers.AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    hidden = reference.eval()(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    got = minilm(batch["input_ids"], batch["attention_mask"])
    assert got.shape == (4, 384)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_minilm_embeddings_carry_meaning(minilm, batch):
    emb = minilm(batch["input_ids"], batch["attention_mask"])
    sim = emb @ emb.T
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert sim[0, 1] > 0.6 > sim[0, 2] and sim[0, 1] > sim[0, 3]


@torch.no_grad()
def test_padding_does_not_change_an_embedding(minilm, batch):
    alone = minilm(batch["input_ids"][:1, :8], batch["attention_mask"][:1, :8])  # no padding
    assert batch["attention_mask"][0].sum() == 8
    padded = minilm(batch["input_ids"][:1], batch["attention_mask"][:1])
    torch.testing.assert_close(alone, padded, rtol=1e-4, atol=1e-5)


def test_mean_pool_ignores_masked_positions():
    hidden = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[1.5, 2.5, 3.5]]))


def test_tiny_llama_from_a_config_dict_gives_logits():
    model = build_model("hf_causal_lm", config=TINY_LLAMA, seed=0)
    idx = torch.randint(0, 100, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 100)
    again = build_model("hf_causal_lm", config=TINY_LLAMA, seed=0)
    torch.testing.assert_close(again(idx), logits)  # the seed fixes the random init


def test_encoder_and_classifier_from_config_dicts():
    encoder = build_model("hf_encoder", config=TINY_BERT, normalize=True, seed=0)
    emb = encoder(torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.long))
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    classifier = build_model("hf_classifier", config=TINY_BERT, num_labels=3, seed=0)
    assert classifier(torch.randint(0, 100, (2, 5))).shape == (2, 3)


def test_save_pretrained_directory_round_trips(tmp_path):
    model = build_model("hf_causal_lm", config=TINY_LLAMA, seed=1)
    model.model.save_pretrained(tmp_path / "tiny")
    loaded = build_model("hf_causal_lm", path=str(tmp_path / "tiny"))
    idx = torch.randint(0, 100, (1, 6))
    torch.testing.assert_close(loaded(idx), model.eval()(idx))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        build_model("hf_encoder", path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model("hf_encoder", path=str(tmp_path))
    with pytest.raises(ValueError, match="`model_type` key"):
        build_model("hf_encoder", config={"hidden_size": 8})
    with pytest.raises(ValueError, match="exactly one of `path`"):
        build_model("hf_encoder")


def test_activation_checkpointing_changes_memory_not_the_step():
    """`module.activation_checkpointing`: one distillation step of a fake-quant tiny Llama
    gives bit-identical loss and gradients with and without recomputation."""
    import copy

    import qat
    from qat.train.module import QATModule
    from tests.export.helpers import LLAMA

    recipe = "configs/recipe/q4_0_llama.yaml"
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"x": ids[:, :-1], "y": ids[:, 1:]}
    grads = []
    for ckpt in (False, True):
        model = build_model("hf_causal_lm", config=LLAMA, seed=0)
        teacher = copy.deepcopy(model)
        student = qat.prepare(model, recipe).train()
        m = QATModule(student, "causal_lm", teacher=teacher, kd_weight=1.0,
                      activation_checkpointing=ckpt)  # fmt: skip
        loss = m.training_step(batch, 0)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in student.parameters()
                                        if p.grad is not None])  # fmt: skip
    assert student.model.model.gradient_checkpointing
    assert len(grads[0]) == len(grads[1]) > 10
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    with pytest.raises(ValueError, match="activation_checkpointing: the model has no"):
        QATModule(torch.nn.Linear(2, 2), "classification", num_classes=2,
                  activation_checkpointing=True)  # fmt: skip
