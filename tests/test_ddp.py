"""Lightning DDP on CPU (gloo, 2 processes): identical weights across ranks, the same update as one process with the
doubled batch, disjoint data per rank, every strategy family from a recipe, and only rank 0 writing outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from label_efficient.data import CaseStore, StepBatches, Stream, build_dataset
from label_efficient.data.loaders import EpochSampler

from conftest import sfda_recipe, tiny_recipe, write_two_domain_folder

ENGINE = """
import sys, torch, pytorch_lightning as pl
torch.set_num_threads(1)
from label_efficient.backbones import build_backbone
from label_efficient.data import CaseStore, StepBatches, Stream, build_dataset, train_loader
from label_efficient.lightning import StrategyModule
from label_efficient.recipe import OptimizerConfig
from label_efficient.strategies import build_strategy
from label_efficient.utils import global_rank

root, out, batch, devices = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = build_dataset("image_folder", root, num_classes=3, split_csv="split.csv")
batches = StepBatches(CaseStore(spec, (32, 32)), {"labeled": Stream(spec.select("train"), batch, True)}, 3,
                      seed=1, augment=False)
torch.manual_seed(0)
net = build_backbone("unet", 2, 1, 3, channels=[4, 8], norm="instance")
torch.save(net.state_dict(), f"{out}/init.pt")
module = StrategyModule(build_strategy("supervised", net, 3), OptimizerConfig(name="sgd", lr=0.5, momentum=0.0,
                        weight_decay=0.0, schedule="constant"), total_steps=3)
seen = []
module.on_train_batch_start = lambda b, i: seen.append(b["labeled"]["image"].flatten(1)[:, :4].tolist())
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0)
trainer.fit(module, train_loader(batches))
torch.save({"state": net.state_dict(), "seen": seen}, f"{out}/rank{global_rank()}_devices{devices}.pt")
"""

RECIPES = """
import json, sys, torch
torch.set_num_threads(1)
from label_efficient.recipe import parse_recipe
from label_efficient.runner import run_recipe
from label_efficient.utils import global_rank

for name, raw in json.load(open(sys.argv[1])).items():
    m = run_recipe(parse_recipe(raw), f"{sys.argv[2]}/{name}")
    json.dump({"mean_dice": m["mean_dice"]}, open(f"{sys.argv[2]}/{name}_returned_rank{global_rank()}.json", "w"))
"""


def _launch(script: str, *args, tmp: Path) -> None:
    path = tmp / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_epoch_sampler_shards_draws_without_overlap():
    s = EpochSampler(4)
    s.set_epoch(1)
    assert [d for _, d in s] == [4, 5, 6, 7]  # one process: epoch 1 holds draws 4…7


def test_ddp_two_processes_match_one_process_with_the_doubled_batch(image_folder, tmp_path):
    _launch(ENGINE, image_folder, tmp_path, 2, 2, tmp=tmp_path)
    _launch(ENGINE, image_folder, tmp_path, 4, 1, tmp=tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0_devices2.pt"), torch.load(tmp_path / "rank1_devices2.pt")
    one = torch.load(tmp_path / "rank0_devices1.pt")
    init = torch.load(tmp_path / "init.pt")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # DDP keeps the ranks identical
    # the two ranks saw disjoint halves of what one process saw with the doubled batch, step by step
    for a, b, both in zip(r0["seen"], r1["seen"], one["seen"]):
        assert a + b == both and not set(map(tuple, a)) & set(map(tuple, b))
    moved = sum((one["state"][k].float() - init[k].float()).norm() for k in init if init[k].is_floating_point())
    diff = sum((one["state"][k].float() - r0["state"][k].float()).norm() for k in init if init[k].is_floating_point())
    assert moved > 0 and diff / moved < 0.05  # equal up to the batch-summed Dice term (not a per-sample mean)


def test_every_strategy_family_runs_under_ddp_and_only_rank0_writes(tmp_path):
    root = write_two_domain_folder(tmp_path / "data")
    ddp = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "progress_bar": False}
    semi = tiny_recipe(root, steps=4, val_every=2)
    semi["data"]["domain"] = "a"
    semi["stages"] = [semi["stages"][0],
                      {**semi["stages"][0], "strategy": "mean_teacher", "steps": 2, "val_every": 2},
                      {**semi["stages"][0], "strategy": "bcp_pretrain", "steps": 2, "val_every": 2},
                      {**semi["stages"][0], "strategy": "bcp", "steps": 2, "val_every": 2}]
    sfda = sfda_recipe(root, "upl_sfda")
    recipes = {name: {**raw, "trainer": ddp} for name, raw in (("semi", semi), ("sfda", sfda))}
    (tmp_path / "recipes.json").write_text(json.dumps(recipes))
    out = tmp_path / "runs"
    out.mkdir()
    _launch(RECIPES, tmp_path / "recipes.json", out, tmp=tmp_path)
    for name in recipes:
        assert 0 <= json.loads((out / name / "metrics.json").read_text())["mean_dice"] <= 1
        assert json.loads((out / f"{name}_returned_rank1.json").read_text())["mean_dice"] is None  # rank 1: no eval
        assert (out / name / "model.pt").is_file()
    assert sorted(p.name for p in (out / "semi").glob("stage*")) == ["stage0_supervised", "stage1_mean_teacher",
                                                                    "stage2_bcp_pretrain", "stage3_bcp"]
