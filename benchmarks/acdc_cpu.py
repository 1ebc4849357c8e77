"""ACDC-CPU benchmark: every strategy on the same pinned protocol; rows to results/acdc_cpu.json + RESULTS.md.

    python benchmarks/acdc_cpu.py                      # all rows (hours on 2 cores)
    python benchmarks/acdc_cpu.py --rows supervised:labeled_3 mean_teacher:labeled_7 --jobs 2
    python benchmarks/acdc_cpu.py --rows supervised:labeled_7:1338 mean_teacher:labeled_7:1338   # another seed
    python benchmarks/acdc_cpu.py --rows supervised:labeled_7:1337:6000 mean_teacher:labeled_7:1337:6000  # longer
    python benchmarks/acdc_cpu.py --table-only         # regenerate RESULTS.md from the JSON

Each row runs in its own process with one thread (``--jobs 2`` runs two at once on a 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "acdc_cpu.json"
RESULTS_V1 = HERE / "results" / "acdc_cpu_v1.json"  #: rows of the superseded protocol v1 (kept, shown apart)

#: The pinned protocol (v2, issue 9): the official BCP code's configuration scaled to this CPU: its U-Net
#: (``basic_unet``: max-pool, two convs per level, encoder dropout), SGD 0.01 with momentum 0.9 at a constant rate,
#: 12 labelled + 12 unlabelled slices at 128², 3000 steps, validation every 200 steps on all 20 val volumes.
#: Every row shares it; a strategy adds only its own stage layout and config.
PROTOCOL = {
    "seed": 1337,
    "data": {"dataset": "acdc", "image_size": [128, 128], "max_val_cases": None},
    "backbone": {"name": "basic_unet", "kwargs": {}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 50},
    "steps": 3000,
    "val_every": 200,
    "batch_size": {"labeled": 12, "unlabeled": 12},
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "schedule": "constant"},
}
#: The supervised ceiling (all 70 train patients) uses the same schedule.
CEILING_STEPS = PROTOCOL["steps"]
BUDGETS = {"labeled_3": {"flag": "labeled_3"}, "labeled_7": {"flag": "labeled_7"}, "all": {"all": True}}

#: Settings of protocol v1 (MONAI UNet without residual units, AdamW 3e-3 poly, batch 8 + 8), for the ablation.
V1_BACKBONE = {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128, 256], "num_res_units": 0}}
V1_OPTIMIZER = {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"}
V1_BATCH = {"labeled": 8, "unlabeled": 8}

#: Named variants: a row name mapped to a registered strategy and what it changes from the protocol (``config``,
#: ``optimizer``, ``backbone``, ``batch_size``, ``trainer``), and the row its gap closed is measured from (``None``: none,
#: default ``supervised``). The ``bcp_pretrain_*`` rows are the ablation of the v1 → v2 gap: BCP's copy-paste
#: pre-training alone, with one v1 setting put back.
VARIANTS = {
    "bcp_pretrain_v1net": {"strategy": "bcp_pretrain", "backbone": V1_BACKBONE, "baseline": None},
    "bcp_pretrain_adamw": {"strategy": "bcp_pretrain", "optimizer": V1_OPTIMIZER, "baseline": None},
    "bcp_pretrain_b8": {"strategy": "bcp_pretrain", "batch_size": V1_BATCH, "baseline": None},
    "bcp_pretrain_v1": {"strategy": "bcp_pretrain", "backbone": V1_BACKBONE, "optimizer": V1_OPTIMIZER,
                        "batch_size": V1_BATCH, "baseline": None},
    "bcp_teacher_eval": {"strategy": "bcp", "config": {"teacher_eval_mode": True}},
    #: precision ablation: the protocol's ``precision: auto`` is bf16-mixed on a host with native bf16
    "bcp_pretrain_fp32": {"strategy": "bcp_pretrain", "trainer": {"precision": "32-true"}, "baseline": None},
}


def stages(strategy: str, steps: int) -> list[dict]:
    v = VARIANTS.get(strategy, {"strategy": strategy})
    common = {"val_every": PROTOCOL["val_every"], "batch_size": v.get("batch_size", PROTOCOL["batch_size"]),
              "optimizer": v.get("optimizer", PROTOCOL["optimizer"]), "config": v.get("config", {})}
    if v["strategy"] == "bcp":  # BCP: copy-paste pre-training (1/3 of the steps), then self-training from its best
        pre = steps // 3
        return [{**common, "strategy": "bcp_pretrain", "steps": pre},
                {**common, "strategy": "bcp", "steps": steps - pre, "init": "previous_best"}]
    return [{**common, "strategy": v["strategy"], "steps": steps}]


def recipe(strategy: str, labeled: str) -> dict:
    steps = CEILING_STEPS if (strategy == "supervised" and labeled == "all") else PROTOCOL["steps"]
    return {"name": f"acdc_cpu_{strategy}_{labeled}", "seed": PROTOCOL["seed"],
            "data": {**PROTOCOL["data"], "budget": BUDGETS[labeled]},
            "backbone": VARIANTS.get(strategy, {}).get("backbone", PROTOCOL["backbone"]),
            "trainer": {**PROTOCOL["trainer"], **VARIANTS.get(strategy, {}).get("trainer", {})},
            "stages": stages(strategy, steps)}


#: The full table: 3 seeds of supervised at 3 / 7 / all patients and of each semi-supervised strategy at 3 and 7.
SEEDS = (1337, 1338, 1339)
DEFAULT_ROWS = [f"supervised:{b}:{s}" for b in BUDGETS for s in SEEDS] + [
    f"{st}:{b}:{s}" for st in ("bcp", "mean_teacher", "dsaif") for b in ("labeled_3", "labeled_7") for s in SEEDS]


def run_recipe_process(recipe: dict, out: Path) -> dict:
    """Run ``recipe`` into ``out`` in a single-thread subprocess (resumable: an interrupted run continues); the
    recipe is kept beside it as ``<out>.json``. Returns its metrics.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = ("import json,torch; torch.set_num_threads(1);"
            "from label_efficient.recipe import parse_recipe; from label_efficient.runner import run_recipe;"
            f"run_recipe(parse_recipe(json.load(open({str(spec)!r}))), {str(out)!r}, resume=True)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def run_row(row: str, runs: Path, build=None, protocol: dict | None = None) -> dict:
    """Run one ``strategy:budget[:seed[:steps]]`` row in a single-thread subprocess (resumable) and summarise it.

    ``steps`` replaces the step count of a single-stage row (a longer schedule for the same comparison)."""
    strategy, labeled, *rest = row.split(":")
    base_seed = (protocol or PROTOCOL)["seed"]
    seed = int(rest[0]) if rest else base_seed
    r = (build or recipe)(strategy, labeled)
    tag = f"{strategy}_{labeled}" + (f"_s{seed}" if seed != base_seed else "")
    if len(rest) > 1:
        if len(r["stages"]) != 1:
            raise ValueError(f"row {row}: a step count can only replace that of a single-stage row")
        r["stages"][0]["steps"] = int(rest[1])
        tag += f"_t{rest[1]}"
    m = run_recipe_process({**r, "seed": seed}, runs / tag)
    steps = sum(s["steps"] for s in m["stages"])
    return {"strategy": strategy, "labeled": labeled, "seed": seed, "schedule": "longer" if len(rest) > 1 else "protocol",
            "mean_dice": round(m["mean_dice"], 4),
            "hd95": round(m["mean_hd95"], 2), "per_class_dice": {k: round(v, 4) for k, v in m["per_class"]["dice"].items()},
            "steps": steps, "train_seconds": round(m["train_seconds"], 1), "peak_rss_mb": round(m["peak_rss_mb"], 1),
            "threads": 1, "protocol": {k: v for k, v in (protocol or PROTOCOL).items() if k != "trainer"}}


def load_rows(path: Path = RESULTS) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _seed(r: dict) -> int:
    return r.get("seed", PROTOCOL["seed"])


def _on_protocol(r: dict) -> bool:
    """A row of the pinned protocol itself: its seed and its step schedule."""
    return _seed(r) == PROTOCOL["seed"] and r.get("schedule", "protocol") == "protocol"


def _key(r: dict) -> tuple:
    return r["strategy"], r["labeled"], _seed(r), r["steps"]


def save_rows(new: list[dict], path: Path = RESULTS) -> list[dict]:
    rows = {_key(r): r for r in load_rows(path)}
    rows.update({_key(r): r for r in new})
    order = ["supervised", "mean_teacher", "mean_teacher_strong", "mean_teacher_sepbn", "supervised_sgd",
             "mean_teacher_sgd", "bcp", "dsaif"]
    out = sorted(rows.values(), key=lambda r: (order.index(r["strategy"]) if r["strategy"] in order else 99,
                                               r["labeled"], _seed(r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def seed_table(rows: list[dict]) -> str:
    """Mean ± sample s.d. over the seeds run for each (strategy, budget, steps) with several seeds, and the paired
    difference to supervised on the same seeds and steps (same initialisation, batch order and augmentation)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["labeled"], r["steps"]), []).append(r)
    sup = {(r["labeled"], r["steps"], _seed(r)): r["mean_dice"] for r in rows if r["strategy"] == "supervised"}
    ms = lambda xs, f: f"{statistics.mean(xs):{f}} ± {statistics.stdev(xs):{f.lstrip('+')}}" if len(xs) > 1 else ""
    lines = ["| strategy | labelled | steps | seeds | mean Dice (mean ± s.d.) | per seed | HD95 (mean ± s.d.) | "
             "− supervised, same seeds (mean ± s.d.) |", "|---|---|---|---|---|---|---|---|"]
    for (strategy, labeled, steps), rs in groups.items():
        if len(rs) < 2:
            continue
        d, h = [r["mean_dice"] for r in rs], [r["hd95"] for r in rs]
        diff = [r["mean_dice"] - sup[(labeled, steps, _seed(r))] for r in rs if (labeled, steps, _seed(r)) in sup]
        lines.append(f"| {strategy} | {labeled} | {steps} | {', '.join(str(_seed(r)) for r in rs)} | {ms(d, '.4f')} | "
                     f"{', '.join(f'{x:.4f}' for x in d)} | {ms(h, '.2f')} | "
                     f"{ms(diff, '+.4f') if strategy != 'supervised' else ''} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _seconds(r: dict) -> str:
    """Training wall time; rows resumed before the runner kept time across resumes have none."""
    return f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "n/a (resumed)"


def table(rows: list[dict], ceiling: float | None = None) -> str:
    """Markdown table of ``rows``; class columns come from the rows' ``per_class_dice``. Gap closed is measured
    against the row's baseline (supervised, or its variant's) with the same labels, seed and steps, up to
    ``ceiling`` (default: the rows' supervised-all Dice)."""
    dice = {(r["strategy"], r["labeled"], _seed(r), r["steps"]): r["mean_dice"] for r in rows}
    if ceiling is None:
        ceiling = next((r["mean_dice"] for r in rows if r["strategy"] == "supervised" and r["labeled"] == "all"), None)
    classes = list(dict.fromkeys(c for r in rows for c in r.get("per_class_dice", {})))
    lines = [f"| strategy | labelled | seed | mean Dice | {' | '.join(classes)} | HD95 (px) | gap closed | steps | "
             "train s | peak RSS MB |", "|---" * (9 + len(classes)) + "|"]
    for r in rows:
        baseline = VARIANTS.get(r["strategy"], {}).get("baseline", "supervised")
        gap, base = "", dice.get((baseline, r["labeled"], _seed(r), r["steps"]))
        if r["strategy"] != baseline and base is not None and ceiling is not None:
            gap = f"{100 * (r['mean_dice'] - base) / (ceiling - base):.0f} %"
        pc = " | ".join(f"{r.get('per_class_dice', {}).get(c, float('nan')):.3f}" for c in classes)
        lines.append(f"| {r['strategy']} | {r['labeled']} | {_seed(r)} | {r['mean_dice']:.4f} | {pc} | {r['hd95']:.2f} | "
                     f"{gap} | {r['steps']} | {_seconds(r)} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _speed_rows(path: Path) -> list[str]:
    return [f"| {r['strategy']} | {r.get('backbone', 'unet')} | {r.get('batch', 8)} + {r.get('batch', 8)} | "
            f"{r.get('precision', 'bf16-mixed')} | {r['threads']} | {r['raw_its']:.2f} | {r['lightning_its']:.2f} | "
            f"{1 / r['lightning_its']:.2f} | {r['overhead_pct']:+.1f} % | {r['strategy_loop_its']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |" for r in json.loads(path.read_text())]


def write_markdown(rows: list[dict]) -> None:

    p = PROTOCOL
    md = [
        "# Benchmarks", "",
        "Regenerate: `python benchmarks/acdc_cpu.py --table-only` (this file from the JSON rows; drop `--table-only` "
        "to run rows), `python benchmarks/acdc_contrastive.py`, `python benchmarks/speed.py`. Numbers are from a "
        "2-core AMD EPYC VM (AVX2, no native bf16, so `precision: auto` runs fp32), one thread per run unless stated; "
        "rows added on 2026-12-01 (the quick sweep, LA rows with `steps` 1200 or `bcp_*` variants, LA v2, DeSCO, "
        "CycleGAN, AugPaint, SDC-UDA, the contrastive and CUTS tables, ACDC v2 rows at `all` and `labeled_3`, the "
        "ACDC v2 mean-teacher and DSAIF rows, the pre-training ablation, the Xeon rows beside the official code, the "
        "polyp seed-1338 and SDC-UDA rows, the simulated-shift SFDA and the OOD tables) ran on a 2-core Intel Xeon VM with AVX-512 BF16, where "
        "`precision: auto` picks bf16-mixed, "
        "several runs sharing the two cores (so their `train s` are not speed measurements).",
        "", "## ACDC-CPU protocol v2 (the official BCP configuration)", "",
        f"ACDC 2D slices resized to {p['data']['image_size'][0]}², `basic_unet` (the SSL4MIS/BCP U-Net: max-pool, "
        "16…256 channels, encoder dropout 0.05…0.5), batch "
        f"{p['batch_size']['labeled']} labelled + {p['batch_size']['unlabeled']} unlabelled, SGD lr "
        f"{p['optimizer']['lr']} momentum {p['optimizer']['momentum']} weight decay {p['optimizer']['weight_decay']} "
        f"at a constant rate, {p['steps']} steps (BCP: {p['steps'] // 3} copy-paste pre-training + "
        f"{p['steps'] - p['steps'] // 3} self-training from the best pre-training checkpoint), validation every "
        f"{p['val_every']} steps on all 20 val volumes (model selection), precision auto. Test: per-volume mean Dice "
        "over RV/MYO/LV and HD95 in pixels on the 40 test volumes (predictions resized back to each slice's size). "
        "gap closed = (strategy − supervised, same labels) / (supervised all − supervised, same labels); empty where "
        "a row it needs is not run yet.", "",
        table([r for r in rows if _on_protocol(r)]), "",
    ]
    spread = seed_table(rows)
    if spread:
        md += ["Seed spread (`--rows strategy:budget:seed`): other seeds change the initialisation, the batch order and "
               "the augmentation; the last column pairs each seed with supervised on that seed.", "", spread, ""]
    official = HERE / "results" / "official_bcp.json"
    if official.exists():
        off = json.loads(official.read_text())
        md += ["### Beside the official BCP code", "",
               "The official code (DeepMed-Lab-ECNU/BCP, run outside this repository with CPU edits only: no `.cuda()`, "
               "no DataLoader workers, 128² patches, and a stand-in for torchvision's `Compose`, whose wheel did not match "
               "torch 2.13) on the same ACDC slices and split (its h5 format), run on this machine:", "",
               "| what | official | ours | how ours was measured |", "|---|---|---|---|"]
        md += [f"| {r['what']} | {r['official']} | {r['ours']} | {r['ours_from']} |" for r in off["rows"]]
        md += ["", off.get("note", ""), ""]
    ablation = sorted((r for r in rows if r["strategy"].startswith("bcp_pretrain")),
                      key=lambda r: r["strategy"] != "bcp_pretrain")  # the v2 stage first
    if ablation:
        cmd = " ".join(f"{r['strategy']}:{r['labeled']}:{_seed(r)}:{r['steps']}" for r in ablation)
        md += ["### Ablation: BCP's copy-paste pre-training with one setting changed (the v1 → v2 gap, and precision)", "",
               "The pre-training stage builds the teacher that BCP's self-training starts from. `bcp_pretrain` is the "
               "v2 stage; `_v1net` puts back the v1 network (MONAI UNet 16…256, no residual units, no dropout), `_adamw` "
               "the v1 optimizer (AdamW 3e-3, poly), `_b8` the v1 batch (8 + 8), `_v1` all three; `_fp32` keeps v2 "
               "but trains in fp32 where `precision: auto` chose bf16-mixed (this Xeon host has native bf16). Same "
               "labels, seed and steps; test Dice of the stage's best val checkpoint. "
               f"`python benchmarks/acdc_cpu.py --rows {cmd}`",
               "", table(ablation), ""]
    v1 = load_rows(RESULTS_V1)
    if v1:
        md += ["## ACDC-CPU protocol v1 (superseded; not comparable with v2)", "",
               "MONAI U-Net 16…256 without residual units, AdamW 3e-3 poly, batch 8 + 8, bf16 autocast, 2000 steps "
               "(supervised-all 6000), validation on 5 val volumes. Kept for the record of issue 9's gap.", "",
               table([r for r in v1 if _on_protocol(r)]), ""]
    contrastive = HERE / "results" / "acdc_contrastive.json"
    if contrastive.exists():
        from acdc_contrastive import PROTOCOL as CP

        g, lo, ft = CP["global"], CP["local"], CP["finetune"]
        md += ["## Contrastive pre-training → fine-tune (ACDC)", "",
               "Regenerate: `python benchmarks/acdc_contrastive.py`. One label-free pre-training on all 70 train "
               f"patients (no mask read): `contrastive_global` {g['steps']} steps (S = {g['config']['partitions']}, "
               f"m = {g['config']['volumes']}), then `contrastive_local` {lo['steps']} steps (l = "
               f"{lo['config']['decoder_blocks']}, {lo['batch']} pairs), Adam 1e-3, 128², `basic_unet`. Each row "
               f"fine-tunes with `supervised` for {ft['steps']} steps (Adam 1e-3, batch {ft['batch']}, validation every "
               f"{ft['val_every']} steps on {CP['data']['max_val_cases']} val volumes) from the pre-trained encoder + "
               "first 3 decoder blocks (`pretrained`) or from random init (`random`), same labelled patients "
               "(`count_n`, chosen by the seed), same seed. The spec trains 10k iterations per stage on a GPU.", "",
               table(load_rows(contrastive), ceiling=None), ""]
        pairs = seed_table([{**r, "strategy": "supervised" if r["strategy"] == "random" else r["strategy"]}
                            for r in load_rows(contrastive)])
        if pairs:
            md += ["Seed mean (last column: pre-trained − random init, paired by seed):", "",
                   pairs.replace("| supervised |", "| random |").replace("− supervised, same seeds", "− random, same seeds"), ""]
    cuts = HERE / "results" / "cuts.json"
    if cuts.exists():
        from cuts import CUTS_STEPS, SIZE, SUPERVISED_STEPS, table as cuts_table

        md += ["## CUTS: unsupervised segmentation against label-free baselines", "",
               f"Regenerate: `python benchmarks/cuts.py`. Images at {SIZE}²; CUTS stage 1 ({CUTS_STEPS} steps, "
               "`recipes/polyp_cuts.yaml`, no label read; the checkpoint of lowest loss on the val images, checked "
               "every quarter of the run: `select: val_loss`, the official rule) on the train images, then per test image diffusion "
               "condensation. Binary target: polyp (Kvasir test) and left-ventricle cavity (ACDC test slices that "
               "contain it). *label-free* rows choose the granularity and the foreground cluster without any label "
               "(silhouette level or the official code's *persistent* map of the whole hierarchy, then the centre prior); "
               "*oracle* rows choose them with the ground truth, as the paper scores. No CUTS label-free row beats "
               "k-means on intensity here; the persistent map is the worst label-free row on polyps (it keeps many "
               "small clusters, and the centre prior then picks one of them). The val loss fell at every check on "
               "both datasets, so `val_loss` kept the last step (rows re-made on 2026-12-01 with it, on 100 test "
               "images; the earlier 60-image rows are replaced). "
               f"`supervised`: `basic_unet` on the stated few labels, {SUPERVISED_STEPS} steps, SGD 0.01.", "",
               cuts_table(json.loads(cuts.read_text())), ""]
    sfda = HERE / "results" / "sfda_polyp.json"
    if sfda.exists():
        from sfda_polyp import PROTOCOL as SP, SDC_TRANSLATE_STEPS as SP_SDC, table as sfda_table

        md += ["## Source-free adaptation across polyp centres (Kvasir-SEG ↔ CVC-ClinicDB)", "",
               f"Regenerate: `python benchmarks/sfda_polyp.py`. Images resized to {SP['image_size'][0]}², same U-Net; "
               f"source and oracle {SP['source_steps']} supervised steps (selected on their own val split); adaptation "
               f"{SP['adapt_steps']} steps per method on unlabelled target train images, last checkpoint (no target "
               "labels for selection). Dice/HD95 on the target test split, per image. drop recovered = (adapted − "
               "source-only) / (oracle − source-only). `sdc_uda` (`--methods sdc_uda`; unsupervised DA, it reads the "
               f"labelled source): `recipes/polyp_sdc_uda.yaml` with {SP_SDC} translation steps, trained from scratch. "
               "Every `sdc_uda` row was made after commit ae086f5 (the discriminator's R1 penalty summed over the "
               "slab, as in the official code). The seed-1337 source-only, oracle and source-on-source rows were "
               "re-made on 2026-12-01 with the SDC-UDA rows (the source folder re-evaluated, the oracle re-trained): "
               "kvasir→cvc source-only 0.5126 and oracle 0.3553, where the same seed's BN/UPL rows, made earlier, had "
               "0.4935 and 0.2927 beside them; cvc→kvasir 0.4023 and 0.6726, where they had 0.3937 and 0.6762. "
               "The seed-1338 rows are one consistent set.", "", sfda_table(json.loads(sfda.read_text())), ""]
    ood = HERE / "results" / "ood_polyp.json"
    if ood.exists():
        from ood_polyp import table as ood_table

        md += ["## Does the failure warning work? (polyp centres)", "",
               "Regenerate: `python benchmarks/ood_polyp.py`. Source models of `benchmarks/sfda_polyp.py` (one per "
               "direction, one seed); every score is fitted on the source domain only; failure = image Dice < 0.5. "
               "*shift* = AUROC of source test vs. target test images. No score reaches AUROC 0.7 on the target images "
               "in both directions; the shipped warning (deep kNN, k = 5) sees the centre change (shift AUROC "
               "0.94–0.96), not which masks are wrong.", "", ood_table(json.loads(ood.read_text())), ""]
    shift = HERE / "results" / "sfda_shift.json"
    if shift.exists():
        import sfda_shift

        md += ["## Source-free adaptation on simulated scanner shifts (ACDC)", "",
               "Regenerate: `python benchmarks/sfda_shift.py`. **The shifts are simulated** (dataset `simulated_shift`): "
               "half of the ACDC patients of every split are re-imaged by a simulated target scanner, `inverted` = gamma "
               "0.6, contrast inversion, bias field ±30 %, blur σ 1 px (the SDC-UDA benchmark's), `no_inversion` = the "
               f"same without the inversion. 64², `basic_unet` (BN, encoder dropout), source and oracle "
               f"{sfda_shift.PROTOCOL['train']['steps']} supervised steps (last step), adaptation "
               f"{sfda_shift.PROTOCOL['adapt']['steps']} steps on unlabelled target train slices (last step, no target "
               "label read). Dice mean over RV/MYO/LV on the 20 target test volumes; drop recovered = (adapted − "
               "source-only) / (oracle − source-only), same seed. *label-free stop* rows: the method adapts for "
               f"{sfda_shift.STOPPING_STEPS} steps with `select: label_free` (flip consistency on the 20 target val "
               "volumes, masks unread, every 100 steps, and of the source model before step 1) and is scored at the chosen "
               "step (0: the source model was kept, i.e. the rule declined to adapt); *last of "
               f"{sfda_shift.STOPPING_STEPS}* is the same run's last step (`python benchmarks/sfda_shift.py --methods "
               "\"bn_sfda, label-free stop\" \"upl_sfda, label-free stop\"`). *sdc_uda* rows (`--methods sdc_uda`, "
               "`benchmarks/sdc_uda.py`'s schedule on this backbone; unsupervised DA: it reads the labelled source "
               "images) were re-made after commit ae086f5 (R1 penalty summed over the slab): on the scanner without "
               "inversion 0.7175 / 0.7431 where the pre-fix rows had 0.7323 / 0.7527.", "",
               sfda_shift.table(json.loads(shift.read_text())), ""]
    la2 = HERE / "results" / "la_cpu_v2.json"
    if la2.exists():
        from la_cpu import PROTOCOL_V2 as LP2

        md += ["## LA 3D, CPU protocol v2 (the BCP LA code's crop and optimizer)", "",
               f"Regenerate: `python benchmarks/la_cpu.py --protocol v2`. LA subset (16 train / 8 test volumes, no val: "
               f"last checkpoint), random {LP2['patch_size']} crops (the BCP code's patch), 3D U-Net "
               f"{LP2['backbone']['kwargs']['channels']} with BN, batch {LP2['batch_size']['labeled']} + "
               f"{LP2['batch_size']['unlabeled']}, SGD 0.01 momentum 0.9 at a constant rate (the BCP code's), "
               f"{LP2['steps']} steps (BCP: {LP2['steps'] // 3} copy-paste pre-training + {LP2['steps'] - LP2['steps'] // 3} "
               "self-training, EMA of parameters only, linear Dice: the LA code's settings), sliding-window test; "
               "Dice and HD95 in voxels on the 8 test volumes.", "", table(load_rows(la2)), "",
               "BCP's teacher (the 400-step copy-paste pre-training alone: `label-efficient evaluate "
               "<run>/recipe.resolved.yaml --model <run>/stage0_bcp_pretrain/last.ckpt --split test`) scores 0.580; "
               "self-training lifts it to 0.719, above supervised with the same 1200 steps (0.643). On v1 the same "
               "self-training lowered a 0.634 teacher by ~0.06. v2 changes two things at once (the optimizer: SGD at a "
               "constant rate instead of AdamW restarted with a poly decay per stage; the crop: 112×112×80 instead of "
               "80×80×48); which one matters is not ablated, and v2 has one seed so far.", ""]
    la = HERE / "results" / "la_cpu.json"
    if la.exists():
        from la_cpu import PROTOCOL_V1 as LP

        md += ["## LA 3D, CPU protocol v1 (superseded by v2)", "",
               f"Regenerate: `python benchmarks/la_cpu.py --protocol v1`. LA subset (16 train / 8 test volumes, no val: last "
               f"checkpoint), random {LP['patch_size']} crops, 3D U-Net {LP['backbone']['kwargs']['channels']}, batch "
               f"{LP['batch_size']['labeled']} + {LP['batch_size']['unlabeled']}, {LP['steps']} steps, sliding-window "
               "test (overlap 0.5); Dice and HD95 in voxels on the 8 test volumes. Not comparable to published LA numbers "
               "(80 train / 20 test volumes, 15k+ iterations).", "", table(load_rows(la)), "",
               "Variants (`python benchmarks/la_cpu.py --rows ROW`): `supervised:labeled_4:SEED:1200` (1200 steps); "
               "`bcp` (150 copy-paste pre-training + 450 self-training steps); `bcp_full_pretrain` (600 + 600); "
               "`bcp_from_supervised` (600 plain supervised steps as the teacher, then 600 BCP steps); "
               "`bcp_from_supervised_no_lcc` (the same without largest-component cleaning of pseudo labels). The "
               "teachers alone score 0.526 (600 copy-paste steps: `label-efficient evaluate <run>/recipe.resolved.yaml "
               "--model <run>/stage0_bcp_pretrain/last.ckpt --split test`) and 0.634 (600 supervised steps, the first "
               "row): self-training adds +0.015 to the weaker teacher and removes about 0.06 from the stronger one, with "
               "or without component cleaning, so on this crop size (80×80×48 of ~200×145×88 volumes; the BCP code "
               "crops 112×112×80) and schedule BCP stays below supervised with the same steps.", ""]
    desco = HERE / "results" / "la_desco.json"
    if desco.exists():
        from la_desco import table as desco_table

        md += ["## DeSCO: two orthogonal slices per volume (LA 3D)", "",
               "Regenerate: `python benchmarks/la_desco.py`. `recipes/la_desco.yaml`: 5 labelled volumes of the LA "
               "subset, each with one axial and one coronal annotated slice (middle slices; the rest of the label is "
               "erased before training), 11 unlabelled; ANTs SyNRA propagation; 3D U-Net 16…128 with dropout 0.1, "
               "80×80×48 crops, SGD 0.01 (Net1 ×0.1 at 5/12 and 10/12 of the run), last checkpoint, Dice/HD95 (voxels) "
               "on the 8 test volumes. `supervised_sparse`: the same 10 slices only (loss on `label_mask`); "
               "`supervised_dense`: the 5 volumes fully annotated. Same steps for every row. DeSCO takes a 2 + 2 batch "
               "and gives each network its own half (the official code's loader per network); the `desco` rows were "
               "re-made with it on 2026-12-01 (before, both networks shared one 1 + 1 batch: 0.4698 / 0.4714).", "",
               desco_table(load_rows(desco)), ""]
    for section in sorted((HERE / "results" / "sections").glob("*.md")):  # benchmarks reported as written sections
        md += [section.read_text().strip(), ""]
    sweep = HERE / "results" / "sweep_acdc_quick.md"
    if sweep.exists():
        md += ["## Label-budget sweep (`label-efficient sweep`, quick recipe)", "",
               "`label-efficient sweep recipes/acdc_quick.yaml --strategies supervised,mean_teacher --budgets "
               "1,3,7,14,all --seeds 2 --out runs/quick_sweep` (then copy `sweep.md` and `learning_curve.png` to "
               "`benchmarks/results/sweep_acdc_quick.*`): the README's quick recipe as it was then (96² MONAI U-Net 16…128, 600 AdamW steps; since 2026-12-01 it uses basic_unet and SGD), each "
               "cell selected on 6 val volumes and tested on the 40 test volumes. Budgets are `count: n` patients drawn "
               "by the seed (not the SSL4MIS `labeled_n` lists); mean teacher at `all` is skipped (no "
               "unlabelled data left). *Labels saved* interpolates supervised's curve linearly between its budgets "
               "(7 → 14 → 70 here), so it is coarse where the budgets are far apart.", "", sweep.read_text().strip(), "",
               "![learning curve](results/sweep_acdc_quick.png)", ""]
    speed_files = sorted((HERE / "results").glob("speed*.json"))
    if speed_files:
        md += ["## Step time against a raw PyTorch loop", "",
               "`python benchmarks/speed.py [--backbone basic_unet --batch 12 --optimizer sgd --strategies bcp --out "
               "speed_bcp_official_config.json]`: the same pre-built ACDC batches (128²), run alone; median of "
               "interleaved repeats (raw, Lightning, plain loop, raw, …; one repeat moves by up to ±20 % on this VM). The "
               "raw loop is hand-written PyTorch doing the same network passes (for BCP: only the teacher and student "
               "passes, so the overhead includes box masks, mixing and connected-component cleaning). Lightning = our "
               "`StrategyModule` in a `Trainer`; plain loop = the strategy object in a 10-line loop.", "",
               "| strategy | backbone | batch | precision | threads | raw it/s | Lightning it/s | Lightning s/it | "
               "overhead | plain-loop it/s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in speed_files:
            md += _speed_rows(f)
        md.append("")
    (HERE / "RESULTS.md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="strategy:budget pairs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", default=str(HERE / "runs" / "acdc_v2"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if not args.table_only:
        runs = Path(args.runs)
        runs.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda r: run_row(r, runs), args.rows):
                print(json.dumps(row), flush=True)
                save_rows([row])
    write_markdown(load_rows())
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
