"""Label-budget sweep: recipes × budgets × seeds, one table, a learning curve, and the labels each strategy saves.

    label-efficient sweep recipes/acdc_supervised.yaml recipes/acdc_bcp.yaml --budgets 1,3,7,all --seeds 3
    label-efficient sweep recipes/acdc_supervised.yaml --strategies supervised,mean_teacher --budgets 3,7

With ``--select RULE[,RULE…] --rounds 1,3,7`` (:func:`run_rounds`) the budgets are active-learning rounds instead: a
random seeded start, then each round's next groups chosen by the rule with the model the round trained.

Each cell is a full run of its recipe (all stages, selection on val, one test evaluation) with ``data.budget`` set to
``count: n`` patients (``all``, or a budget flag of the dataset) and ``seed`` set; a cell whose ``metrics.json``
exists is skipped, an interrupted cell resumes. Output: ``sweep.csv`` (one row per cell), ``sweep.md`` (mean ± s.d.
per line and budget, and the labels saved), ``learning_curve.png``. *Labels saved* at a budget: how many labelled
patients the first line (the baseline, normally ``supervised``) needs to reach that line's mean Dice, interpolated
linearly between the baseline's budgets, minus the budget itself.
"""
from __future__ import annotations

import csv
import io
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data.budget import LabelBudget
from .recipe import Recipe
from .utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    line: str  #: the curve it belongs to (a recipe's name or a strategy)
    budget: str  #: "3", "all" or a budget flag
    seed: int
    recipe: Recipe

    @property
    def folder(self) -> str:
        return f"{self.line}/budget_{self.budget}/seed_{self.seed}"


def budget_of(token: str) -> LabelBudget:
    if token == "all":
        return LabelBudget(all=True)
    return LabelBudget(count=int(token)) if token.isdigit() else LabelBudget(flag=token)


def with_strategy(recipe: Recipe, strategy: str) -> Recipe:
    """A single-stage recipe with its strategy replaced (the stage's own config is dropped)."""
    if len(recipe.stages) != 1:
        raise ValueError(f"--strategies replaces the strategy of a single-stage recipe; '{recipe.name}' has "
                         f"{len(recipe.stages)} stages: pass one recipe per strategy instead")
    raw = recipe.model_dump(mode="json")
    raw["stages"][0] = {**raw["stages"][0], "strategy": strategy, "config": {}}
    return Recipe.model_validate(raw)


def grid(recipes: Sequence[Recipe], budgets: Sequence[str], seeds: int, strategies: Sequence[str] = ()) -> list[Cell]:
    lines = [(s, with_strategy(recipes[0], s)) for s in strategies] if strategies else [(r.name, r) for r in recipes]
    if len({name for name, _ in lines}) != len(lines):
        raise ValueError(f"two sweep lines share a name: {[n for n, _ in lines]}; give the recipes distinct names")
    cells = []
    for name, r in lines:
        for b in budgets:
            for k in range(seeds):
                raw = r.model_dump(mode="json")
                raw["seed"] = r.seed + k
                raw["data"]["budget"] = budget_of(b).model_dump(exclude_defaults=True) or {"all": True}
                cells.append(Cell(name, b, r.seed + k, Recipe.model_validate(raw)))
    return cells


def run_sweep(cells: Sequence[Cell], out: str | Path) -> list[dict]:
    """Run every cell not finished yet (resumable), then write the table, the curve and the labels saved."""
    import json

    from .runner import DataContext, run_recipe

    out = Path(out)
    rows, t0, ran = [], time.perf_counter(), 0
    for k, cell in enumerate(cells):
        folder = out / cell.folder
        reason = _infeasible(cell)
        if reason:
            log.warning("sweep: cell %s skipped: %s", cell.folder, reason)
            continue
        if not (folder / "metrics.json").is_file():
            run_recipe(cell.recipe, folder, resume=True)
            ran += 1
            per = (time.perf_counter() - t0) / ran
            log.info("sweep: cell %d/%d done (%s); ~%.0f s per cell, ~%.0f s left", k + 1, len(cells), cell.folder,
                     per, per * (len(cells) - k - 1))
        m = json.loads((folder / "metrics.json").read_text())
        ctx = DataContext.build(cell.recipe.stage_data(len(cell.recipe.stages) - 1), cell.recipe.seed)
        rows.append({"line": cell.line, "budget": cell.budget, "labelled": len({c.group for c in ctx.labeled}),
                     "seed": cell.seed, "mean_dice": m["mean_dice"], "mean_hd95": m.get("mean_hd95"),
                     "train_seconds": m.get("train_seconds")})
    write_outputs(rows, out)
    return rows


def round_budgets(tokens: Sequence[str]) -> list[int]:
    """``--rounds 1,3,7``: increasing labelled-group counts, the first at least 1."""
    try:
        rounds = [int(t) for t in tokens]
    except ValueError:
        raise ValueError(f"--rounds takes increasing counts of labelled groups, e.g. 1,3,7; got {list(tokens)}") from None
    if not rounds or rounds[0] < 1 or any(b <= a for a, b in zip(rounds, rounds[1:])):
        raise ValueError(f"--rounds takes increasing counts of labelled groups, the first ≥ 1, e.g. 1,3,7; got {rounds}")
    return rounds


def run_rounds(recipes: Sequence[Recipe], rules: Sequence[str], rounds: Sequence[int], seeds: int,
               out: str | Path, **suggest_options) -> list[dict]:
    """Active-learning rounds: one line per recipe × selection rule (``label-efficient suggest``'s rules).

    For each line and seed s (the recipe's seed + k): round 1 labels ``rounds[0]`` groups drawn at random with seed
    s (the same groups for every rule at that seed, so the rules compare paired); each later round trains, then asks
    the rule for ``rounds[i] - rounds[i-1]`` more groups with the model just trained (``suggest``, seed s), and
    retrains from scratch on all of them (``data.budget.ids``). Cells live in ``<line>/budget_<n>/seed_<s>/`` as in
    :func:`run_sweep` (round 1, the same run for every rule, once in ``start_<recipe>/``), each round's suggestion
    for the next in ``<line>/budget_<n>/seed_<s>_next.csv``; finished cells and suggestions are reused
    (resumable). Output: the same ``sweep.csv`` / ``sweep.md`` / ``learning_curve.png`` with
    one line per rule (the first rule is the baseline of *labels saved*; put ``random`` first)."""
    import json

    from .data.budget import read_ids_file
    from .runner import run_recipe
    from .suggest import RULES, suggest, write_csv

    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown selection rule(s) {unknown}; rules: {', '.join(RULES)}")
    out, rows, t0, ran = Path(out), [], time.perf_counter(), 0
    lines = [((r.name + "-" if len(recipes) > 1 else "") + rule, r, rule) for r in recipes for rule in rules]
    if len({n for n, _, _ in lines}) != len(lines):
        raise ValueError(f"two sweep lines share a name: {[n for n, _, _ in lines]}; give the recipes distinct names")
    total = len(lines) * seeds * len(rounds)
    for name, recipe, rule in lines:
        for k in range(seeds):
            seed, ids = recipe.seed + k, None
            for i, n in enumerate(rounds):
                raw = recipe.model_dump(mode="json")
                raw["seed"] = seed
                raw["data"]["budget"] = {"count": n, "seed": seed} if ids is None else {"ids": sorted(ids)}
                cell = Recipe.model_validate(raw)
                # round 1 is the same run for every rule: trained once, in start_<recipe>/
                folder = out / (f"start_{recipe.name}" if i == 0 else name) / f"budget_{n}" / f"seed_{seed}"
                if not (folder / "metrics.json").is_file():
                    run_recipe(cell, folder, resume=True)
                    ran += 1
                    per = (time.perf_counter() - t0) / ran
                    log.info("rounds: %s done; ~%.0f s per cell", folder.relative_to(out), per)
                m = json.loads((folder / "metrics.json").read_text())
                rows.append({"line": name, "budget": str(n), "labelled": n, "seed": seed, "rule": rule,
                             "mean_dice": m["mean_dice"], "mean_hd95": m.get("mean_hd95"),
                             "train_seconds": m.get("train_seconds")})
                if i + 1 < len(rounds):
                    nxt = out / name / f"budget_{n}" / f"seed_{seed}_next.csv"
                    if not nxt.is_file():
                        res = suggest(cell, rounds[i + 1] - n, rule, folder / "model.pt", seed=seed, **suggest_options)
                        write_csv(res, nxt, force=True)
                        log.info("rounds: %s suggested %s (%.0f s)", rule, [s.id for s in res.suggestions],
                                 res.seconds)
                    ids = read_ids_file(nxt)
                    if len(set(ids)) != rounds[i + 1]:
                        raise ValueError(f"{nxt} lists {len(set(ids))} groups, round {i + 2} needs {rounds[i + 1]}")
    log.info("rounds: %d cells (%d run now)", total, ran)
    write_outputs(rows, out)
    return rows


def _infeasible(cell: Cell) -> str | None:
    """Why a cell cannot run, e.g. a semi-supervised line at budget ``all`` leaves no unlabelled image; else None."""
    from .context import DataContext
    from .planning import uses_budget_pool

    for i, stage in enumerate(cell.recipe.stages):
        if uses_budget_pool(stage.strategy):
            if not DataContext.build(cell.recipe.stage_data(i), cell.recipe.seed).unlabeled:
                return f"strategy '{stage.strategy}' needs unlabelled data and budget {cell.budget} leaves none"
    return None


def _curve(rows: list[dict], line: str) -> list[tuple[int, float, float, str]]:
    """(labelled patients, mean Dice, s.d., budget) per budget of ``line``, by patients."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["line"] == line:
            by.setdefault(r["budget"], []).append(r)
    pts = [(rs[0]["labelled"], statistics.mean(r["mean_dice"] for r in rs),
            statistics.stdev([r["mean_dice"] for r in rs]) if len(rs) > 1 else 0.0, b) for b, rs in by.items()]
    return sorted(pts)


def labels_needed(baseline: list[tuple[int, float, float, str]], dice: float) -> float | None:
    """Labelled patients the baseline needs for ``dice`` (linear between its budgets); None beyond its best."""
    for (n0, d0, *_), (n1, d1, *_) in zip(baseline, baseline[1:]):
        if d0 >= dice:
            return float(n0)
        if d0 < dice <= d1:
            return n0 + (dice - d0) / (d1 - d0) * (n1 - n0)
    return float(baseline[0][0]) if baseline and baseline[0][1] >= dice else None


def write_outputs(rows: list[dict], out: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    lines = list(dict.fromkeys(r["line"] for r in rows))
    base = _curve(rows, lines[0])
    md = [f"| line | budget | labelled patients | seeds | mean Dice (± s.d.) | labels saved vs {lines[0]} |",
          "|---|---|---|---|---|---|"]
    for line in lines:
        for n, mean, sd, b in _curve(rows, line):
            seeds = sum(1 for r in rows if r["line"] == line and r["budget"] == b)
            need = labels_needed(base, mean) if line != lines[0] else None
            saved = "" if line == lines[0] else (f"> {base[-1][0] - n}" if need is None else f"{need - n:+.1f}")
            md.append(f"| {line} | {b} | {n} | {seeds} | {mean:.4f} ± {sd:.4f} | {saved} |")
    atomic_write_text(out / "sweep.md", "\n".join(md) + "\n")
    _plot(rows, lines, out / "learning_curve.png")


def _plot(rows: list[dict], lines: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for line in lines:
        pts = _curve(rows, line)
        n = [p[0] for p in pts]
        mean, sd = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(n, mean, marker="o", label=line)
        ax.fill_between(n, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled patients")
    ax.set_ylabel("test mean Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
