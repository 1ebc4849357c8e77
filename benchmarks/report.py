"""Assemble benchmarks/RESULTS.md from the benchmark scripts' sections, reading their stored rows only.

    python benchmarks/report.py              # rewrite benchmarks/RESULTS.md from benchmarks/results/
    python benchmarks/report.py --check      # exit 1 when RESULTS.md is not what the rows give
    python benchmarks/report.py --out FILE   # write elsewhere

Each script in ``SECTIONS`` reads its own rows (``load_results()``: JSON files under ``benchmarks/results/``) and
formats its section from them (``section(rows)``); this file only puts the sections in order under a header. It
needs neither the datasets nor torch. Run it as a script: Python puts ``benchmarks/`` on the import path, so the
scripts import as modules (they import only ``common``, never each other or this file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import acdc_contrastive
import acdc_cpu
import augpaint
import cuts
import cyclegan_pl
import la_cpu
import la_desco
import nnunet_baseline
import kvasir_native
import la_geometry
import memory_cache
import ood_polyp
import parity_cuts
import parity_desco
import parity_mean_teacher
import parity_upl_sfda
import sdc_uda
import sfda_polyp
import sfda_shift
import speed
import suggest_acdc
import sweep_quick
from common import HERE

#: the sections of RESULTS.md, in order
SECTIONS = [acdc_cpu, parity_mean_teacher, acdc_contrastive, cuts, parity_cuts, sfda_polyp, ood_polyp, sfda_shift, parity_upl_sfda, la_cpu, la_geometry, memory_cache, la_desco,
            parity_desco,
            nnunet_baseline, kvasir_native, cyclegan_pl, augpaint, sdc_uda, sweep_quick, suggest_acdc, speed]
RESULTS_MD = HERE / "RESULTS.md"

HEADER = (
    "# Benchmarks\n\n"
    "Regenerate this file from the stored rows (`benchmarks/results/`, no dataset or training needed): "
    "`python benchmarks/report.py`; each section names the script that makes its rows (every script rebuilds this "
    "file after its rows). Every table has a precision column (`n/r`: not recorded, rows made before it was; †: "
    "inferred by `python benchmarks/infer_precision.py` from the date of the commit that added the row and the host "
    "of that date below, the row's `precision_from` naming both). "
    "Numbers up to 2026-11-30 are from a 2-core AMD EPYC VM (AVX2, no native bf16, so `precision: auto` ran fp32), "
    "one thread per run unless stated; rows of 2026-12-02 (Kvasir at native resolution, LA geometry, memory, "
    "suggest) ran on a 2-core AMD EPYC VM with AVX-512 BF16 (`precision: auto` = bf16-mixed), one thread per run, "
    "up to three runs and other work sharing the cores (their seconds are not speed measurements); rows added on 2026-12-01 (the quick sweep, LA rows with `steps` 1200 or "
    "`bcp_*` variants, LA v2, DeSCO, CycleGAN, AugPaint, SDC-UDA, the contrastive and CUTS tables, ACDC v2 rows at "
    "`all` and `labeled_3`, the ACDC v2 mean-teacher and DSAIF rows, the pre-training ablation, the Xeon rows beside "
    "the official code, the polyp seed-1338 and SDC-UDA rows, the simulated-shift SFDA and the OOD tables) ran on a "
    "2-core Intel Xeon VM with AVX-512 BF16, where `precision: auto` picks bf16-mixed, several runs sharing the two "
    "cores (so their `train s` are not speed measurements); rows of 2026-12-04 (the BCP short suggest seed 1337, DeSCO "
    "and UPL-SFDA beside the official code, the EPYC BF16 speed rows) ran on a 2-core AMD EPYC VM with AVX-512 BF16, "
    "one thread per run with up to three runs sharing the cores, except the speed rows (alone).\n\n"
    "**Rows made before the audit fixes of 2026-12-02** (each fix is a commit with a reference test; the rows have not "
    "been re-made): the `pretrained` rows "
    "of the contrastive table (set-2 anchors, stage-2 batch statistics, bias-free g2), every `upl_sfda` and "
    "`bn_sfda+upl_sfda` row (largest component with face connectivity) and every `dsaif` row (separate labelled / "
    "unlabelled passes, γ per view inside the filter, rotation of filtered pairs, floor quantisation); and every "
    "SDC-UDA row (generator now the official `Generator_shallow`: full-resolution skip, depthwise-separable MLP, "
    "bias-free attention, no extra LayerNorms; fixed 2026-12-02 in a later session). Behaviour-"
    "preserving refactors (shared EMA, replay pool, Dice) were checked bit-identical and leave the other rows valid. "
    "The CUTS rows were re-made after their fix (07b57b0: persistent levels and patch SSIM as the official code) on "
    "2026-12-03. **Rows made before 8c7ba75 (2026-12-03) at bf16-mixed** ran the supervised, weighted-Dice, "
    "mean-teacher and DeSCO entropy losses on bf16 softmax outputs (CPU autocast leaves softmax in bf16; CUDA's runs "
    "it in fp32); since then they run in fp32. fp32 rows are unaffected; bf16 rows of those losses before that "
    "commit are marked by their date.\n"
)


def build() -> str:
    parts = [HEADER]
    for module in SECTIONS:
        text = module.section(module.load_results())
        if text:
            parts.append(text.rstrip("\n") + "\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS_MD)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = ap.parse_args()
    text = build()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            sys.exit(f"{args.out} is not what the rows give: run python benchmarks/report.py")
        return
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
