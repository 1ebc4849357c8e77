"""The run's results, once, after the last stage: the test evaluation, the OOD detector, ``model.pt``,
``metrics.json``, overlays and the learning curve (rank 0 only)."""
from __future__ import annotations

import copy
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

from . import provenance
from .checkpoints import save_bundle, strategy_state
from .context import DataContext
from .evaluation import evaluate
from .ood import OODDetector, ood_view, pooled_features
from .outputs import recipe_hash
from .recipe import Recipe
from .strategies import Strategy
from .utils import atomic_write_json

log = logging.getLogger("label_efficient")


def evaluation_device(recipe: Recipe) -> torch.device:
    """The device the test evaluation runs on: the training accelerator's (a CUDA GPU when the trainer used one)."""
    wants_gpu = recipe.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def run_summary(stage_reports: list[dict], t_start: float) -> dict:
    return {"stages": stage_reports, "train_seconds": sum(s["seconds"] for s in stage_reports),
            "wall_seconds": time.time() - t_start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_provenance(recipe: Recipe, strategy: Strategy, summary: dict, t_results: float,
                   precision: str | None) -> dict:
    """``metrics.json``'s ``provenance``: ``precision`` as the runner resolved it (``None``: resolved from the
    recipe on this host, the same rule), the training device (the recipe's accelerator: Lightning hands the model
    back on the CPU after fitting, so ``evaluated_on`` names where the test ran), versions, commit; the wall time of
    this process up to now (``summary`` is taken before the results are written) and its peak memory."""
    from .precision import uses_cuda

    wall, here = summary.get("wall_seconds"), next(strategy.parameters()).device
    trained = torch.device("cuda", torch.cuda.current_device()) if uses_cuda(recipe.trainer.accelerator) else here
    return {**provenance.for_recipe(recipe, precision, device=trained,
                                    wall_seconds=None if wall is None else wall + time.time() - t_results),
            "evaluated_on": str(here)}


def write_pretrainer_results(out: Path, strategy: Strategy, recipe: Recipe, ctx: DataContext, parts, summary: dict,
                             precision: str | None = None):
    """A pre-training / embedding run: nothing to score; ``model.pt`` hands on its parts."""
    t_results = time.time()
    metrics = {"mean_dice": None, "evaluated": False, **summary}
    save_bundle(out / "model.pt", strategy.export_inference(), recipe, ctx, parts=parts)
    metrics["provenance"] = run_provenance(recipe, strategy, summary, t_results, precision)
    atomic_write_json(out / "metrics.json", metrics)
    log.info("label-free run: no test evaluation; fine-tune from %s (init: <path>)", out / "model.pt")
    return metrics


def write_test_results(out: Path, strategy: Strategy, recipe: Recipe, ctx: DataContext, summary: dict,
                       precision: str | None = None) -> dict:
    """Evaluate the last stage's selected weights once on the test split (and its ``last.ckpt`` when that is
    another checkpoint) and write every result file."""
    t_results = time.time()
    ev = recipe.evaluation
    test = ctx.volumes(ev.split, ctx.cfg.max_test_cases)
    device = evaluation_device(recipe)  # Lightning hands the model back on the CPU after fit
    strategy.to(device).eval()
    score = lambda keep: evaluate(strategy.predict, test, ctx.spec.num_classes, ctx.spec.class_names,  # noqa: E731
                                  ctx.spec.spatial_dims, ev.metrics, roi_size=ctx.cfg.patch_size, device=device,
                                  overlap=ev.sw_overlap, keep=keep, empty=ev.empty)
    metrics = score(ev.overlays)
    predictions = metrics.pop("predictions", [])
    last = score_last_checkpoint(strategy, out, summary, metrics, lambda: score(0))
    exported = strategy.export_model()  # the OOD detector reads its bottleneck, which an ensemble's heads share
    detector = fit_ood(exported, ctx, device) if ctx.spec.spatial_dims == 2 else None
    if detector is not None:
        sizes = (ctx.cfg.image_size, ctx.cfg.patch_size)
        for vol in test:
            sc = detector.score(pooled_features(exported, [ood_view(vol.image, *sizes)], device))
            metrics["cases"][vol.id]["ood"] = {k: float(v.mean()) for k, v in sc.items()}
            metrics["cases"][vol.id]["ood"]["flagged"] = bool(detector.flag(sc).any())
    metrics = {"mean_dice": metrics.get("mean_dice"), **metrics, "split": ev.split, "recipe_sha256": recipe_hash(recipe),
               **summary, "skipped_corrupt": ctx.store.skipped, "last_checkpoint": last}
    save_bundle(out / "model.pt", strategy.export_inference(), recipe, ctx, detector)
    metrics["provenance"] = run_provenance(recipe, strategy, summary, t_results, precision)
    atomic_write_json(out / "metrics.json", metrics)
    from .reporting import learning_curve, overlays

    overlays(test, predictions, ctx, out / "overlays")
    learning_curve(out, out / "learning_curve.png")
    return metrics


def score_last_checkpoint(strategy: Strategy, out: Path, summary: dict, selected: dict, score) -> dict:
    """The test score of the last stage's ``last.ckpt`` (its final step) beside the selected checkpoint's:
    ``score()`` evaluates ``strategy`` as it stands, so the last weights are loaded for it and the selected ones put
    back after. Where the stage selected ``last.ckpt`` itself (no validation), its scores are the selected ones."""
    stage = summary["stages"][-1]
    path = out / f"stage{len(summary['stages']) - 1}_{stage['stage']}" / "last.ckpt"
    same = stage.get("best") == "last.ckpt"
    out_ = {"checkpoint": "last.ckpt", "same_as_selected": same, "selected": stage.get("best"),
            "steps": stage.get("steps")}
    if same:
        m = selected
    elif not path.is_file():
        log.warning("no %s: the last checkpoint is not scored", path)
        return {**out_, "mean_dice": None, "mean_hd95": None}
    else:
        kept = copy.deepcopy(strategy.state_dict())
        try:
            strategy.load_state_dict(strategy_state(path))
            strategy.eval()
            m = score()
        finally:
            strategy.load_state_dict(kept)
            strategy.eval()
    return {**out_, "mean_dice": m.get("mean_dice"), "mean_hd95": m.get("mean_hd95"),
            "per_class_dice": dict(m.get("per_class", {}).get("dice", {}))}


def fit_ood(model: torch.nn.Module, ctx: DataContext, device, max_images: int = 1000) -> OODDetector | None:
    """Fit the OOD detector on the stage's training images (labelled + unlabelled, no labels used) and set its
    threshold on the validation images; ``None`` when the model has no ``bottleneck`` tap point."""
    train = ctx.labeled + ctx.unlabeled
    if "bottleneck" not in getattr(model, "tap_points", {}) or len(train) < 2:
        log.warning("no OOD detector: needs a 'bottleneck' tap point and at least 2 training images")
        return None
    keep = np.random.default_rng(0).permutation(len(train))[:max_images]
    train = [train[i] for i in sorted(keep)]
    val = ctx.spec.select(ctx.cfg.val_split, ctx.cfg.domain) if ctx.cfg.val_split else []
    sizes = (ctx.cfg.image_size, ctx.cfg.patch_size)
    view = lambda c: ood_view(torch.from_numpy(ctx.store.get(c, False).image)[None], *sizes)  # noqa: E731
    images = lambda cases: [torch.cat([view(c) for c in cases[i:i + 32]]) for i in range(0, len(cases), 32)]
    return OODDetector().fit(pooled_features(model, images(ctx.store.load(train, False)), device),
                             pooled_features(model, images(ctx.store.load(val, False)), device))
