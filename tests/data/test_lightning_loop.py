"""Inside a real Lightning fit loop, the shuffle order is a function of (seed, epoch)."""

import lightning as L
import pytest
import torch

from qat.data import DigitsDataModule


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return torch.nn.functional.cross_entropy(self.layer(batch["x"].flatten(1)), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*LeafSpec")
def test_trainer_sets_the_sampler_epoch(tmp_path):
    dm = DigitsDataModule(data_dir=str(tmp_path), batch_size=16)
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    expected = []
    for epoch in (0, 1):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches = iter(loader)
        expected += [next(batches)["index"].tolist() for _ in range(2)]
    assert model.seen == expected
    assert model.seen[0] != model.seen[2]
