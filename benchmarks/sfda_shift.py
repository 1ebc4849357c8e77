"""Source-free adaptation on SIMULATED scanner shifts of ACDC: rows to results/sfda_shift.json + RESULTS.md.

    python benchmarks/sfda_shift.py [--shifts inverted no_inversion] [--seeds 1337 1338]
    python benchmarks/sfda_shift.py --table-only

Dataset ``simulated_shift`` (``label_efficient/data/shift.py``): half of the patients of every ACDC split (seed 0) are
re-imaged by a simulated "target scanner"; the other half is the labelled source. Two scanners:

* ``inverted``: the SDC-UDA benchmark's scanner (gamma 0.6, contrast inversion, bias field ±30 %, blur σ 1 px);
* ``no_inversion``: the same scanner without the contrast inversion (gamma 0.6, bias ±30 %, blur σ 1 px).

Per seed, one source model (``basic_unet``: BN and the SSL4MIS encoder dropout, so UPL's two passes differ; 64²,
supervised on the source labels, last step) is scored on each scanner's 20 target test volumes (``source_only``) and
adapted with each method on the unlabelled target train images for a fixed step count (last step: no target label
chooses anything). ``sdc_uda`` (``--methods sdc_uda``): SDC-UDA with ``benchmarks/sdc_uda.py``'s schedule on this
backbone (it uses the labelled source, so it is UDA, not source-free). ``oracle``: the same training on the target
labels. drop recovered = (adapted − source-only) /
(oracle − source-only). Dice/HD95 per class, mean over RV/MYO/LV.

Unsupervised stopping (``--methods "bn_sfda, label-free stop" "upl_sfda, label-free stop"``): the method adapts for
``STOPPING_STEPS`` steps with ``select: label_free`` (flip consistency on the target val images, masks unread, every
100 steps); its row is the chosen checkpoint (``chosen_step`` in the JSON), and a "last of N" row scores the same
run's last step.

Run it as a script (it imports only ``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import (RESULTS_DIR, RUNS_DIR, load_json, load_rows, md_table, mean_sd, merge_rows, pct, rebuild_report,
                    run_recipe_process, sdc_uda_recipe, summarise)
from common import with_recovered as _with_recovered

RESULTS = RESULTS_DIR / "sfda_shift.json"
RUNS = RUNS_DIR / "sfda_shift"
#: rows of earlier commits the section compares with (recovered from git, commands in the file)
SUPERSEDED = RESULTS_DIR / "superseded_rows.json"
SHIFTS = {"inverted": {}, "no_inversion": {"invert": False}}
PROTOCOL = {
    "image_size": [64, 64],
    "backbone": {"name": "basic_unet", "kwargs": {}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 50},
    "train": {"steps": 1500, "batch": 8,
              "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"}},
    "adapt": {"steps": 300, "batch": 8},
}
#: adaptation methods: row → stages as (strategy, config, optimizer); later stages start from the previous one
METHODS = {
    "bn_sfda": [("bn_sfda", {}, {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"})],
    "upl_sfda": [("upl_sfda", {}, {"name": "adam", "lr": 1e-5, "weight_decay": 0.0, "schedule": "constant"})],
}
METHODS["bn_sfda+upl_sfda"] = METHODS["bn_sfda"] + METHODS["upl_sfda"]
#: the unsupervised stopping rule (``select: label_free``): one longer adaptation per method, validated every 100
#: steps on the target val images (no mask read); rows "<method>, label-free stop" (its selected checkpoint) and
#: "<method>, last of N" (the same run's last step), so the two are reported separately as the UPL-SFDA spec asks
STOPPING_STEPS = 1200
STOPPING = {f"{m}, label-free stop": m for m in ("bn_sfda", "upl_sfda")}
REFERENCES = ("source_only", "oracle")
#: ``sdc_uda`` (translation → teacher → self-training, ``benchmarks/sdc_uda.py``'s schedule, this backbone) is a row
#: on request (``--methods sdc_uda``): it reads the labelled source, so it is UDA, not source-free


def _data(shift: str, **extra) -> dict:
    return {"dataset": "simulated_shift", "options": {"base": "acdc", "target_fraction": 0.5, "seed": 0,
                                                      **SHIFTS[shift]},
            "domain": "target", "image_size": PROTOCOL["image_size"], "val_split": None, **extra}


def _recipe(name: str, shift: str, seed: int, stages: list[dict], **data) -> dict:
    return {"name": name, "seed": seed, "data": _data(shift, **data), "backbone": PROTOCOL["backbone"],
            "trainer": PROTOCOL["trainer"], "evaluation": {"metrics": ["dice", "hd95"], "overlays": 0},
            "stages": stages}


def _train_stage() -> dict:
    t = PROTOCOL["train"]
    return {"strategy": "supervised", "steps": t["steps"], "val_every": 250, "batch_size": {"labeled": t["batch"]},
            "optimizer": t["optimizer"]}


def source_model(seed: int) -> Path:
    """The source model of ``seed`` (the source domain is the same for every scanner: train it once)."""
    out = RUNS / f"source_s{seed}"
    if not (out / "model.pt").exists():
        run_recipe_process(_recipe("sfda_shift_source", "inverted", seed, [_train_stage()], labeled_domain="source"),
                           out)
    return out / "model.pt"


def evaluate_on_target(model_path: Path, shift: str, seed: int, recipe: dict | None = None) -> dict:
    """Metrics of a model.pt, or of a stage checkpoint of ``recipe``'s run, on ``shift``'s target test volumes."""
    import torch

    from label_efficient.evaluation import evaluate
    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import DataContext, load_for_evaluation

    torch.set_num_threads(1)
    recipe = parse_recipe(recipe or _recipe("eval", shift, seed, [_train_stage()]))
    ctx = DataContext.build(recipe.stage_data(0), seed)
    vols = ctx.volumes(recipe.data.test_split, None)
    return evaluate(load_for_evaluation(recipe, ctx, model_path), vols, ctx.spec.num_classes, ctx.spec.class_names,
                    ctx.spec.spatial_dims, ["dice", "hd95"])


def run(shift: str, method: str, seed: int) -> list[dict]:
    if method == "source_only":
        m, seconds = evaluate_on_target(source_model(seed), shift, seed), None
    elif method == "sdc_uda":  # unsupervised DA with the source data (not source-free): benchmarks/sdc_uda.py's recipe
        r = sdc_uda_recipe()
        r["data"]["options"] = _data(shift)["options"]
        r = {**r, "seed": seed, "backbone": PROTOCOL["backbone"], "evaluation": {"metrics": ["dice", "hd95"], "overlays": 0}}
        m, seconds = run_recipe_process(r, RUNS / f"{shift}_sdc_uda_s{seed}"), None
    elif method == "oracle":
        m = run_recipe_process(_recipe("sfda_shift_oracle", shift, seed, [_train_stage()]), RUNS / f"{shift}_oracle_s{seed}")
        seconds = None
    elif method in STOPPING:
        return stopping_rows(shift, STOPPING[method], seed)
    else:
        m, _ = _adapt(shift, method, seed, PROTOCOL["adapt"]["steps"], "last")
        seconds = round(sum(s["seconds"] for s in m["stages"]) / sum(s["steps"] for s in m["stages"]), 4)
    return [_row(shift, method, seed, m, seconds)]


def _adapt(shift: str, method: str, seed: int, steps: int, select: str) -> tuple[dict, Path]:
    """Adapt the source model of ``seed`` with ``method``; its metrics and run folder."""
    a = PROTOCOL["adapt"]
    stages = [{"strategy": st, "steps": steps, "val_every": 100, "batch_size": {"unlabeled": a["batch"]},
               "init": str(source_model(seed)) if i == 0 else "previous_last", "optimizer": opt, "config": cfg,
               "select": select}
              for i, (st, cfg, opt) in enumerate(METHODS[method])]
    tag = method.replace("+", "_") + ("" if select == "last" else f"_{select}_{steps}")
    data = {} if select == "last" else {"val_split": "val"}  # label_free: the target val images, masks unread
    out = RUNS / f"{shift}_{tag}_s{seed}"
    return run_recipe_process(_recipe(f"sfda_shift_{tag}", shift, seed, stages, **data), out), out


def stopping_rows(shift: str, method: str, seed: int) -> list[dict]:
    """The label-free-stopped checkpoint and the last one of the same ``STOPPING_STEPS``-step run."""
    import torch

    m, out = _adapt(shift, method, seed, STOPPING_STEPS, "label_free")
    stage = sorted(out.glob("stage*"))[-1]
    kept = json.loads((stage / "done.json").read_text())["best"]  # best.ckpt, or initial.ckpt: "do not adapt"
    chosen = torch.load(stage / kept, map_location="cpu", weights_only=True)["global_step"]
    last = evaluate_on_target(stage / "last.ckpt", shift, seed, json.loads(out.with_suffix(".json").read_text()))
    return [{**_row(shift, f"{method}, label-free stop", seed, m, None), "chosen_step": chosen},
            _row(shift, f"{method}, last of {STOPPING_STEPS}", seed, last, None)]


def _row(shift: str, method: str, seed: int, m: dict, seconds: float | None) -> dict:
    return {"shift": shift, "method": method, "seed": seed, **summarise(m), "sec_per_adapt_step": seconds, "threads": 1}


def with_recovered(rows: list[dict]) -> list[dict]:
    """(adapted − source-only) / (oracle − source-only) on the same shift and seed; None without a drop."""
    return _with_recovered(rows, lambda r: (r["shift"], r["seed"]), REFERENCES)


def table(rows: list[dict]) -> str:
    """Per shift and method: Dice and recovered share per seed, and their seed means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shift"], r["method"]), []).append(r)
    out = []
    for (shift, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        d = [r["mean_dice"] for r in rs]
        rec = [r["recovered"] for r in rs if r.get("recovered") is not None]
        sps = [r["sec_per_adapt_step"] for r in rs if r.get("sec_per_adapt_step")]
        chosen = [str(r["chosen_step"]) for r in rs if "chosen_step" in r]
        name = f"{method} (chosen step {', '.join(chosen)})" if chosen else method
        out.append([shift, name, ", ".join(str(r["seed"]) for r in rs), ", ".join(f"{x:.4f}" for x in d),
                    mean_sd(d) or f"{d[0]:.4f}", f"{statistics.mean(r['hd95'] for r in rs):.2f}",
                    ", ".join(pct(x) for x in rec), pct(statistics.mean(rec)) if rec else "",
                    f"{statistics.mean(sps):.3f}" if sps else ""])
    return md_table(["scanner (simulated)", "method", "seeds", "mean Dice per seed", "mean Dice (mean ± s.d.)",
                     "HD95 (mean)", "drop recovered per seed", "drop recovered (mean)", "s / adapt step"], out)


def load_results() -> dict:
    return {"rows": with_recovered(load_rows(RESULTS)), "superseded": load_json(SUPERSEDED, {}).get("sfda_shift")}


def _sdc_uda_refit(rows: list[dict], old: dict | None) -> str:
    """The re-made ``sdc_uda`` rows beside the pre-fix ones (no-inversion scanner)."""
    new = sorted((r for r in rows if r["method"] == "sdc_uda" and r["shift"] == "no_inversion"), key=lambda r: r["seed"])
    if not old or not new:
        return ""
    was = {r["seed"]: r["mean_dice"] for r in old["rows"]}
    now = " / ".join(f"{r['mean_dice']:.4f}" for r in new)
    before = " / ".join(f"{was[r['seed']]:.4f}" for r in new if r["seed"] in was)
    return f": on the scanner without inversion {now} where the pre-fix rows had {before} (`{old['command']}`)"


def section(rows: dict) -> str:
    if not rows["rows"]:
        return ""
    p = PROTOCOL
    return "\n".join([
        "## Source-free adaptation on simulated scanner shifts (ACDC)", "",
        "Regenerate: `python benchmarks/sfda_shift.py`. **The shifts are simulated** (dataset `simulated_shift`): "
        "half of the ACDC patients of every split are re-imaged by a simulated target scanner, `inverted` = gamma "
        "0.6, contrast inversion, bias field ±30 %, blur σ 1 px (the SDC-UDA benchmark's), `no_inversion` = the "
        f"same without the inversion. {p['image_size'][0]}², `basic_unet` (BN, encoder dropout), source and oracle "
        f"{p['train']['steps']} supervised steps (last step), adaptation {p['adapt']['steps']} steps on unlabelled "
        "target train slices (last step, no target label read). Dice mean over RV/MYO/LV on the 20 target test "
        "volumes; drop recovered = (adapted − source-only) / (oracle − source-only), same seed. *label-free stop* "
        f"rows: the method adapts for {STOPPING_STEPS} steps with `select: label_free` (flip consistency on the 20 "
        "target val volumes, masks unread, every 100 steps, and of the source model before step 1) and is scored at "
        "the chosen step (0: the source model was kept, i.e. the rule declined to adapt); *last of "
        f"{STOPPING_STEPS}* is the same run's last step (`python benchmarks/sfda_shift.py --methods "
        "\"bn_sfda, label-free stop\" \"upl_sfda, label-free stop\"`). *sdc_uda* rows (`--methods sdc_uda`, "
        "`benchmarks/sdc_uda.py`'s schedule on this backbone; unsupervised DA: it reads the labelled source "
        "images) were re-made after commit ae086f5 (R1 penalty summed over the slab)"
        f"{_sdc_uda_refit(rows['rows'], rows['superseded'])}.", "", table(rows["rows"]), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=list(SHIFTS))
    ap.add_argument("--methods", nargs="*", default=["source_only", *METHODS, "oracle"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[1337, 1338])
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    key = lambda r: (r["shift"], r["method"], r["seed"])
    if not args.table_only:
        for seed in args.seeds:
            for shift in args.shifts:
                for method in args.methods:
                    new = run(shift, method, seed)
                    for r in new:
                        print(json.dumps(r), flush=True)
                    merge_rows(RESULTS, with_recovered(load_rows(RESULTS) + new), key)
    out = merge_rows(RESULTS, with_recovered(load_rows(RESULTS)), key)
    rebuild_report()
    print(table(out))


if __name__ == "__main__":
    main()
