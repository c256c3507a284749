"""DDP on two CPU processes keeps every rank's scales identical (`ddp_spawn`, in this process).

The shipped `trainer=ddp_cpu` (plain `ddp`, a re-run of the command line) and the `-m` sweep
run through the real entry point in `tests/test_readme.py`, as the README writes them.
"""

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from qat.quant import quantizers
from qat.train.run import run

from .conftest import TINY


class ScalesAgree(L.Callback):
    """On every rank: gather each quantizer's scale and check all ranks hold the same."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        assert dist.is_initialized() and dist.get_world_size() == 2
        rows = []
        for name, q in quantizers(pl_module.model).items():
            if q.observer is None:
                continue
            s = q.qparams()[0].detach().reshape(-1).clone()
            gathered = [torch.empty_like(s) for _ in range(2)]
            dist.all_gather(gathered, s)
            rows.append(f"{name} {int(torch.equal(gathered[0], gathered[1]))}")
        if trainer.is_global_zero:
            Path(self.out).write_text("\n".join(rows))


def test_ddp_two_cpu_processes_keep_identical_scales(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(
        TINY
        + [
            "trainer=ddp_cpu",
            "trainer.strategy=ddp_spawn",
            "recipe=w8a8",
            "float_stage.max_steps=0",
            "trainer.max_steps=6",
            "trainer.enable_progress_bar=false",
            "logger=none",
        ]
    )
    report = tmp_path / "scales.txt"
    import qat.train.run as runmod

    real_fit = runmod.fit

    def fit_with_check(cfg, module, dm, out_dir, stage, max_steps, resume=None,
                       extra_callbacks=()):  # fmt: skip
        extra = list(extra_callbacks) + ([ScalesAgree(str(report))] if stage == "qat" else [])
        return real_fit(cfg, module, dm, out_dir, stage, max_steps, resume, extra)

    monkeypatch.setattr(runmod, "fit", fit_with_check)
    res = run(cfg)
    assert "test/acc" in res["qat"]
    rows = report.read_text().splitlines()
    assert rows and all(r.endswith(" 1") for r in rows), rows
    assert any("input_quant" in r for r in rows)  # activation observers were synced
