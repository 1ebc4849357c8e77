"""Run a recipe: stages in order (weights pass on), model selection on val, one test evaluation at the end.

The road: recipe → checks (``preflight``) → run folder (``outputs``) → for each stage of the plan (``planning``):
its data (``context``), network and strategy, fit and selection (``stage``), hand-over → results (``results``).

Output folder::

    recipe.resolved.yaml     the validated recipe with every default filled in
    stage<i>_<name>/         last.ckpt, best.ckpt (on val), metrics.csv, done.json
    model.pt                 self-contained inference bundle (backbone spec + weights)
    metrics.json             per case and class, plus means (top-level ``mean_dice``)
    overlays/*.png           test predictions over the image
    learning_curve.png
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

from .checkpoints import build_model, load_bundle, load_for_evaluation, save_bundle  # noqa: F401  (public here)
from .context import DataContext  # noqa: F401  (public here)
from .outputs import prepare as prepare_output
from .planning import plan
from .precision import log_choice
from .preflight import check_recipe
from .recipe import Recipe
from .results import fit_ood, run_summary, write_pretrainer_results, write_test_results  # noqa: F401
from .stage import build_stage, fit_stage, generate, hand_over
from .utils import barrier, global_rank

log = logging.getLogger("label_efficient")


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False) -> dict:
    """Run every stage of ``recipe`` into ``out`` and evaluate once on the test split."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    out, rank0 = Path(out), global_rank() == 0  # under DDP every process runs this function; rank 0 writes
    check_recipe(recipe)  # every problem knowable before training, before anything is written
    if rank0:
        prepare_output(out, recipe, resume)
    t_start, precision = time.time(), log_choice(recipe.trainer.precision, recipe.trainer.accelerator)
    previous, reports = None, []
    for stage in plan(recipe):
        ctx = DataContext.for_stage(stage, recipe.seed)
        module = build_stage(recipe, stage, ctx, previous)
        info = fit_stage(recipe, stage, ctx, module, out, resume, precision, rank0)
        previous = hand_over(module.strategy, out / stage.folder, info)
        if stage.generates:
            if rank0:
                generate(stage, module.strategy, ctx, out / stage.folder, recipe.seed + stage.index)
            barrier()  # the other processes read the pairs in the next stage
        reports.append({"stage": stage.name, "strategy": stage.stage.strategy, **info})
    if not rank0:  # DDP: the test evaluation and every output file are rank 0's
        return {"mean_dice": None, "evaluated": False, "rank": global_rank()}
    if not stage.evaluates:
        return write_pretrainer_results(out, module.strategy, recipe, ctx, previous["parts"],
                                        run_summary(reports, t_start), precision)
    return write_test_results(out, module.strategy, recipe, ctx, run_summary(reports, t_start), precision)
