"""Command line: ``label-efficient run|sweep|evaluate|predict|plan|doctor|list``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cmd_run(args) -> int:
    from .recipe import load_recipe
    from .runner import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or str(Path("outputs") / recipe.name)
    metrics = run_recipe(recipe, out, resume=args.resume)
    print(json.dumps({"out": out, "mean_dice": metrics["mean_dice"], "mean_hd95": metrics.get("mean_hd95")}))
    return 0


def _cmd_sweep(args) -> int:
    from .recipe import RecipeError, load_recipe
    from .sweep import grid, run_sweep

    if args.seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {args.seeds}")
    recipes = [load_recipe(r, args.set) for r in args.recipes]
    if args.select:  # rounds: train, suggest the next cases with each rule, continue
        from .sweep import round_budgets, run_rounds

        try:
            run_rounds(recipes, [s.strip() for s in args.select.split(",")],
                       round_budgets((args.rounds or "").split(",")), args.seeds, Path(args.out))
        except ValueError as e:
            raise RecipeError(str(e)) from None
        print((Path(args.out) / "sweep.md").read_text())
        return 0
    cells = grid(recipes, [b.strip() for b in args.budgets.split(",")], args.seeds,
                 [s.strip() for s in args.strategies.split(",")] if args.strategies else ())
    out = Path(args.out)
    print(f"sweep: {len(cells)} runs into {out} (finished cells are skipped)")
    run_sweep(cells, out)
    print((out / "sweep.md").read_text())
    print(f"learning curve: {out / 'learning_curve.png'}")
    return 0


def _cmd_evaluate(args) -> int:
    from .errors import OutputError
    from .evaluation import evaluate, evaluate_ssl4mis
    from .preflight import check_split
    from .recipe import load_recipe
    from .runner import DataContext, load_for_evaluation
    from .utils import atomic_write_json

    from .errors import RecipeError

    source = Path(args.recipe)
    if source.is_dir():  # a run folder: its own recipe, and its model.pt unless --model says otherwise
        source, args.model = source / "recipe.resolved.yaml", args.model or str(source / "model.pt")
    if not args.model:
        raise RecipeError("evaluate: give --model (a model.pt or a stage checkpoint), or a run folder as RECIPE")
    recipe = load_recipe(source, args.set)
    if args.output and Path(args.output).resolve() in (Path(args.model).resolve(), source.resolve()):
        raise OutputError(f"--output {args.output} is an input of this command; write the metrics elsewhere")
    ctx = DataContext.build(recipe.stage_data(len(recipe.stages) - 1), recipe.seed)
    check_split(ctx.spec, args.split, "--split", ctx.cfg.domain)
    model = load_for_evaluation(recipe, ctx, args.model)
    vols = ctx.volumes(args.split, None)
    ev = recipe.evaluation
    if args.protocol == "ssl4mis":
        if ctx.spec.spatial_dims != 2:
            raise RecipeError("--protocol ssl4mis is the published 2D (ACDC) test; this dataset is 3D")
        # slices zoomed to the size the model trained at (the published test: its 256² training size)
        size = tuple(ctx.cfg.image_size or (256, 256))
        metrics = evaluate_ssl4mis(model, vols, ctx.spec.num_classes, ctx.spec.class_names,
                                   [m for m in ev.metrics if m != "assd"], patch_size=size,
                                   intensity=ctx.spec.intensity, image_remap=ctx.spec.image_remap)
        metrics["ssl4mis_patch_size"] = list(size)
    else:
        metrics = evaluate(model, vols, ctx.spec.num_classes, ctx.spec.class_names, ctx.spec.spatial_dims, ev.metrics,
                           roi_size=ctx.cfg.patch_size, overlap=ev.sw_overlap, empty=ev.empty)
    metrics = {"mean_dice": metrics["mean_dice"], **metrics, "split": args.split, "model": str(args.model),
               "protocol": args.protocol}
    if args.output:
        atomic_write_json(args.output, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("mean_")}))
    return 0


def _cmd_predict(args) -> int:
    from .predict import predict_path

    n = predict_path(args.model, args.input, args.output)
    print(f"wrote {n} mask(s) to {args.output}")
    return 0


def _cmd_suggest(args) -> int:
    from .errors import RecipeError
    from .recipe import load_recipe
    from .suggest import build_pool, check_out, format_table, suggest, write_csv

    source = Path(args.recipe)
    if source.is_dir():  # a run folder: its own recipe, and its model.pt unless --model says otherwise
        source, args.model = source / "recipe.resolved.yaml", args.model or str(source / "model.pt")
    recipe = load_recipe(source, args.set)
    check_out(args.out, args.force, build_pool(recipe).data_dirs)  # before any image is read
    if args.passes < 1 or (args.max_slices is not None and args.max_slices < 1):
        raise RecipeError("--passes and --max-slices must be at least 1")
    result = suggest(recipe, args.count, args.rule, args.model, seed=args.seed, passes=args.passes,
                     max_slices=args.max_slices)
    out = write_csv(result, args.out, force=args.force, new_only=args.new_only)
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {out}: the first column 'id' is a label budget once annotated: data.budget: {{ids_file: {out}}}"
          + ("" if args.new_only else " (the suggested groups and the currently labelled ones)"))
    return 0


def _cmd_list(args) -> int:
    from .backbones import BACKBONES
    from .data import DATASETS
    from .strategies import STRATEGIES

    for title, reg in (("strategies", STRATEGIES), ("backbones", BACKBONES), ("datasets", DATASETS)):
        print(f"{title}:")
        for name in reg.names():
            obj = reg.get(name)
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"  {name:<18} {doc[0] if doc else ''}")
    return 0


def _cmd_plan(args) -> int:
    from .plan import format_fingerprint, plan

    result = plan(args.data_dir, args.out, strategy=args.strategy, labeled=args.labeled, budget_flag=args.budget_flag,
                  force=args.force, images=args.images, masks=args.masks, name=args.name)
    for line in result.problems:
        print(line)
    print(format_fingerprint(result.fingerprint))
    if result.lcc is not None:
        print(f"largest-component cleaning: {result.lcc[1]}")
    print(f"wrote {result.recipe_path}" + (f" and {result.split_path}" if result.split_path else ""))
    return 0


def _cmd_doctor(args) -> int:
    import torch

    from .precision import describe_device, resolve_precision, step_rate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {describe_device()}")
    print(f"precision: auto -> {resolve_precision()}")
    fp32 = step_rate(None, args.steps, device=device)
    print(f"fp32: {fp32:.2f} steps/s  (tiny U-Net, 96², batch 4, forward + backward + AdamW)")
    try:
        bf16 = step_rate(torch.bfloat16, args.steps, device=device)
        print(f"bf16 autocast: {bf16:.2f} steps/s  ({bf16 / fp32:.2f}× fp32)")
    except RuntimeError as e:  # a device without bf16 kernels
        print(f"bf16 autocast: unavailable ({str(e).splitlines()[0]})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label-efficient", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_file_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """run, sweep, evaluate, suggest."""
    p = sub.add_parser("run", help="run a recipe (all stages, then the test evaluation)")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--out", help="output folder (default outputs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("sweep", help="recipes × label budgets × seeds: table, learning curve, labels saved")
    p.add_argument("recipes", nargs="+", help="one recipe per line of the curve (the first is the baseline)")
    p.add_argument("--budgets", default="1,3,7,all", help="labelled patients (counts), 'all', or budget flags")
    p.add_argument("--strategies", help="comma list: lines from ONE single-stage recipe with its strategy replaced")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="outputs/sweep")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every recipe")
    p.add_argument("--select", help="suggest rules, random first: active-learning rounds (see `suggest`)")
    p.add_argument("--rounds", help="with --select: labelled groups after each round, e.g. 1,3,7")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("evaluate", help="score a model.pt (or a stage last/best.ckpt) on a split of the recipe data")
    p.add_argument("recipe", help="the recipe, or a run folder (its recipe.resolved.yaml and model.pt)")
    p.add_argument("--model", help="model.pt or a stage checkpoint (default with a run folder: its model.pt)")
    p.add_argument("--protocol", choices=["default", "ssl4mis"], default="default",
                   help="default: our evaluation (recipe.evaluation); ssl4mis: the published ACDC test (256² nearest "
                        "zoom per slice, medpy per volume, empty class scores 0)")
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="write metrics JSON here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("suggest", help="which unlabelled train cases (patients/volumes/images) to label next: a CSV")
    p.add_argument("recipe", help="the recipe (its dataset and current label budget), or a run folder")
    p.add_argument("--count", type=int, required=True, help="how many groups (patients/volumes/images) to suggest")
    p.add_argument("--model", help="a model.pt (entropy rules; kcenter/typiclust then use its bottleneck features)")
    p.add_argument("--rule", choices=["random", "kcenter", "typiclust", "entropy", "entropy_kcenter"],
                   help="default: entropy_kcenter with --model, typiclust without")
    p.add_argument("--seed", type=int, help="default: the recipe's seed")
    p.add_argument("--passes", type=int, default=4, help="MC-dropout passes (entropy rules)")
    p.add_argument("--max-slices", type=int, default=4, help="2D: slices per group through the model (evenly spaced)")
    p.add_argument("--out", required=True, help="the CSV to write (never inside the data folder)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--new-only", action="store_true",
                   help="list only the suggested groups (default: also the labelled ones, so the CSV is the next budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=_cmd_suggest)


def _add_file_commands(sub) -> None:
    """predict, plan, doctor, list."""
    p = sub.add_parser("predict", help="segment an image folder or NIfTI file/folder with a model.pt")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("plan", help="check a data folder, print its fingerprint, write a commented recipe for it")
    p.add_argument("data_dir", help="images/ + masks/, imagesTr/ + labelsTr/, or an MSD / nnU-Net dataset.json folder")
    p.add_argument("--out", required=True, help="the recipe to write (.yaml; never inside the data folder)")
    p.add_argument("--strategy", default="supervised", help="supervised (default), mean_teacher or bcp")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labeled", type=int, help="label budget: this many train cases")
    g.add_argument("--budget-flag", help="label budget: the train cases with this 0/1 column = 1 in split.csv")
    p.add_argument("--images", help="image sub-folder (default images/ or imagesTr/)")
    p.add_argument("--masks", help="mask sub-folder (default masks/ or labelsTr/)")
    p.add_argument("--name", help="recipe name (default: the --out file's stem)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("doctor", help="device, automatic precision, and fp32 vs bf16 speed of a tiny U-Net step")
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("list", help="list strategies, backbones and datasets")
    p.set_defaults(func=_cmd_list)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("label_efficient").setLevel(logging.INFO)
    from .errors import UserError

    try:
        return args.func(args)
    except UserError as e:  # bad input: its message is the whole report; anything else keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
