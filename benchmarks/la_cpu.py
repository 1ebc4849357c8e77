"""LA 3D rows on a short CPU protocol (supervised vs BCP at ``labeled_4``): results/la_cpu[_v2].json + RESULTS.md.

    python benchmarks/la_cpu.py --protocol v2 [--rows supervised:labeled_4 bcp:labeled_4] [--jobs 1]
    python benchmarks/la_cpu.py --protocol v1 --rows bcp_from_supervised:labeled_4   # the superseded protocol

v1 (80×80×48 crops, AdamW 3e-3 poly, 600 steps) left BCP below supervised; v2 takes the BCP LA code's settings that
fit this CPU: its 112×112×80 crop and SGD 0.01 (momentum 0.9) at a constant rate, 1200 steps (BCP: 1/3 copy-paste
pre-training, 2/3 self-training). Its VNet at that crop costs ~15 s per step on one core, so the network stays the
small 3D U-Net.

Run it as a script (it imports only ``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md (v2, then
v1). The teachers' scores it quotes are ``results/la_teachers.json`` (evaluations of stage checkpoints, the command
in the file).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import (RESULTS_DIR, RUNS_DIR, load_json, load_rows, rebuild_report, result_table, row_seed, run_row, run_rows,
                    save_rows)

#: LA's voxel spacing (isotropic, mm): HD95 in voxels times this is HD95 in mm
LA_MM = 0.625
RESULTS = {"v1": RESULTS_DIR / "la_cpu.json", "v2": RESULTS_DIR / "la_cpu_v2.json"}
#: test Dice of BCP's pre-training stage alone (the teacher), evaluated from its checkpoint by hand
TEACHERS = RESULTS_DIR / "la_teachers.json"
PROTOCOL_V1 = {
    "seed": 1337,
    "patch_size": [80, 80, 48],
    "backbone": {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128], "num_res_units": 0}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 25},
    "steps": 600,
    "batch_size": {"labeled": 2, "unlabeled": 2},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"},
    "pretrain_share": 4,  #: ``bcp`` pre-trains for steps // pretrain_share, then self-trains for the rest
}
PROTOCOL_V2 = {**PROTOCOL_V1, "patch_size": [112, 112, 80], "steps": 1200, "pretrain_share": 3,
               "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "schedule": "constant"}}
PROTOCOLS = {"v1": PROTOCOL_V1, "v2": PROTOCOL_V2}
PROTOCOL = PROTOCOL_V2


def recipe(strategy: str, labeled: str, p: dict = PROTOCOL) -> dict:
    common = {"val_every": 100, "batch_size": p["batch_size"], "optimizer": p["optimizer"]}
    if strategy in ("bcp", "bcp_full_pretrain"):  # LA settings of the BCP code: EMA of parameters only, linear Dice
        # bcp: 1/4 of the protocol's steps pre-train, 3/4 self-train (same total as supervised: 600). bcp_full_pretrain:
        # the teacher first trains for the supervised baseline's whole schedule (600), then 600 self-training steps
        # (compare with supervised:labeled_4:1337:1200, the same 1200 steps)
        pre = p["steps"] // p["pretrain_share"] if strategy == "bcp" else p["steps"]
        self_steps = p["steps"] - pre if strategy == "bcp" else p["steps"]
        stages = [{"strategy": "bcp_pretrain", "steps": pre, **common, "config": {"squared_dice": False}},
                  {"strategy": "bcp", "steps": self_steps, "init": "previous_last", **common,
                   "config": {"ema_buffers": False, "squared_dice": False}}]
    elif strategy in ("bcp_from_supervised", "bcp_from_supervised_no_lcc"):
        # the teacher is the supervised baseline's model (600 plain steps); no_lcc: pseudo labels are not cut to their
        # largest component (a small crop often shows the atrium in several pieces)
        cfg = {"ema_buffers": False, "squared_dice": False, "largest_component": not strategy.endswith("no_lcc")}
        stages = [{"strategy": "supervised", "steps": p["steps"], **common},
                  {"strategy": "bcp", "steps": p["steps"], "init": "previous_last", **common, "config": cfg}]
    else:
        stages = [{"strategy": strategy, "steps": p["steps"], **common}]
    return {"name": f"la_cpu_{strategy}_{labeled}", "seed": p["seed"], "backbone": p["backbone"], "trainer": p["trainer"],
            "data": {"dataset": "la_heart", "patch_size": p["patch_size"], "budget": {"flag": labeled}, "val_split": None},
            "evaluation": {"metrics": ["dice", "hd95"], "overlays": 2}, "stages": stages}


def load_results() -> dict:
    return {"v1": load_rows(RESULTS["v1"]), "v2": load_rows(RESULTS["v2"]), "teachers": load_json(TEACHERS)}


def _dice(rows: list[dict], strategy: str, steps: int, seed: int = PROTOCOL["seed"]) -> float | None:
    return next((r["mean_dice"] for r in rows if r["strategy"] == strategy and r["steps"] == steps
                 and row_seed(r) == seed), None)


def _teacher(teachers: dict | None, protocol: str) -> dict | None:
    return next((t for t in (teachers or {}).get("rows", []) if t["protocol"] == protocol), None)


def _v2_reading(v2: list[dict], v1: list[dict], teachers: dict | None) -> list[str]:
    p = v2[0]["protocol"]
    teacher, bcp, sup = _teacher(teachers, "v2"), _dice(v2, "bcp", p["steps"]), _dice(v2, "supervised", p["steps"])
    v1_teacher, v1_after = _dice(v1, "supervised", PROTOCOL_V1["steps"]), _dice(v1, "bcp_from_supervised", 2 * PROTOCOL_V1["steps"])
    if None in (teacher, bcp, sup, v1_teacher, v1_after):
        return []
    return [f"BCP's teacher (the {teacher['steps']}-step copy-paste pre-training alone: `{teachers['command']}`) scores "
            f"{teacher['mean_dice']:.3f}; self-training {'lifts' if bcp > teacher['mean_dice'] else 'lowers'} it to "
            f"{bcp:.3f}, {'above' if bcp > sup else 'below'} supervised with the same {p['steps']} steps ({sup:.3f}). "
            f"On v1 the same self-training {'lowered' if v1_after < v1_teacher else 'raised'} a {v1_teacher:.3f} "
            f"teacher by {abs(v1_after - v1_teacher):.3f}. v2 changes two things at once (the optimizer: SGD at a "
            "constant rate instead of AdamW restarted with a poly decay per stage; the crop: "
            f"{'×'.join(map(str, p['patch_size']))} instead of {'×'.join(map(str, PROTOCOL_V1['patch_size']))}); which "
            f"one matters is not ablated, and v2 has {_count(len({row_seed(r) for r in v2}))} so far.", ""]


def _count(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


def _v1_reading(v1: list[dict], teachers: dict | None) -> list[str]:
    steps = PROTOCOL_V1["steps"]
    pre = steps // PROTOCOL_V1["pretrain_share"]
    teacher = _teacher(teachers, "v1")
    sup, full = _dice(v1, "supervised", steps), _dice(v1, "bcp_full_pretrain", 2 * steps)
    lcc, no_lcc = _dice(v1, "bcp_from_supervised", 2 * steps), _dice(v1, "bcp_from_supervised_no_lcc", 2 * steps)
    text = (f"Variants (`python benchmarks/la_cpu.py --rows ROW`): `supervised:labeled_4:SEED:{2 * steps}` "
            f"({2 * steps} steps); `bcp` ({pre} copy-paste pre-training + {steps - pre} self-training steps); "
            f"`bcp_full_pretrain` ({steps} + {steps}); `bcp_from_supervised` ({steps} plain supervised steps as the "
            f"teacher, then {steps} BCP steps); `bcp_from_supervised_no_lcc` (the same without largest-component "
            "cleaning of pseudo labels).")
    sup_long = _dice(v1, "supervised", 2 * steps)
    if None not in (teacher, sup, full, lcc, no_lcc, sup_long):
        strong = (f"removes {sup - lcc:.3f} / {sup - no_lcc:.3f} from the stronger one" if max(lcc, no_lcc) < sup else
                  f"changes the stronger one by {lcc - sup:+.3f} / {no_lcc - sup:+.3f}")
        crop = lambda p: "×".join(map(str, p["patch_size"]))
        text += (f" The teachers alone score {teacher['mean_dice']:.3f} ({teacher['steps']} copy-paste steps: "
                 f"`{teachers['command']}`) and {sup:.3f} ({steps} supervised steps, the first row): self-training "
                 f"adds {full - teacher['mean_dice']:+.3f} to the weaker teacher and {strong} (with / without "
                 f"component cleaning), so on this crop size ({crop(PROTOCOL_V1)} of ~200×145×88 volumes; the BCP code "
                 f"crops {crop(PROTOCOL_V2)}) and schedule BCP stays "
                 f"{'below' if max(full, lcc, no_lcc) < sup_long else 'not always below'} supervised with the same "
                 "steps.")
    return [text, ""]


def section(rows: dict) -> str:
    md = []
    v1, v2 = rows["v1"], rows["v2"]
    if v2:
        p = v2[0]["protocol"]
        pre = p["steps"] // PROTOCOL_V2["pretrain_share"]
        md += ["## LA 3D, CPU protocol v2 (the BCP LA code's crop and optimizer)", "",
               "Regenerate: `python benchmarks/la_cpu.py --protocol v2`. LA subset (16 train / 8 test volumes, no val: "
               f"last checkpoint), random {p['patch_size']} crops (the BCP code's patch), 3D U-Net "
               f"{p['backbone']['kwargs']['channels']} with BN, batch {p['batch_size']['labeled']} + "
               f"{p['batch_size']['unlabeled']}, SGD {p['optimizer']['lr']} momentum {p['optimizer']['momentum']} at a "
               f"constant rate (the BCP code's), {p['steps']} steps (BCP: {pre} copy-paste pre-training + "
               f"{p['steps'] - pre} self-training, EMA of parameters only, linear Dice: the LA code's settings), "
               "sliding-window test; Dice and HD95 on the 8 test volumes, HD95 in voxels as measured and in mm (× the "
               f"isotropic {LA_MM} mm spacing; rows made before surfaces took medpy's connectivity 1).", "",
               result_table(v2, mm_per_voxel=LA_MM), "",
               *_v2_reading(v2, v1, rows["teachers"])]
    if v1:
        p = v1[0]["protocol"]
        md += ["## LA 3D, CPU protocol v1 (superseded by v2)", "",
               "Regenerate: `python benchmarks/la_cpu.py --protocol v1`. LA subset (16 train / 8 test volumes, no val: "
               f"last checkpoint), random {p['patch_size']} crops, 3D U-Net {p['backbone']['kwargs']['channels']}, batch "
               f"{p['batch_size']['labeled']} + {p['batch_size']['unlabeled']}, {p['steps']} steps, sliding-window test "
               "(overlap 0.5); Dice and HD95 on the 8 test volumes (voxels, and mm at the isotropic "
               f"{LA_MM} mm spacing). Not comparable to published LA numbers "
               "(80 train / 20 test volumes, 15k+ iterations).", "", result_table(v1, mm_per_voxel=LA_MM), "", *_v1_reading(v1, rows["teachers"])]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", nargs="*", default=["supervised:labeled_4", "bcp:labeled_4"])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", default=None, help="default runs/la (v1), runs/la_v2 (v2)")
    args = ap.parse_args()
    p = PROTOCOLS[args.protocol]
    runs = Path(args.runs or RUNS_DIR / ("la" if args.protocol == "v1" else f"la_{args.protocol}"))
    runs.mkdir(parents=True, exist_ok=True)
    run_rows(args.rows, args.jobs, lambda r: run_row(r, runs, lambda s, b: recipe(s, b, p), p),
             lambda row: save_rows([row], RESULTS[args.protocol]))
    rebuild_report()


if __name__ == "__main__":
    main()
