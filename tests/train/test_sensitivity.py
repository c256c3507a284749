"""`task=sensitivity` through the real configs on the character-level Shakespeare GPT: the
scan, the written recipe, and that recipe training and exporting at the size it predicted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from qat.export.integer.packing import weight_bytes
from qat.quant.recipe import Recipe
from qat.sensitivity.scan import group_name
from qat.train.checkpoint import Checkpoint
from qat.train.model_spec import ModelSpec
from qat.train.preflight import preflight
from qat.train.run import run
from tests.train.conftest import compose_run_config
from tests.train.test_ptq import GPT

SCAN = ["task=sensitivity", "sensitivity.bits=[2,4,8]", "sensitivity.batches=2",
        "sensitivity.calibration_batches=1", "sensitivity.group_by=block"]  # fmt: skip


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, data_dir):
    """A float GPT, scanned with the budget of every weight at 4 bits."""
    tmp = tmp_path_factory.mktemp("sens")
    cfg = compose_run_config(tmp, data_dir, GPT + SCAN + ["sensitivity.budget_uniform_bits=4"])
    summary = run(cfg)
    return tmp, data_dir, summary


def test_the_mixed_recipe_fits_the_uniform_size_and_predicts_no_more_loss(scanned):
    _, _, s = scanned
    four = s["uniform"]["4"]
    assert s["size_bytes"] <= s["budget_bytes"] == four["size_bytes"]
    assert s["predicted_change"] <= four["predicted_change"] + 1e-9  # uniform 4 was a choice
    assert set(s["chosen"]) == {"blocks.0", "blocks.1", "lm_head"}
    text = Path(s["files"]["recipe"]).read_text()
    assert text.startswith("# Written by `python train.py task=sensitivity`")
    recipe = Recipe.from_dict(yaml.safe_load(text))
    assert recipe.schedule.calibrate == 4  # the base recipe's settings carried over
    assert Path(s["files"]["table"]).read_text().startswith("| group | layers | weights |")
    assert json.loads(Path(s["files"]["summary"]).read_text())["chosen"] == s["chosen"]
    assert s["files"]["checkpoint"] == s["float_checkpoint"]  # listed: init_from= for the next run
    assert s["settings"]["bits"] == [2, 4, 8]


def test_the_written_recipe_trains_and_exports_at_the_predicted_size(scanned):
    tmp, data_dir, s = scanned
    cfg = compose_run_config(tmp, data_dir, GPT + [f"recipe={s['files']['recipe']}",
                                                   f"init_from={s['float_checkpoint']}"],
                             name="mixed")  # fmt: skip
    results = run(cfg)
    artifact = Path(results["artifacts"]["qat"])
    tensors = load_file(artifact / "weights.safetensors")
    scanned_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                        if k.split(".")[-1] in ("weight_codes", "weight_scale",
                                                "weight_zero_point"))  # fmt: skip
    assert scanned_bytes == s["size_bytes"]  # the knapsack's sizes are the artifact's bytes
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["parity"]["batches"] >= 1  # the export's parity gate ran (and passed)


def test_the_kl_measure_is_zero_for_the_float_model_and_grows_as_bits_shrink(tmp_path, data_dir):
    """`measure: kl` scores each group by the KL divergence of the model's outputs from the
    float model's: never negative (a loss change can be, by chance), larger at fewer bits."""
    cfg = compose_run_config(tmp_path, data_dir, GPT + SCAN[:-1] + [
        "sensitivity.measure=kl", "sensitivity.bits=[2,8]", "sensitivity.group_by=block",
        "sensitivity.budget_uniform_bits=8"])  # fmt: skip
    s = run(cfg)
    assert s["base_loss"] == pytest.approx(0.0, abs=1e-6)  # float weights and activations
    table = Path(s["files"]["csv"]).read_text().splitlines()
    assert len(table) == 4  # a header, blocks.0, blocks.1, lm_head
    assert s["uniform"]["2"]["predicted_change"] > s["uniform"]["8"]["predicted_change"] > 0
    assert s["budget_bytes"] == s["uniform"]["8"]["size_bytes"]


def test_a_scan_beside_the_recipes_activations_measures_from_their_loss(tmp_path, data_dir):
    """`activations=recipe`: the recipe's activation quantizers (here int4 dynamic) stay on,
    so the base the groups are measured from is their own KL from the float model, not zero."""
    cfg = compose_run_config(tmp_path, data_dir, GPT + SCAN[:-1] + [
        "sensitivity.measure=kl", "sensitivity.bits=[2,8]", "sensitivity.group_by=block",
        "sensitivity.budget_uniform_bits=8", "sensitivity.activations=recipe",
        "recipe.rules.0.input.bits=4"])  # fmt: skip
    s = run(cfg)
    assert s["base_loss"] > 1e-4  # float activations: 0 within 1e-6
    assert s["uniform"]["2"]["predicted_change"] > s["uniform"]["8"]["predicted_change"]
    assert "with float weights and recipe activations" in Path(s["files"]["recipe"]).read_text()


def test_the_recipe_budget_is_the_size_of_the_recipes_own_widths(tmp_path, data_dir):
    """`budget_recipe=true`: the budget is what the recipe itself gives the scanned weights
    (w4g32 with its Conv rule at 8 bits: every GPT weight at 4), so uniform 4 is a choice, and
    the summary sets the recipe's own prediction beside the mixed one."""
    cfg = compose_run_config(tmp_path, data_dir, GPT + SCAN + ["sensitivity.budget_recipe=true"])
    s = run(cfg)
    assert s["budget_bytes"] == s["uniform"]["4"]["size_bytes"] >= s["size_bytes"]
    assert s["recipe_widths"] == s["uniform"]["4"]
    assert s["predicted_change"] <= s["recipe_widths"]["predicted_change"] + 1e-9


def test_candidate_group_sizes_trade_scale_bytes_for_bits(tmp_path, data_dir):
    """`group_sizes=[32,64]`: each width is scanned at both group sizes, the budget of every
    weight at 2 bits in the recipe's groups of 32 can buy 3 bits in groups of 64 for some,
    and the written recipe gives every layer exactly the chosen bits and group size: its
    planned bytes are the knapsack's."""
    cfg = compose_run_config(tmp_path, data_dir, GPT + SCAN + [
        "sensitivity.bits=[2,3]", "sensitivity.group_sizes=[32,64]",
        "sensitivity.budget_uniform_bits=2"])  # fmt: skip
    s = run(cfg)
    assert set(s["uniform"]) == {"2g32", "2g64", "3g32", "3g64"}
    assert s["budget_bytes"] == s["uniform"]["2g32"]["size_bytes"] >= s["size_bytes"]
    assert s["predicted_change"] <= s["uniform"]["2g32"]["predicted_change"] + 1e-9
    assert s["uniform"]["2g64"]["size_bytes"] < s["budget_bytes"]  # coarser groups: fewer scales
    assert s["recipe_widths"] is None  # the recipe's 4 bits are not a candidate
    job = preflight(compose_run_config(tmp_path, data_dir, GPT + [
        f"recipe={s['files']['recipe']}"], name="mixed"))  # fmt: skip
    meta = Checkpoint.open(s["float_checkpoint"], "the scan's float checkpoint").meta
    mods = dict(ModelSpec(**job.model.matching(meta)).build().named_modules())  # its vocab
    planned = 0
    for lp in job.plan.quantized():
        w = lp.specs["weight"]
        assert f"{w.bits}g{w.group_size}" == s["chosen"][group_name(lp.name, "block")]
        planned += weight_bytes(w, tuple(mods[lp.name].weight.shape))
    assert planned == s["size_bytes"]


def test_a_budget_below_the_smallest_candidates_says_so_in_bits_per_weight(scanned):
    tmp, data_dir, s = scanned
    cfg = compose_run_config(tmp, data_dir, GPT + SCAN + [
        "sensitivity.budget_bits_per_weight=1", f"init_from={s['float_checkpoint']}"],
        name="small")  # fmt: skip
    with pytest.raises(ValueError, match=r"the budget, .* MiB \(1.000 bits per scanned weight\), "
                                         r"is below the smallest .*\(2\.5\d\d\): raise"):
        run(cfg)


@pytest.mark.parametrize("extra, message", [
    (["sensitivity.bits=[4,9]"], r"sensitivity.bits: got \[4, 9\]; allowed: a list of distinct"),
    (["sensitivity.bits=4"], r"sensitivity.bits: got 4; allowed: a list"),
    ([], "set exactly one of budget_bits_per_weight"),
    (["sensitivity.budget_mib=1", "sensitivity.budget_uniform_bits=4"], "got .*budget_mib"),
    (["sensitivity.budget_recipe=true", "sensitivity.budget_mib=1"], "got .*budget_recipe"),
    (["sensitivity.budget_uniform_bits=3"], "budget_uniform_bits: got 3; allowed: one of"),
    (["sensitivity.budget_mib=1", "recipe=fp32"], "quantizes nothing: task=sensitivity"),
    (["sensitivity.budget_mib=1", "sensitivity.group_sizes=[32,32]"], "group_sizes: got"),
    (["sensitivity.budget_mib=1", "sensitivity.group_sizes=32"], "group_sizes: got 32; allowed"),
    (["sensitivity.budget_mib=1", "sensitivity.group_sizes=[48]"],
     "sensitivity.group_sizes: groups of 48 do not fit recipe=w4g32_a8dyn"),
    (["sensitivity.budget_mib=1", "sensitivity.activations=recipe", "sensitivity.measure=sqnr"],
     "measure=sqnr looks at weights alone"),
    (["sensitivity.budget_mib=1", "sensitivity.activations=recipe", "recipe=w4g32"],
     "recipe=w4g32 quantizes no activations"),
    (["sensitivity.budget_mib=1", "sensitivity.activations=int8"], "activations: got 'int8'"),
    (["sensitivity.budget_mib=1", "sensitivity.group_sizes=[32]", "recipe=w8a8"],
     "recipe=w8a8 has no per_group weights"),
])  # fmt: skip
def test_bad_scans_are_refused_before_any_data_loads(tmp_path, data_dir, extra, message):
    cfg = compose_run_config(tmp_path, data_dir, GPT + SCAN + extra)
    with pytest.raises(ValueError, match=message):
        preflight(cfg)
