"""The parts the benchmark scripts share: the row runner, row I/O, paired statistics and markdown tables.

Every benchmark script imports this module and no other benchmark script (``from common import ...``). Run them as
``python benchmarks/<script>.py`` (from any folder): Python puts the script's folder, ``benchmarks/``, first on the
import path, so ``common`` is found without touching ``sys.path``. ``benchmarks/report.py`` alone imports the
scripts, to assemble RESULTS.md from their ``section(rows)``.

A script's rows live in ``benchmarks/results/<name>.json``; its ``load_results()`` reads them (JSON only: no
dataset, no torch) and its ``section(rows)`` formats every measured number of its RESULTS.md section from them.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RUNS_DIR = HERE / "runs"
#: the seed of rows that do not name one (rows written before seeds were recorded)
DEFAULT_SEED = 1337


# ---------------------------------------------------------------------------------------------------- row runner
def run_recipe_process(recipe: dict, out: Path) -> dict:
    """Run ``recipe`` into ``out`` in a single-thread subprocess (resumable: an interrupted run continues); the
    recipe is kept beside it as ``<out>.json``. Returns its metrics.json."""
    out = Path(out)
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


def resolved_precision(trainer: dict) -> str:
    """The precision a recipe's ``trainer`` section trains at on this host (``auto`` resolved as the runner does)."""
    from label_efficient.precision import resolve_precision

    return resolve_precision(trainer.get("precision", "auto"), trainer.get("accelerator", "auto"))


def summarise(m: dict) -> dict:
    """The fields every row keeps from a run's metrics.json: the test scores of the selected checkpoint
    (``mean_dice``, ``hd95``, per class) and, for runs that scored it (``last_checkpoint``), those of the last
    stage's ``last.ckpt`` (``last_mean_dice``, ``last_hd95``; ``selected_checkpoint`` names the other)."""
    row = {"mean_dice": round(m["mean_dice"], 4), "hd95": round(m["mean_hd95"], 2),
           "per_class_dice": {k: round(v, 4) for k, v in m["per_class"]["dice"].items()}}
    last = m.get("last_checkpoint")
    if last and last.get("mean_dice") is not None:
        row.update({"selected_checkpoint": last.get("selected"), "last_mean_dice": round(last["mean_dice"], 4),
                    "last_hd95": None if last.get("mean_hd95") is None else round(last["mean_hd95"], 2)})
    return row


def row_provenance(m: dict) -> dict:
    """A row's copy of a run's ``provenance`` (metrics.json), flattened: precision actually used, device (CUDA
    name or ``cpu``), CPU model and speed flags present, threads, library versions, commit, wall time and peak
    memory of the process that wrote the results; ``{}`` for runs made before metrics.json recorded it."""
    p = m.get("provenance")
    if not p:
        return {}
    dev, cpu, v = p.get("device") or {}, p.get("cpu") or {}, p.get("versions") or {}
    return {"precision": p.get("precision"), "precision_requested": p.get("precision_requested"),
            "device": dev.get("name") or dev.get("type"), "cpu_model": cpu.get("model"),
            "cpu_flags": sorted(f for f, on in (cpu.get("flags") or {}).items() if on), "threads": cpu.get("threads"),
            "torch": v.get("torch"), "monai": v.get("monai"), "lightning": v.get("lightning"),
            "git_commit": p.get("git_commit"), "git_dirty": p.get("git_dirty"), "wall_seconds": p.get("wall_seconds"),
            "peak_rss_mb": p.get("peak_rss_mb"), "peak_cuda_mb": p.get("peak_cuda_allocated_mb")}


def run_row(row: str, runs: Path, build: Callable[[str, str], dict], protocol: dict) -> dict:
    """Run one ``strategy:budget[:seed[:steps]]`` row (``build(strategy, budget)`` gives its recipe) in a
    single-thread subprocess (resumable) and summarise it; ``protocol`` is recorded with the row (less its
    ``trainer``) and gives the default seed.

    ``steps`` replaces the step count of a single-stage row (a longer schedule for the same comparison)."""
    strategy, labeled, *rest = row.split(":")
    base_seed = protocol["seed"]
    seed = int(rest[0]) if rest else base_seed
    r = build(strategy, labeled)
    tag = f"{strategy}_{labeled}" + (f"_s{seed}" if seed != base_seed else "")
    if len(rest) > 1:
        if len(r["stages"]) != 1:
            raise ValueError(f"row {row}: a step count can only replace that of a single-stage row")
        r["stages"][0]["steps"] = int(rest[1])
        tag += f"_t{rest[1]}"
    m = run_recipe_process({**r, "seed": seed}, runs / tag)
    prov = row_provenance(m)
    return {"strategy": strategy, "labeled": labeled, "seed": seed, "schedule": "longer" if len(rest) > 1 else "protocol",
            "run_folder": tag,
            **summarise(m), "steps": sum(s["steps"] for s in m["stages"]), "train_seconds": round(m["train_seconds"], 1),
            "peak_rss_mb": round(m["peak_rss_mb"], 1), "threads": 1,
            "precision": prov.get("precision") or resolved_precision(r.get("trainer", {})),
            "protocol": {k: v for k, v in protocol.items() if k != "trainer"}, "provenance": prov}


def run_rows(rows: Iterable[str], jobs: int, run: Callable[[str], dict], save: Callable[[dict], object]) -> None:
    """``run`` each row, ``jobs`` at a time (threads driving single-thread subprocesses); each finished row is
    printed and saved at once, in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        for row in pool.map(run, rows):
            print(json.dumps(row), flush=True)
            save(row)


def rebuild_report() -> None:
    """Rewrite RESULTS.md from the rows (``benchmarks/report.py`` in its own process: scripts never import it)."""
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


# ---------------------------------------------------------------------------------------------------- row I/O
def load_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def load_rows(path: Path) -> list:
    """The rows of a results file (``[]`` when it does not exist yet)."""
    return load_json(path, [])


def write_json(path: Path, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (a temporary file in the same folder, then a rename): a killed run leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def merge_rows(path: Path, new: list[dict], key: Callable[[dict], object], sort: Callable[[dict], object] | None = None,
               indent: int = 2) -> list[dict]:
    """Replace the rows of ``path`` that share a ``key`` with ``new`` ones (others kept, new ones appended),
    optionally ``sort`` them, write the file atomically and return its rows."""
    rows = {key(r): r for r in load_rows(path)}
    rows.update({key(r): r for r in new})
    out = list(rows.values())
    if sort is not None:
        out.sort(key=sort)
    write_json(path, out, indent)
    return out


def row_seed(r: dict) -> int:
    return r.get("seed", DEFAULT_SEED)


def on_protocol(r: dict, seed: int = DEFAULT_SEED) -> bool:
    """A row of a script's pinned protocol itself: its seed and its step schedule."""
    return row_seed(r) == seed and r.get("schedule", "protocol") == "protocol"


#: the order of strategies in the tables of ``run_row`` rows
STRATEGY_ORDER = ["supervised", "mean_teacher", "mean_teacher_strong", "mean_teacher_sepbn", "supervised_sgd",
                  "mean_teacher_sgd", "bcp", "dsaif"]


def save_rows(new: list[dict], path: Path) -> list[dict]:
    """Merge ``run_row``-shaped rows into ``path``, keyed by strategy, budget, seed and steps."""
    return merge_rows(path, new, key=lambda r: (r["strategy"], r["labeled"], row_seed(r), r["steps"]),
                      sort=lambda r: (STRATEGY_ORDER.index(r["strategy"]) if r["strategy"] in STRATEGY_ORDER else 99,
                                      r["labeled"], row_seed(r)))


# ---------------------------------------------------------------------------------------------------- statistics
def mean_sd(xs: list[float], fmt: str = ".4f") -> str:
    """``mean ± sample s.d.`` of two or more values ('' for fewer); a ``+`` in ``fmt`` signs the mean only."""
    if len(xs) < 2:
        return ""
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt.lstrip('+')}}"


def value_cell(x: float | None, fmt: str) -> str:
    """A table cell of one stored number, "—" when the row has none."""
    return "—" if x is None else f"{x:{fmt}}"


def summary_cell(rows: list[dict], key: str, fmt: str) -> str:
    """``mean ± s.d.`` of ``key`` over the rows that have it; the single value for one row, "—" for none."""
    xs = [r[key] for r in rows if r.get(key) is not None]
    return mean_sd(xs, fmt) or (f"{xs[0]:{fmt}}" if xs else "—")


def paired_differences(rows: list[dict], baseline: dict, key: Callable[[dict], object], value: str = "mean_dice") -> list[float]:
    """``row[value] − baseline[key(row)]`` for each row whose pair exists in ``baseline`` (same seed, labels, ...)."""
    return [r[value] - baseline[key(r)] for r in rows if key(r) in baseline]


def gap_closed(value: float, floor: float, ceiling: float) -> float:
    """The share of the gap from ``floor`` to ``ceiling`` that ``value`` closes (gap closed, drop recovered)."""
    return (value - floor) / (ceiling - floor)


def with_recovered(rows: list[dict], group: Callable[[dict], object], references: Iterable[str]) -> list[dict]:
    """Set ``recovered`` = (adapted − source-only) / (oracle − source-only) within each ``group`` (direction or
    scanner, and seed); ``None`` for the reference rows and where the oracle does not beat source-only (no drop)."""
    by = {(group(r), r["method"]): r["mean_dice"] for r in rows}
    for r in rows:
        so, orc = by.get((group(r), "source_only")), by.get((group(r), "oracle"))
        ok = r["method"] not in references and so is not None and orc is not None and orc > so
        r["recovered"] = round(gap_closed(r["mean_dice"], so, orc), 4) if ok else None
    return rows


def exact(x: float | Decimal) -> Decimal:
    """A row's stored number as the decimal it was written as (rows keep 2–4 decimals)."""
    return x if isinstance(x, Decimal) else Decimal(repr(x))


def exact_mean(xs: Iterable[float]) -> Decimal:
    """The mean of stored numbers in decimal arithmetic (no binary round-off before ``rounded``)."""
    xs = [exact(x) for x in xs]
    return sum(xs) / len(xs)


def rounded(x: float | Decimal, digits: int, sign: bool = False) -> str:
    """``x`` to ``digits`` decimals, halves rounded up as by hand (0.0305 → 0.031, 172.45 → 172.5, where float
    formatting gives 0.030 and 172.4); ``sign`` writes a + on positive numbers."""
    q = exact(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{q:+f}" if sign else f"{q:f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def minus(x: float, fmt: str = ".2f") -> str:
    """A signed number with a typographic minus (prose)."""
    return f"{x:+{fmt}}".replace("-", "−")


def span(xs: Iterable[float], fmt: str) -> str:
    """``lo–hi`` of the formatted values (one value when they format alike)."""
    lo, hi = f"{min(xs):{fmt}}", f"{max(xs):{fmt}}"
    return lo if lo == hi else f"{lo}–{hi}"


def mask_dice_hausdorff(pred, truth) -> tuple[float, float]:
    """Dice and the symmetric Hausdorff distance (pixels) of two boolean maps; the image diagonal when either is
    empty, Dice 1 when both are."""
    import numpy as np
    from scipy.spatial.distance import directed_hausdorff

    inter, total = (pred & truth).sum(), pred.sum() + truth.sum()
    dice = 2 * inter / total if total else 1.0
    if not pred.any() or not truth.any():
        return dice, float(np.hypot(*pred.shape))
    a, b = np.argwhere(pred), np.argwhere(truth)
    return dice, max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])


# ---------------------------------------------------------------------------------------------------- tables
def md_table(header: list[str], rows: Iterable[list]) -> str:
    """A markdown table: ``header`` cells, then one line per row of cells (formatted by the caller)."""
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    return "\n".join(lines)


def train_seconds(r: dict) -> str:
    """Training wall time; rows resumed before the runner kept time across resumes have none."""
    return f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "n/a (resumed)"


#: the precision cell of a row made before rows recorded it ("not recorded")
NOT_RECORDED = "n/r"


def precision_cell(r: dict) -> str:
    """The row's precision; † where ``benchmarks/infer_precision.py`` inferred it from the row's commit date."""
    p = r.get("precision") or NOT_RECORDED
    return f"{p}†" if str(r.get("precision_from", "")).startswith("inferred") else p


def result_table(rows: list[dict], ceiling: float | None = None, baselines: dict[str, str | None] | None = None,
                 mm_per_voxel: float | None = None) -> str:
    """Markdown table of ``run_row`` rows; class columns come from the rows' ``per_class_dice``. Every table has a
    precision column (``n/r`` for rows made before it was recorded), so no table mixes precisions silently, and a
    "last-ckpt Dice" column (the last stage's ``last.ckpt`` on test, beside the selected checkpoint's mean Dice)
    where any row scored it, and the published ACDC test's Dice and HD95 (``ssl4mis_*``) where any row has them. Gap
    closed is measured against the row's baseline (``baselines[strategy]``, default
    ``supervised``; ``None``: no gap) with the same labels, seed and steps, up to ``ceiling`` (default: the rows'
    supervised-all Dice). ``mm_per_voxel`` (isotropic data) adds HD95 in mm: the voxel value times the spacing."""
    baselines = baselines or {}
    dice = {(r["strategy"], r["labeled"], row_seed(r), r["steps"]): r["mean_dice"] for r in rows}
    if ceiling is None:
        ceiling = next((r["mean_dice"] for r in rows if r["strategy"] == "supervised" and r["labeled"] == "all"), None)
    classes = list(dict.fromkeys(c for r in rows for c in r.get("per_class_dice", {})))
    last = any("last_mean_dice" in r for r in rows)
    ssl4mis = any("ssl4mis_mean_dice" in r for r in rows)
    header = ["strategy", "labelled", "seed", "mean Dice", *classes, "HD95 (px)",
              *(["HD95 (mm)"] if mm_per_voxel else []), "gap closed", "steps", "train s",
              "peak RSS MB"] + (["last-ckpt Dice"] if last else []) \
        + (["ssl4mis Dice", "ssl4mis HD95"] if ssl4mis else []) + ["precision"]
    out = []
    for r in rows:
        baseline = baselines.get(r["strategy"], "supervised")
        gap, base = "", dice.get((baseline, r["labeled"], row_seed(r), r["steps"]))
        if r["strategy"] != baseline and base is not None and ceiling is not None:
            gap = pct(gap_closed(r["mean_dice"], base, ceiling))
        pc = [f"{r.get('per_class_dice', {}).get(c, float('nan')):.3f}" for c in classes]
        out.append([r["strategy"], r["labeled"], row_seed(r), f"{r['mean_dice']:.4f}", *pc, f"{r['hd95']:.2f}",
                    *([f"{r['hd95'] * mm_per_voxel:.2f}"] if mm_per_voxel else []), gap,
                    r["steps"], train_seconds(r), f"{r['peak_rss_mb']:.0f}"]
                   + ([f"{r['last_mean_dice']:.4f}" if "last_mean_dice" in r else NOT_RECORDED] if last else [])
                   + ([f"{r['ssl4mis_mean_dice']:.4f}", f"{r['ssl4mis_hd95']:.2f}"] if "ssl4mis_mean_dice" in r
                      else [NOT_RECORDED] * 2 if ssl4mis else [])
                   + [precision_cell(r)])
    return md_table(header, out)


def seed_table(rows: list[dict], baseline: str = "supervised") -> str:
    """Mean ± sample s.d. over the seeds run for each (strategy, budget, steps) with several seeds, and the paired
    difference to ``baseline`` on the same seeds and steps (same initialisation, batch order and augmentation);
    '' when no group has two seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["labeled"], r["steps"]), []).append(r)
    base = {(r["labeled"], r["steps"], row_seed(r)): r["mean_dice"] for r in rows if r["strategy"] == baseline}
    out = []
    for (strategy, labeled, steps), rs in groups.items():
        if len(rs) < 2:
            continue
        d, h = [r["mean_dice"] for r in rs], [r["hd95"] for r in rs]
        diff = paired_differences(rs, base, lambda r: (labeled, steps, row_seed(r)))
        out.append([strategy, labeled, steps, ", ".join(str(row_seed(r)) for r in rs), mean_sd(d),
                    ", ".join(f"{x:.4f}" for x in d), mean_sd(h, ".2f"),
                    mean_sd(diff, "+.4f") if strategy != baseline else "",
                    ", ".join(precision_cell(r) for r in rs)])
    header = ["strategy", "labelled", "steps", "seeds", "mean Dice (mean ± s.d.)", "per seed", "HD95 (mean ± s.d.)",
              f"− {baseline}, same seeds (mean ± s.d.)", "precision per seed"]
    return md_table(header, out) if out else ""


# ---------------------------------------------------------------------------------------------------- shared recipes
#: Recipes that two scripts train identically (the same run folder serves both).

#: the polyp source/oracle protocol of ``sfda_polyp.py``, whose source models ``ood_polyp.py`` scores
POLYP_PROTOCOL = {
    "seed": 1337,
    "image_size": [128, 128],
    "backbone": {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128, 256], "num_res_units": 0}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 50},
    "source_steps": 3000,
    "adapt_steps": 300,
    "batch": 8,
    "train_opt": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"},
    "bn_opt": {"name": "adam", "lr": 0.0001, "weight_decay": 0.0, "schedule": "constant"},
    "upl_opt": {"name": "adam", "lr": 0.00001, "weight_decay": 0.0, "schedule": "constant"},
}
POLYP_SHORT = {"kvasir": "kvasir", "cvc_clinicdb": "cvc"}


def polyp_recipe(name: str, domain: str, stages: list[dict], seed: int | None = None) -> dict:
    p = POLYP_PROTOCOL
    return {"name": name, "seed": p["seed"] if seed is None else seed, "backbone": p["backbone"], "trainer": p["trainer"],
            "data": {"dataset": "polyp_kvasir_cvc", "domain": domain, "image_size": p["image_size"],
                     "budget": {"all": True}},
            "evaluation": {"metrics": ["dice", "hd95"], "overlays": 2}, "stages": stages}


def polyp_supervised_stage(steps: int) -> dict:
    p = POLYP_PROTOCOL
    return {"strategy": "supervised", "steps": steps, "val_every": 250, "batch_size": {"labeled": p["batch"]},
            "optimizer": p["train_opt"]}


#: SDC-UDA's CPU schedule on ACDC (``sdc_uda.py``; ``sfda_shift.py`` runs it on its own scanners and backbone)
SDC_UDA_STEPS = {"translate": 1000, "teacher": 1500, "self_train": 1000}
SDC_UDA_RECIPE = ROOT / "recipes" / "acdc_sdc_uda.yaml"


def sdc_uda_recipe() -> dict:
    """``recipes/acdc_sdc_uda.yaml`` at the CPU schedule ``SDC_UDA_STEPS``."""
    import yaml

    r = yaml.safe_load(SDC_UDA_RECIPE.read_text())
    for st, steps in zip(r["stages"], SDC_UDA_STEPS.values()):
        st["steps"] = steps
    r["trainer"] = {"precision": "auto", "progress_bar": False, "log_every": 50}
    r["evaluation"] = {"metrics": ["dice", "hd95"], "overlays": 2}
    return r


# ---------------------------------------------------------------------------------------------------- official code
#: ``_cpu_standins.py``, written beside an official code by :func:`apply_edits`: tensorboardX's SummaryWriter that
#: logs nothing, torchvision's ``transforms.Compose`` (torchvision does not install beside the CPU torch) and a
#: ``make_grid`` that refuses (the parity edits switch the image logging off)
CPU_STANDINS = '''"""CPU stand-ins (parity benchmark): tensorboardX's SummaryWriter logs nothing; torchvision's Compose."""


class SummaryWriter:
    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def add_image(self, *args, **kwargs):
        pass

    def close(self):
        pass


class transforms:
    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, sample):
            for step in self.steps:
                sample = step(sample)
            return sample


def make_grid(*args, **kwargs):
    raise NotImplementedError("torchvision.utils.make_grid is not available in the CPU parity run")
'''


def edit_list(rows: Iterable[tuple[str, str, str, str]]) -> list[dict]:
    """Edits of an official code as dicts: (file, old, new, why) each."""
    return [{"file": f, "old": old, "new": new, "why": why} for f, old, new, why in rows]


def apply_edits(code: Path, todo: list[dict], original: dict[str, str] | None = None) -> list[dict]:
    """Apply ``todo`` (from :func:`edit_list`) to the official code in ``code``, in order: each ``old`` must occur
    exactly once in the file as it stands and, when ``original`` gives the shipped texts, once in the shipped file
    too; then write :data:`CPU_STANDINS` as ``_cpu_standins.py``."""
    for e in todo:
        path = code / e["file"]
        text = path.read_text()
        n = text.count(e["old"])
        n0 = original[e["file"]].count(e["old"]) if original else 1
        if n != 1 or n0 != 1:
            raise SystemExit(f"edit of {e['file']} matches {n} times (shipped file: {n0}), not once: {e['old']!r}")
        path.write_text(text.replace(e["old"], e["new"]))
    (code / "_cpu_standins.py").write_text(CPU_STANDINS)
    return todo


def print_edits(todo: list[dict]) -> None:
    for i, e in enumerate(todo, 1):
        print(f"{i:2d}. {e['file']}: {e['old']!r}\n    -> {e['new']!r}\n    ({e['why']})")


def git_show(repo: Path, commit: str, path: str) -> str:
    """The text of ``path`` at ``commit`` in the git directory ``repo`` (an official code's shipped file)."""
    return subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_archive(repo: Path, commit: str, folder: str, into: Path) -> None:
    """Extract ``folder`` of ``repo`` at ``commit`` under ``into`` (``into/folder``, replaced if it exists)."""
    import shutil

    if (into / folder).exists():
        shutil.rmtree(into / folder)
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, folder], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
