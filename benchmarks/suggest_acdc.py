"""Which ACDC patients to label next (issue 27): selection rules against random over active-learning rounds.

    python benchmarks/suggest_acdc.py                 # the protocol: hours to days on 2 cores (BCP dominates)
    python benchmarks/suggest_acdc.py --short         # supervised, 300 steps at 96², batch 8: ~30 min on 2 cores
    python benchmarks/suggest_acdc.py --short --strategies bcp --rules random typiclust kcenter   # BCP, 300 + 300
    python benchmarks/suggest_acdc.py --short --rules random entropy_kcenter --rounds 1 3

Protocol: ACDC, `supervised` (``recipes/acdc_supervised.yaml``) and BCP (``recipes/acdc_bcp.yaml``), the ACDC-CPU v2
schedules at 128²; rounds 1 → 3 → 7 labelled patients; each rule against `random`, seeds 1337, 1338, 1339. A round
is ``label_efficient.sweep.run_rounds``: round 1 labels one patient drawn by the seed (the same patient for every
rule at that seed, one shared run), each later round asks the rule for the next patients with the model the round
before trained (``label-efficient suggest``, same seed), then trains from scratch on all of them; every round is
tested on the 40 test volumes. The short protocol (``--short``) is the same with 300 SGD steps a stage at 96², batch
8 (+ 8 unlabelled), one validation at the end of each stage, supervised by default: a cheap look, not the
measurement.

Rows (resumable: the runs resume and finished rows are kept) go to ``results/suggest_acdc.json``, one per strategy,
rule, seed and round; ``section(rows)`` formats the RESULTS.md section from them. Each (strategy, rule, seed) runs in
one single-thread subprocess, one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import RESULTS_DIR, ROOT, RUNS_DIR, md_table, mean_sd, merge_rows, load_rows, resolved_precision

RESULTS = RESULTS_DIR / "suggest_acdc.json"
RULES = ("random", "kcenter", "typiclust", "entropy", "entropy_kcenter")
SEEDS = (1337, 1338, 1339)
ROUNDS = (1, 3, 7)
RECIPES = {"supervised": "recipes/acdc_supervised.yaml", "bcp": "recipes/acdc_bcp.yaml"}
SHORT = {"steps": 300, "image_size": [96, 96], "batch": 8}


def recipe(strategy: str, short: bool) -> dict:
    import yaml

    raw = yaml.safe_load((ROOT / RECIPES[strategy]).read_text())
    raw["name"] = f"acdc_{strategy}" + ("_short" if short else "")
    raw["trainer"] = {**raw.get("trainer", {}), "progress_bar": False, "log_every": 50}
    if short:
        raw["data"]["image_size"] = SHORT["image_size"]
        for st in raw["stages"]:
            st.update(steps=SHORT["steps"], val_every=SHORT["steps"])
            st["batch_size"] = {k: SHORT["batch"] for k in st["batch_size"]}
    return raw


def _out(strategy: str, short: bool):
    return RUNS_DIR / "suggest_acdc" / (f"{strategy}_short" if short else strategy)


def run_line(strategy: str, rule: str, seed: int, rounds: list[int], short: bool) -> list[dict]:
    """The rounds of one (strategy, rule, seed) in a single-thread subprocess (resumable), then its rows."""
    import yaml

    raw = {**recipe(strategy, short), "seed": seed}
    out = _out(strategy, short)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"{rule}_s{seed}.json"
    spec.write_text(json.dumps(raw))
    code = ("import json,torch; torch.set_num_threads(1);"
            "from label_efficient.recipe import parse_recipe; from label_efficient.sweep import run_rounds;"
            f"run_rounds([parse_recipe(json.load(open({str(spec)!r})))], [{rule!r}], {rounds!r}, 1, {str(out)!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{strategy}/{rule}/seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = []
    for i, n in enumerate(rounds):
        folder = out / (f"start_{raw['name']}" if i == 0 else rule) / f"budget_{n}" / f"seed_{seed}"
        m = json.loads((folder / "metrics.json").read_text())
        budget = yaml.safe_load((folder / "recipe.resolved.yaml").read_text())["data"]["budget"]
        rows.append({"strategy": strategy, "rule": rule, "seed": seed, "round": i + 1, "labelled": n,
                     "labelled_ids": budget.get("ids"),  # None in round 1: count n drawn by the seed
                     "mean_dice": round(m["mean_dice"], 4), "hd95": round(m["mean_hd95"], 2),
                     "train_seconds": round(m["train_seconds"], 1),
                     "steps": sum(s["steps"] for s in raw["stages"]),
                     "image_size": raw["data"]["image_size"], "protocol": "short" if short else "full",
                     "precision": resolved_precision(raw["trainer"]), "threads": 1,
                     "commit": (m.get("provenance") or {}).get("git_commit"),
                     "line_wall_seconds": round(time.time() - t0, 1)})
    return rows


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def _key(r: dict):
    return (r["protocol"], r["strategy"], r["rule"], r["seed"], r["round"])


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    parts = ["## Which patients to label next (`label-efficient suggest`, active-learning rounds on ACDC)", "",
             "`python benchmarks/suggest_acdc.py` (`--short` for the short protocol): round 1 labels one patient drawn "
             "by the seed (shared by every rule), each later round adds the patients the rule suggests with the "
             "model the previous round trained, then trains from scratch; test mean Dice on the 40 test volumes, "
             "mean ± s.d. over seeds, and the mean paired difference to `random` (same strategy, seed and round).", ""]
    for protocol in ("full", "short"):
        rs = [r for r in rows if r["protocol"] == protocol]
        if not rs:
            continue
        r0 = rs[0]
        steps = ", ".join(f"{k} {v} SGD steps" for k, v in sorted({r["strategy"]: r["steps"] for r in rs}.items()))
        what = ("the protocol (ACDC-CPU v2 schedules at 128²)" if protocol == "full" else
                f"**the short protocol** ({steps} in all (BCP: {SHORT['steps']} per stage), at "
                f"{r0['image_size'][0]}², batch {SHORT['batch']} (BCP: + {SHORT['batch']} unlabelled), one validation "
                "at the end of each stage): a cheap look, not the measurement")
        parts += [f"{what}; precision {r0['precision']}, one thread per run.", ""]
        ref = {(r["strategy"], r["seed"], r["round"]): r["mean_dice"] for r in rs if r["rule"] == "random"}
        body = []
        for (strategy, rule, rnd) in sorted({(r["strategy"], r["rule"], r["round"]) for r in rs},
                                            key=lambda k: (k[0], RULES.index(k[1]) if k[1] in RULES else 99, k[2])):
            cell = [r for r in rs if (r["strategy"], r["rule"], r["round"]) == (strategy, rule, rnd)]
            d = [r["mean_dice"] for r in cell]
            diff = [r["mean_dice"] - ref[(strategy, r["seed"], rnd)] for r in cell
                    if (strategy, r["seed"], rnd) in ref] if rule != "random" and rnd > 1 else []
            body.append([strategy, rule, cell[0]["labelled"], len(cell), mean_sd(d) or f"{d[0]:.4f}",
                         f"{statistics.mean(diff):+.4f} ({len(diff)})" if diff else "",
                         f"{statistics.mean(r['train_seconds'] for r in cell):.0f}"])
        parts += [md_table(["strategy", "rule", "labelled patients", "seeds", "test Dice", "− random (paired n)",
                            "train s"], body), ""]
        parts += [_reading(rs), ""]
    return "\n".join(parts) + "\n"


def _reading(rows: list[dict]) -> str:
    """Per strategy and round after the first: which rules reach the random mean, and which clear its seed band
    (mean + 1 s.d. over the seeds that rule ran)."""
    out = []
    for strategy in sorted({r["strategy"] for r in rows}):
        for rnd in sorted({r["round"] for r in rows if r["strategy"] == strategy and r["round"] > 1}):
            cell = lambda rule: {r["seed"]: r["mean_dice"] for r in rows
                                 if (r["strategy"], r["rule"], r["round"]) == (strategy, rule, rnd)}
            ref = cell("random")
            verdicts = []
            for rule in [r for r in RULES if r != "random"]:
                mine = cell(rule)
                seeds = sorted(set(mine) & set(ref))
                if len(seeds) < 2:
                    continue
                base = [ref[k] for k in seeds]
                band = statistics.mean(base) + statistics.stdev(base)
                m = statistics.mean(mine[k] for k in seeds)
                where = ("above the band" if m > band else "at or above the mean" if m >= statistics.mean(base)
                         else "below the mean")
                verdicts.append(f"{rule} {where} ({m:.3f})")
            if verdicts:
                n = next(r["labelled"] for r in rows if r["strategy"] == strategy and r["round"] == rnd)
                out.append(f"{strategy}, {n} patients: random {mean_sd([ref[k] for k in sorted(ref)], '.3f')}; "
                           + ", ".join(verdicts) + ".")
    return "Against random's seed band (mean + 1 s.d., same seeds): " + " ".join(out) if out else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="300 steps a stage at 96², batch 8 (default: supervised)")
    ap.add_argument("--strategies", nargs="*", help="default: supervised bcp (short: supervised)")
    ap.add_argument("--rules", nargs="*", default=list(RULES))
    ap.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    ap.add_argument("--rounds", nargs="*", type=int, default=list(ROUNDS))
    args = ap.parse_args()
    strategies = args.strategies or (["supervised"] if args.short else ["supervised", "bcp"])
    rules = ["random"] + [r for r in args.rules if r != "random"]  # the reference first
    for strategy in strategies:
        for seed in args.seeds:  # seeds outer: an interrupted run leaves whole pairs
            for rule in rules:
                rows = run_line(strategy, rule, seed, args.rounds, args.short)
                for r in rows:
                    print(json.dumps(r), flush=True)
                merge_rows(RESULTS, rows, key=_key, sort=lambda r: (r["protocol"], r["strategy"],
                                                                      RULES.index(r["rule"]), r["seed"], r["round"]))
    print(section(load_results()))


if __name__ == "__main__":
    main()
