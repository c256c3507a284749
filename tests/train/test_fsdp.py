"""FSDP2 (`trainer=fsdp_cpu`, `qat.train.sharding`): what is sharded, observers across ranks,
and real runs through `train.py` (Lightning's launcher, and torchrun as a cluster starts it)
that resume bit-identically from sharded checkpoints and export what a single process exports
from them, or from their consolidated copy."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qat
from qat.models.registry import build_model
from qat.train.checkpoint import load_checkpoint, model_state

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"rules": [{"match": {"types": ["Linear"]},
                     "weight": {"bits": 4, "granularity": "per_channel", "learn": "lsq"},
                     "input": {"bits": 8, "symmetric": False, "observer": "minmax"}}]}  # fmt: skip


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return qat.prepare(build_model("gpt", preset="tiny", vocab_size=67, block_size=16), RECIPE)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 67, (4, 16), generator=g) for _ in range(2)]  # one per rank


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 67), x[:, 1:].reshape(-1)).backward()
    opt.step()


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from qat.train.sharding import shard, unsharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    qat.quant.calibrate(model, [_batches()[rank][:, :-1]], num_batches=1)  # each its own data
    shard(model, init_device_mesh("cpu", (2,)))
    scale = model.blocks[0].attn.q_proj.weight_quant.scale
    checks = {"dtensor": isinstance(scale, DTensor), "local": scale.to_local().shape[0],
              "global": scale.shape[0]}  # fmt: skip
    _step(model, _batches()[rank])
    state = unsharded(model, _model).state_dict()  # every rank calls it: a collective
    if rank == 0:
        torch.save({"checks": checks, "state": state}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_shards_learned_scales_syncs_observers_and_steps_like_one_process(tmp_path):
    """Two gloo ranks, each calibrating and stepping on its own batch: the LSQ scales are
    sharded parameters (half the rows each), the input observers agree with one process that
    saw both batches, bit for bit, and one SGD step (gradients averaged by FSDP) lands where
    that process's step on both batches lands, up to float summation order."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["checks"] == {"dtensor": True, "local": got["checks"]["global"] // 2, "global": 64}
    ref = _model()
    both = torch.cat(_batches())
    qat.quant.calibrate(ref, [both[:, :-1]], num_batches=1)
    _step(ref, both)
    want = ref.state_dict()
    assert got["state"].keys() == want.keys()
    for k, v in want.items():
        if "observer" in k:
            assert torch.equal(got["state"][k], v), k
        else:
            torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _train(tmp_path: Path, name: str, data_dir: Path, *extra: str,
           launcher: tuple[str, ...] = (), trainer: str = "fsdp_cpu",
           every: int = 4) -> Path:  # fmt: skip
    out = tmp_path / name
    cmd = [*launcher, "train.py", "experiment=shakespeare_w4g32a8", f"trainer={trainer}",
           "model.args.preset=tiny", "float_stage.max_steps=4", "trainer.max_steps=8",
           "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
           "data.max_eval_blocks=8", "trainer.enable_progress_bar=false", "logger=none",
           f"callbacks.model_checkpoint.every_n_train_steps={every}",
           "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
           "callbacks.model_checkpoint.filename='step{step}'", "threads=1",
           f"paths.data_dir={data_dir}", f"paths.output_dir={out}", *extra]  # fmt: skip
    if not launcher:
        cmd.insert(0, sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_fsdp_run_resumes_bit_identically_and_its_sharded_checkpoint_exports_as_one_file(
    tmp_path, data_dir
):
    """8 QAT steps on two FSDP processes writing sharded checkpoints; the same run resumed
    from its step-4 folder under torchrun (as a cluster launches it), writing whole files; and
    resumed again from that run's step-6 file: the same final weights, quantizer state and
    artifact bytes. In one process without FSDP, `task=export` of the sharded `last.ckpt` and
    of its consolidated copy write the artifact the FSDP run wrote."""
    from qat.train.sharded_checkpoint import main as consolidate

    straight = _train(tmp_path, "straight", data_dir, "trainer.strategy.sharded_checkpoints=true")
    mid, last = (straight / "checkpoints" / f"{n}.ckpt" for n in ("step4", "last"))
    assert sorted(p.name for p in mid.iterdir()) == ["index.json", "meta.pt", "rank-0.pt",
                                                     "rank-1.pt"]  # fmt: skip
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}")  # fmt: skip
    resumed = _train(tmp_path, "resumed", data_dir, f"ckpt_path={mid}", launcher=torchrun,
                     every=2)  # fmt: skip
    step6 = resumed / "checkpoints" / "step6.ckpt"
    assert step6.is_file()  # a whole file
    again = _train(tmp_path, "again", data_dir, f"ckpt_path={step6}")
    a = model_state(load_checkpoint(last))  # the folder, consolidated
    artifact = (straight / "export" / "qat" / "weights.safetensors").read_bytes()
    for run in (resumed, again):
        b = model_state(load_checkpoint(run / "checkpoints" / "last.ckpt"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run.name
        assert (run / "export" / "qat" / "weights.safetensors").read_bytes() == artifact
    consolidate([str(last), str(tmp_path / "whole.ckpt")])
    for name, ckpt in (("from_folder", last), ("from_file", tmp_path / "whole.ckpt")):
        single = _train(tmp_path, name, data_dir, "task=export", f"ckpt_path={ckpt}",
                        trainer="default")  # fmt: skip
        assert (single / "export" / "qat" / "weights.safetensors").read_bytes() == artifact


def test_a_sharded_checkpoint_folder_is_checked_before_it_is_read(tmp_path):
    """Written in one rank here: it consolidates to what was saved; a truncated shard, a folder
    without its index, or a resume on another number of ranks is one clear error."""
    from qat.train import sharded_checkpoint as sc
    from qat.train.checkpoint import find_last_checkpoint

    path = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    state = {"model.w": torch.arange(6.0).reshape(3, 2)}
    ckpt = {"state_dict": state, "optimizer_states": [], "qat_rng": None, "global_step": 3,
            "qat_meta": {"model": {"builder": "gpt"}}}  # fmt: skip
    sc.save(dict(ckpt), path, 0, 1, lambda x: x, lambda: None)
    whole = load_checkpoint(path)
    assert whole["global_step"] == 3
    assert torch.equal(whole["state_dict"]["model.w"], state["model.w"])
    assert find_last_checkpoint(tmp_path) == path
    with pytest.raises(ValueError, match=r"written by 1 ranks; resume it on as many, or "
                       r"consolidate it"):  # fmt: skip
        sc.read_rank(path, 0, 2)
    shard = path / "rank-0.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"rank-0\.pt is missing or not the size its index says"):
        load_checkpoint(path)
    (path / "index.json").unlink()
    with pytest.raises(ValueError, match=r"it is a folder without an index\.json"):
        load_checkpoint(path)
