"""Recipes: YAML validated with pydantic; unknown keys name the closest valid key, wrong types the expected one."""
from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from .data.annotation import AnnotationConfig
from .data.aux_masks import AuxMasksConfig
from .data.budget import LabelBudget
from .data.synthetic import SyntheticConfig
from .errors import RecipeError
from .registry import did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    dataset: str
    root: str | None = None  #: data folder; default $LABEL_EFFICIENT_DATA/<folder> or shared/data/<folder>
    options: dict[str, Any] = {}  #: extra arguments of the dataset definition (e.g. num_classes of image_folder)
    domain: str | None = None  #: restrict to one domain (e.g. kvasir)
    #: domain adaptation: the labelled stream comes from this domain's train split (with the budget) and every train
    #: image of ``domain`` joins the unlabelled stream, never labelled; val/test stay on ``domain``
    labeled_domain: str | None = None
    #: 2D: every image is resized to this size (with patch_size: optional; without it images keep their own size)
    image_size: list[PositiveInt] | None = Field(None, min_length=2, max_length=2)
    #: random training crop and sliding-window size: 3D, or 2D patches at native resolution (or at image_size)
    patch_size: list[PositiveInt] | None = Field(None, min_length=2, max_length=3)
    budget: LabelBudget = LabelBudget(all=True)
    annotation: AnnotationConfig = AnnotationConfig()  #: dense, or sparse slices of each labelled case (label_mask)
    synthetic: SyntheticConfig | None = None  #: generated pairs added to the labelled stream (data.synthetic)
    aux_masks: AuxMasksConfig | None = None  #: unpaired masks (shape model or another dataset), see data.aux_masks
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"
    max_unlabeled: int | None = Field(None, ge=0)  #: subsample the unlabelled pool (deterministic), for quick runs
    max_val_cases: int | None = Field(None, ge=1)  #: evaluate on the first N validation volumes only
    max_test_cases: int | None = Field(None, ge=1)
    augment: bool = True
    on_corrupt: Literal["error", "skip"] = "error"
    num_workers: int = Field(0, ge=0)
    #: NIfTI: resample every volume to this voxel size (mm per axis), once per case; None: each volume's own grid
    spacing: list[typing.Annotated[float, Field(gt=0)]] | None = Field(None, min_length=3, max_length=3)
    #: NIfTI: reorient every volume to these axis codes (a no-op for volumes already in that frame); None: as stored
    orientation: str | None = Field("RAS", pattern=r"^[RLAPSIrlapsi]{3}$")
    #: intensity normalisation; None: the dataset's own (NIfTI: whole-volume z-score). ct: nnU-Net's CT scheme with
    #: statistics of the training labelled cases' foreground; zscore_foreground: z-score over non-zero voxels
    normalize: Literal["zscore", "zscore_foreground", "ct"] | None = None
    #: 3D: probability that a training crop is centred on a foreground voxel (nnU-Net: 0.33); 0: uniform crops
    foreground_ratio: float = Field(0.0, ge=0.0, le=1.0)
    #: preprocessed cases cached in this folder (memory-mapped .npy, rebuilt when a setting or file changes);
    #: None: in memory
    cache_dir: str | None = None


class BackboneConfig(_Strict):
    name: str = "unet"
    kwargs: dict[str, Any] = {}
    tap_points: dict[str, str] | None = None


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  #: Adam(W)
    schedule: Literal["constant", "poly", "step", "cosine"] = "poly"
    poly_power: float = 0.9
    step_size: int = 2500
    gamma: float = 0.1
    warmup_steps: int = Field(0, ge=0)  #: linear warm-up from 0 before the schedule


class BatchConfig(_Strict):
    labeled: int = 8
    unlabeled: int = 8


class StageConfig(_Strict):
    strategy: str
    name: str | None = None
    config: dict[str, Any] = {}
    steps: int = Field(gt=0)
    val_every: int = Field(200, gt=0)  #: steps per epoch; validation and `last` checkpoint at each epoch end
    batch_size: BatchConfig = BatchConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    #: per-name overrides of ``optimizer`` for a strategy that steps several (e.g. ``{discriminator: {lr: 2e-4}}``)
    optimizers: dict[str, dict[str, Any]] = {}
    init: str = "previous_best"  #: previous_best | previous_last | none | path to a checkpoint or model.pt
    data: dict[str, Any] = {}  #: overrides of the top-level data section for this stage
    #: which checkpoint is this stage's ``best``: ``val_dice`` (labelled val volumes), ``label_free`` (flip
    #: consistency on the val images, no mask read: an unsupervised stopping rule), ``val_loss`` (the strategy's
    #: own objective on the val images, no mask read; strategies that define one), ``last``; ``auto`` =
    #: ``val_dice`` for a strategy that trains on labels, else ``last``
    select: Literal["auto", "val_dice", "label_free", "val_loss", "last"] = "auto"


class TrainerConfig(_Strict):
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    strategy: str = "auto"  #: Lightning distribution strategy, e.g. ddp
    precision: str = "auto"  #: auto: bf16 where the device runs it natively, else fp32 (label_efficient.precision)
    channels_last: bool = True  #: 2D networks in NHWC memory format (faster convolutions on CPU and GPU)
    log_every: int = 10
    progress_bar: bool = True


class EvaluationConfig(_Strict):
    split: str = "test"
    #: medpy's definitions; "asd" is directed (prediction → truth), "assd" symmetric
    metrics: list[Literal["dice", "iou", "hd95", "asd", "assd"]] = ["dice", "iou", "hd95", "asd", "assd"]
    #: a class absent from a case's prediction and/or truth: "nan" (default: the behaviour before this setting;
    #: distances undefined there are NaN and left out of the means, never scored as 0) or "ssl4mis" (every metric 0,
    #: as SSL4MIS / BCP score it, for comparison with published tables); metrics.json counts them (empty_cases)
    empty: Literal["nan", "ssl4mis"] = "nan"
    overlays: int = 4
    sw_overlap: float = 0.5  #: sliding-window overlap (3D)


class Recipe(_Strict):
    name: str = "run"
    seed: int = 1337
    data: DataConfig
    backbone: BackboneConfig = BackboneConfig()
    trainer: TrainerConfig = TrainerConfig()
    stages: list[StageConfig] = Field(min_length=1)
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _check_registries(self):
        from .planning import check_stage
        from .strategies import STRATEGIES

        for i, st in enumerate(self.stages):
            if st.strategy not in STRATEGIES:
                raise ValueError(f"stages.{i}.strategy: unknown strategy '{st.strategy}'."
                                 f"{did_you_mean(st.strategy, STRATEGIES.names())} Available: {STRATEGIES.names()}")
            cfg = STRATEGIES.get(st.strategy).Config
            try:
                cfg.model_validate(st.config)
            except ValidationError as e:
                raise ValueError(_format(e, cfg, f"stages.{i}.config")) from None
            bad = set(st.data) - set(DataConfig.model_fields)
            if bad:
                k = sorted(bad)[0]
                raise ValueError(f"stages.{i}.data: unknown key '{k}'.{did_you_mean(k, DataConfig.model_fields)}")
            self._check_synthetic(i)
            check_stage(self, i)
        return self

    def select(self, i: int) -> str:
        """Stage ``i``'s checkpoint rule with ``auto`` resolved (see :func:`label_efficient.planning.select_rule`)."""
        from .planning import select_rule

        return select_rule(self, i)

    def _check_synthetic(self, i: int) -> None:
        syn = self.stage_data(i).synthetic
        if syn is None:
            return
        if (syn.from_stage is None) == (syn.path is None):
            raise ValueError(f"stages.{i}.data.synthetic: give exactly one of from_stage (an earlier stage's name) "
                             "or path (a generated folder with manifest.json)")
        earlier = [st.name or st.strategy for st in self.stages[:i]]
        if syn.from_stage is not None and syn.from_stage not in earlier:
            raise ValueError(f"stages.{i}.data.synthetic.from_stage: no earlier stage named '{syn.from_stage}'."
                             f"{did_you_mean(syn.from_stage, earlier)} Earlier stages: {earlier or 'none'}")

    def stage_optimizers(self, i: int) -> dict[str, OptimizerConfig]:
        """One optimizer config per name of a strategy that steps several: ``optimizer`` with its overrides."""
        from .planning import plan_stage

        return plan_stage(self, i).optimizers

    def stage_data(self, i: int) -> DataConfig:
        """The data section for stage ``i`` (top level merged with the stage's overrides)."""
        merged = {**self.data.model_dump(), **self.stages[i].data}
        return DataConfig.model_validate(merged)


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for did-you-mean on unknown keys)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        while typing.get_origin(ann) in (list, Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if args else None
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _format(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            hint = did_you_mean(str(loc[-1]), owner.model_fields) if owner else ""
            valid = f" Valid keys here: {', '.join(owner.model_fields)}." if owner else ""
            lines.append(f"unknown key '{key}'.{hint}{valid}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines) if prefix else "\n".join(f"- {l}" for l in lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML; list items by index)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects dotted.key=value, got '{item}'")
        key, value = item.split("=", 1)
        parts = key.split(".")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {key}: the value {value!r} is not valid YAML ({_yaml_problem(e)})") from None
        node: Any = raw
        for depth, p in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth]) or 'recipe'}' is a list of {len(node)} "
                                      f"item(s), so '{p}' must be an index 0..{len(node) - 1}")
                p = int(p)
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth])}' is a value ({node!r}), not a section")
            if last:
                node[p] = parsed
            else:
                node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
                if node is None:
                    raise RecipeError(f"--set {key}: '{where}' is null; set the whole section instead")
    return raw


class RecipeYAMLError(RecipeError, yaml.YAMLError):
    """A recipe file that is not (safe) YAML."""


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{getattr(e, 'problem', None) or e}"


def parse_recipe(raw: dict, overrides: list[str] | None = None, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = _format(e, Recipe)
        one = problems.count("\n") == 0  # one problem: one line; several: one line each
        raise RecipeError(f"{source} is not valid: {problems[2:]}" if one else f"{source} is not valid:\n{problems}") \
            from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Safe-load a YAML recipe, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeYAMLError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text file") from None
    return parse_recipe(raw, overrides, str(path))
