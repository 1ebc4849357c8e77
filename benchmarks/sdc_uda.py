"""SDC-UDA on a SIMULATED modality shift of ACDC: rows to results/sdc_uda.json.

    python benchmarks/sdc_uda.py [--seeds 1337 1338] [--rows source_only sdc_uda oracle]
    python benchmarks/sdc_uda.py --table-only

The shift is simulated (dataset ``simulated_shift``, ``label_efficient/data/shift.py``): half of the patients of
every ACDC split (seed 0) form the "target scanner" (gamma 0.6, contrast inversion, per-volume linear bias field ±30 %,
Gaussian blur σ = 1 px at 64²); the other half is the labelled source. All rows are tested on the 20 target test
volumes (Dice, HD95 per class, mean over RV/MYO/LV), with the same 2D U-Net and a fixed step count (no row selects a
model on target labels, except that the oracle is trained on them):

* ``source_only``: supervised on the labelled source, applied to the target;
* ``sdc_uda``: translation (2.5D generator, intra- + inter-slice attention) → teacher on the translated source →
  self-training rounds on refined target pseudo labels (``recipes/acdc_sdc_uda.yaml``, schedules below);
* ``oracle``: supervised on the labelled *target* train split (upper bound).

CPU-sized: 64², generator 16/32 channels with 1 transformer block, ``TRANSLATE_STEPS`` GAN steps (the paper: 256², 4
blocks, 100k iterations, i.e. ~100× more); segmenters ``SEG_STEPS`` steps.

Run it as a script (it imports only ``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
from common import (RESULTS_DIR, RUNS_DIR, SDC_UDA_RECIPE, SDC_UDA_STEPS, load_rows, md_table, minus, run_recipe_process,
                    sdc_uda_recipe, summarise, write_json)

RESULTS = RESULTS_DIR / "sdc_uda.json"
RUNS = RUNS_DIR / "sdc_uda"
RECIPE = SDC_UDA_RECIPE
#: the CPU schedule (``common.SDC_UDA_STEPS``, shared with sfda_shift.py's ``sdc_uda`` rows)
TRANSLATE_STEPS, SEG_STEPS, SELF_TRAIN_STEPS = SDC_UDA_STEPS.values()


def supervised_recipe(labeled_domain: str) -> dict:
    """The SDC-UDA recipe's data, backbone and teacher optimiser, trained on one domain's labels."""
    base = sdc_uda_recipe()
    teacher = copy.deepcopy(base["stages"][1])
    teacher.pop("data"), teacher.pop("init")
    data = {**base["data"], "labeled_domain": labeled_domain}
    if labeled_domain == "target":  # the oracle: target labels, fixed step count like every other row
        data.pop("labeled_domain")
    return {**base, "data": data, "stages": [teacher]}


def ideal_pairs() -> Path:
    """The labelled source train slices rendered by the simulated target scanner itself (the ideal translation),
    written as a generated-pairs folder (``data.synthetic.path``): an upper bound for stage 1, isolating stages 2–3."""
    import dataclasses

    import numpy as np

    from label_efficient.data import CaseStore, build_dataset
    from label_efficient.data.shift import SOURCE, TARGET
    from label_efficient.data.synthetic import MANIFEST, dataset_identity
    from label_efficient.utils import atomic_save_npz, atomic_write_json

    folder = RUNS / "ideal_pairs"
    if (folder / MANIFEST).is_file():
        return folder
    data = sdc_uda_recipe()["data"]
    spec = build_dataset(data["dataset"], **data["options"])
    store, done, skipped = CaseStore(spec, data["image_size"]), [], []
    folder.mkdir(parents=True, exist_ok=True)
    for c in spec.select("train", SOURCE):
        item = store.get(c, True)
        if not item.label.any():
            skipped.append(c.id)
            continue
        ideal = spec.image_remap(item.image, dataclasses.replace(c, domain=TARGET))
        atomic_save_npz(folder / f"{c.id}.npz", {"images": ideal[None], "label": item.label.astype(np.int64)})
        done.append(c.id)
    atomic_write_json(folder / MANIFEST, {**dataset_identity(store), "strategy": "ideal_target_scanner", "variants": 1,
                                          "cases": done, "skipped_empty": skipped})
    return folder


def ideal_recipe(self_train: bool) -> dict:
    """Stages 2(–3) of SDC-UDA on the ideal translation instead of the learnt one."""
    r = sdc_uda_recipe()
    stages = r["stages"][1:3] if self_train else r["stages"][1:2]
    for st in stages:
        st["data"] = {"synthetic": {"path": str(ideal_pairs()), "ratio": 1.0}}
    return {**r, "stages": stages}


def fast_gan_recipe(lr: float = 1e-3) -> dict:
    """SDC-UDA with a 5× larger GAN learning rate (D keeps the lazy-R1 ratio 12/13): at 2e-4 the discriminators sit
    near chance for the whole 1000-step schedule (a D alone takes > 80 steps to begin separating the two scanners at
    lr 1.85e-4, ~20 at 1e-3)."""
    r = sdc_uda_recipe()
    r["stages"][0]["optimizer"]["lr"] = lr
    r["stages"][0]["optimizers"]["discriminator"]["lr"] = round(lr * 12 / 13, 7)
    return r


def no_identity_recipe() -> dict:
    """The 5× GAN learning rate without the identity loss (the spec's weight 1 pulls G_AB towards the identity, and
    the simulated scanner inverts the contrast)."""
    r = fast_gan_recipe()
    r["stages"][0]["config"]["identity_weight"] = 0.0
    return r


def _steps(r: dict, translate_steps: int) -> dict:
    r["stages"][0]["steps"] = translate_steps
    return r


ROWS = {"source_only": lambda: supervised_recipe("source"), "sdc_uda": sdc_uda_recipe, "sdc_uda_gan_lr1e-3": fast_gan_recipe,
        "sdc_uda_gan_lr1e-3_no_identity": no_identity_recipe,
        "sdc_uda_gan_lr1e-3_no_identity_3000": lambda: _steps(no_identity_recipe(), 3000),
        "oracle": lambda: supervised_recipe("target"),
        "ideal_translation_teacher": lambda: ideal_recipe(False),
        "ideal_translation_self_train": lambda: ideal_recipe(True)}
DEFAULT_ROWS = ["source_only", "sdc_uda", "oracle"]


def run(row: str, seed: int) -> dict:
    m = run_recipe_process({**ROWS[row](), "seed": seed}, RUNS / f"{row}_s{seed}")
    extra = {"translation_vs_ideal": translation_fidelity(RUNS / f"{row}_s{seed}")} if row.startswith("sdc_uda") else {}
    return {**extra, "row": row, "seed": seed, **summarise(m),
            "stages": [{"stage": s["stage"], "steps": s["steps"], "seconds": round(s["seconds"], 1)} for s in m["stages"]],
            "train_seconds": round(m["train_seconds"], 1), "test_volumes": len(m["cases"]), "threads": 1,
            "shift": "simulated (simulated_shift on acdc, seed 0)"}


def translation_fidelity(run: Path) -> dict:
    """The shift is simulated, so the ideal translation of a source slice is known: the target scanner's remap of it
    (up to its per-volume bias-field direction). Mean absolute error and correlation of the translated source slices
    (``stage0_translate/generated``) against that rendering, and the same for the untranslated slices."""
    import dataclasses

    import numpy as np

    from label_efficient.data import CaseStore, build_dataset
    from label_efficient.data.shift import TARGET

    data = sdc_uda_recipe()["data"]
    spec = build_dataset(data["dataset"], **data["options"])
    store, by_id = CaseStore(spec, data["image_size"]), {c.id: c for c in spec.cases}
    gen = run / "stage0_translate" / "generated"
    out = {"mae_translated": [], "mae_untranslated": [], "corr_translated": [], "corr_untranslated": []}
    for cid in json.loads((gen / "manifest.json").read_text())["cases"]:
        c = by_id[cid]
        src = store.get(c, False).image
        ideal = spec.image_remap(src, dataclasses.replace(c, domain=TARGET))
        with np.load(gen / f"{cid}.npz") as z:
            fake = z["images"][0]
        for tag, img in (("translated", fake), ("untranslated", src)):
            out[f"mae_{tag}"].append(float(np.abs(img - ideal).mean()))
            out[f"corr_{tag}"].append(float(np.corrcoef(img.ravel(), ideal.ravel())[0, 1]))
    return {k: round(float(np.nanmean(v)), 3) for k, v in out.items()}


#: the table's label of each row
LABELS = {"source_only": "source_only", "sdc_uda": "sdc_uda (recipe: GAN lr 2e-4, 1000 steps)",
          "sdc_uda_gan_lr1e-3": "sdc_uda, GAN lr 1e-3", "sdc_uda_gan_lr1e-3_no_identity": "sdc_uda, GAN lr 1e-3, no identity loss",
          "sdc_uda_gan_lr1e-3_no_identity_3000": "sdc_uda, GAN lr 1e-3, no identity loss, 3000 steps",
          "oracle": "oracle (target labels)", "ideal_translation_teacher": "ideal translation → teacher",
          "ideal_translation_self_train": "ideal translation → self-training"}


def table(rows: list[dict]) -> str:
    """Per row: seeds, Dice mean ± s.d. over them (population s.d.), HD95 and per-class Dice means."""
    out = []
    for name in ROWS:
        rs = [r for r in rows if r.get("row") == name]
        if not rs:
            continue
        d = np.array([r["mean_dice"] for r in rs])
        pc = {k: np.mean([r["per_class_dice"][k] for r in rs]) for k in rs[0]["per_class_dice"]}
        out.append([LABELS.get(name, name), ", ".join(str(r["seed"]) for r in rs),
                    f"{d.mean():.3f} ± {d.std():.3f}" if len(rs) > 1 else f"{d[0]:.3f}",
                    f"{np.mean([r['hd95'] for r in rs]):.1f}", *(f"{v:.3f}" for v in pc.values())])
    classes = list(next(r for r in rows if "per_class_dice" in r)["per_class_dice"])
    return md_table(["row", "seeds", "Dice", "HD95", *classes], out)


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def _reading(rows: list[dict]) -> str:
    by = lambda name: sorted((r for r in rows if r.get("row") == name), key=lambda r: r["seed"])
    corr = lambda name: " / ".join(minus(r["translation_vs_ideal"]["corr_translated"]) for r in by(name))
    untranslated = sorted({minus(r["translation_vs_ideal"]["corr_untranslated"]) for r in rows if "translation_vs_ideal" in r})
    long = by("sdc_uda_gan_lr1e-3_no_identity_3000")
    translate = lambda rs: next(s["steps"] for s in rs[0]["stages"] if s["stage"] == "translate")
    teacher, self_train = by("ideal_translation_teacher"), by("ideal_translation_self_train")
    pairs = [(t, s) for t in teacher for s in self_train if s["seed"] == t["seed"]]
    drops = [t["mean_dice"] - s["mean_dice"] for t, s in pairs]
    hd_lower = all(s["hd95"] < t["hd95"] for t, s in pairs)
    out = (f"Translation fidelity (correlation of translated source slices with the scanner's rendering of them; "
           f"untranslated: {' / '.join(untranslated)}): recipe settings {corr('sdc_uda')}, lr 1e-3 "
           f"{corr('sdc_uda_gan_lr1e-3')}, without identity loss {corr('sdc_uda_gan_lr1e-3_no_identity')}, the same "
           f"over {translate(long)} steps {corr('sdc_uda_gan_lr1e-3_no_identity_3000')}. At {translate(by('sdc_uda'))} "
           "GAN steps the translator brightens the background but never inverts the blood pool, so SDC-UDA equals "
           "source-only; the one run that starts to invert departs from the spec (5× learning rate, no identity loss, "
           f"{translate(long) // translate(by('sdc_uda'))}× steps) and has "
           f"{'one seed' if len(long) == 1 else f'{len(long)} seeds'}. Given a perfect translation, stages 2–3 reach "
           "the oracle; ")
    if drops and all(x > 0 for x in drops):
        out += f"self-training lowered Dice slightly in every pair (≤ {max(drops):.4f})"
    elif drops:
        out += "self-training changed Dice by " + " / ".join(f"{-x:+.4f}" for x in drops)
    out += (" and lowered HD95" if hd_lower else " and did not lower HD95 in every pair") + (
        ". The polyp pair (`recipes/polyp_sdc_uda.yaml`) ran end to end as a smoke test only.")
    return out


def section(rows: list[dict]) -> str:
    rs = [r for r in rows if "row" in r]
    if not rs:
        return ""
    sdc = [r for r in rs if r["row"] == "sdc_uda"]
    translate = next(s["steps"] for s in sdc[0]["stages"] if s["stage"] == "translate") if sdc else TRANSLATE_STEPS
    volumes = sorted({r["test_volumes"] for r in rs})
    return "\n".join([
        "## SDC-UDA on a simulated modality shift (ACDC)", "",
        "The shift is **simulated** (`simulated_shift`, `label_efficient/data/shift.py`): in each split a seeded half "
        "of the ACDC patients forms a \"target scanner\" (gamma 0.6, contrast inversion, per-volume linear bias field "
        "±30 %, Gaussian blur σ = 1 px, after preprocessing at 64²); the other half is the labelled source; labels are "
        f"untouched. Test: the {' / '.join(map(str, volumes))} target test volumes, Dice and HD95 (px). 2D U-Net "
        "16…128, fixed step counts (no model selection on target labels). Translation: 16/32 channels, 1 transformer "
        f"block, 4 heads, {translate} GAN steps (~{100 * translate / 100_000:.0f} % of the paper's 100k; the paper: "
        "256², 4 blocks, 8 heads). Regenerate: `OMP_NUM_THREADS=1 python benchmarks/sdc_uda.py` (rows source_only, "
        "sdc_uda, oracle, seeds 1337/1338); extra rows with `--rows <name> --seeds 1337`; rows in "
        "`results/sdc_uda.json`. `ideal_translation_*` rows run stages 2–3 on the scanner's own rendering of each "
        "source slice (a perfect translator), isolating the segmentation and self-training stages.", "",
        table(rs), "", _reading(rs), "",
        "All rows of this table predate commit ae086f5 (2026-12-01), which fixed the discriminator's R1 penalty to the "
        "official reduction (summed over the whole 3-slice slab; it had been averaged over the slices, γ/3 in effect) "
        "and added InstanceNorm after the discriminator's first convolution; they were not re-run. The simulated-shift "
        "rows of `benchmarks/sfda_shift.py` (`sdc_uda`) and the polyp seed-1338 rows were re-made after it.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = load_rows(RESULTS)
    for r in rows:  # rows written before the fidelity check existed
        if r["row"].startswith("sdc_uda") and "translation_vs_ideal" not in r:
            r["translation_vs_ideal"] = translation_fidelity(RUNS / f"{r['row']}_s{r['seed']}")
    if not args.table_only:
        for seed in args.seeds:
            for row in args.rows:
                rows = [r for r in rows if (r["row"], r["seed"]) != (row, seed)] + [run(row, seed)]
                write_json(RESULTS, rows, indent=1)
                print(f"{row} seed {seed}: Dice {rows[-1]['mean_dice']}", flush=True)
    write_json(RESULTS, rows, indent=1)
    print(table(rows))
    for r in rows:
        if "translation_vs_ideal" in r:
            print(f"{r['row']} seed {r['seed']}: translation vs the ideal target rendering {r['translation_vs_ideal']}")


if __name__ == "__main__":
    main()
