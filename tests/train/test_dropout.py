"""`module.dropout`: distilling a pretrained model towards its own float outputs."""

import copy

import pytest
import torch

from qat.models.hf import HFEncoder
from qat.train.module import QATModule, set_dropout

transformers = pytest.importorskip("transformers")


def tiny_encoder() -> HFEncoder:
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    return HFEncoder(transformers.BertModel(cfg).eval())


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 100, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long)}


def test_dropout_zero_makes_training_forward_match_eval_including_attention_dropout():
    model = tiny_encoder()
    b = batch()
    with torch.no_grad():
        ref = model.eval()(b["input_ids"], b["attention_mask"])
        noisy = model.train()(b["input_ids"], b["attention_mask"])
    assert not torch.equal(noisy, ref)  # the model's own dropout is active in training mode
    assert set_dropout(model, 0.0) >= 5  # embeddings, attention probs, hidden outputs
    with torch.no_grad():
        # Attention dropout reads `self.dropout.p`: covered as well, so train == eval exactly.
        assert torch.equal(model.train()(b["input_ids"], b["attention_mask"]), ref)


@pytest.mark.parametrize("dropout,zero_loss", [(None, False), (0.0, True)])
def test_distilling_the_float_model_into_itself_has_zero_loss_only_without_dropout(
    dropout, zero_loss
):
    student = tiny_encoder()
    teacher = copy.deepcopy(student)
    module = QATModule(student, objective="embedding", teacher=teacher, dropout=dropout).train()
    loss = module.training_step(batch(), 0)
    assert (loss.item() < 1e-6) == zero_loss


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.1", True])
def test_bad_dropout_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"module.dropout: got .*\[0, 1\)"):
        QATModule(torch.nn.Linear(2, 2), objective="classification", num_classes=2, dropout=bad)
