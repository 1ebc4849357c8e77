"""The stage plan: what each stage of a recipe needs and does, read from its strategy's ``Requirements`` here only.

Recipe validation (:func:`check_stage`), the run (:func:`plan_stage`: streams, data, checkpoint rule, hand-over,
evaluation), the sweep (:func:`uses_budget_pool`) and the preflight checks all ask this module; no other module
reads a strategy's requirements.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from .errors import RecipeError
from .recipe import DataConfig, OptimizerConfig, Recipe, StageConfig, _format
from .registry import did_you_mean
from .strategies import STRATEGIES, Strategy
from .strategies.requirements import Requirements

#: the logged score and its direction of each validating ``select`` rule
MONITORS = {"val_dice": ("val/mean_dice", "max"), "label_free": ("val/label_free", "max"), "val_loss": ("val/loss", "min")}


@dataclass(frozen=True)
class StagePlan:
    """Stage ``index`` of a recipe, resolved: its strategy's requirements applied to the recipe's settings."""

    index: int
    name: str
    stage: StageConfig
    strategy: type[Strategy]
    requires: Requirements
    data: DataConfig
    select: str  #: the checkpoint rule, ``auto`` resolved
    optimizers: dict[str, OptimizerConfig]  #: one per name of a strategy that steps several; else empty

    @property
    def folder(self) -> str:
        return f"stage{self.index}_{self.name}"

    @property
    def streams(self) -> tuple[str, ...]:
        return self.requires.streams

    @property
    def all_unlabelled(self) -> bool:
        """Every train image arrives unlabelled (label-free and source-free stages); no mask is read."""
        return self.requires.labels == "none"

    @property
    def source_free(self) -> bool:
        return self.requires.source_free

    @property
    def label_free(self) -> bool:
        return self.requires.label_free

    @property
    def generates_volumes(self) -> bool:
        return self.requires.generates_volumes

    @property
    def optimizer(self) -> OptimizerConfig | dict[str, OptimizerConfig]:
        """What the Lightning module builds: one config, or one per named optimizer."""
        return self.optimizers or self.stage.optimizer

    @property
    def evaluates(self) -> bool:
        """The stage's network is a segmenter, scored on the test split when it is the last stage."""
        return self.requires.segments

    @property
    def generates(self) -> bool:
        return self.requires.role == "generator"

    @property
    def monitor(self) -> tuple[str | None, str]:
        return MONITORS.get(self.select, (None, "max"))


def plan_stage(recipe: Recipe, i: int) -> StagePlan:
    st = recipe.stages[i]
    cls = STRATEGIES.get(st.strategy)
    opts = {n: OptimizerConfig.model_validate({**st.optimizer.model_dump(), **st.optimizers.get(n, {})})
            for n in cls.requires.optimizers}
    return StagePlan(i, st.name or st.strategy, st, cls, cls.requires, recipe.stage_data(i), select_rule(recipe, i),
                     opts)


def plan(recipe: Recipe) -> list[StagePlan]:
    return [plan_stage(recipe, i) for i in range(len(recipe.stages))]


def select_rule(recipe: Recipe, i: int) -> str:
    """Stage ``i``'s checkpoint rule with ``auto`` resolved: labelled val Dice for a strategy that trains on labels
    (and has a val split), else the last step."""
    st, sd = recipe.stages[i], recipe.stage_data(i)
    if st.select != "auto":
        return st.select
    return "val_dice" if "labeled" in STRATEGIES.get(st.strategy).requires.streams and sd.val_split is not None \
        else "last"


def uses_budget_pool(name: str) -> bool:
    """The strategy splits the train split into labelled and unlabelled cases by the label budget."""
    req = STRATEGIES.get(name).requires
    return "unlabeled" in req.streams and req.labels != "none"


def names_where(predicate) -> list[str]:
    return [n for n in STRATEGIES if predicate(STRATEGIES.get(n).requires)]


# -- recipe rules that depend on what a strategy needs --------------------------------------------------------------

def check_stage(recipe: Recipe, i: int) -> None:
    """Raise ``ValueError`` (wrapped as a :class:`RecipeError` by validation) naming the key of a stage whose settings
    its strategy cannot take."""
    _check_optimizers(recipe, i)
    _check_select(recipe, i)
    _check_aux_masks(recipe, i)
    req, kind = STRATEGIES.get(recipe.stages[i].strategy).requires, recipe.stage_data(i).annotation.kind
    if kind != "dense" and req.labels != "sparse":
        raise ValueError(f"stages.{i}: strategy '{recipe.stages[i].strategy}' does not take sparse labels (data."
                         f"annotation.kind={kind}); strategies that do: {names_where(lambda r: r.labels == 'sparse')}")
    if req.source_free:
        _check_source_free(recipe, i)


def _check_select(recipe: Recipe, i: int) -> None:
    st, sd, where = recipe.stages[i], recipe.stage_data(i), f"stages.{i}.select"
    cls = STRATEGIES.get(st.strategy)
    if st.select == "val_dice" and "labeled" not in cls.requires.streams:
        raise ValueError(f"{where}: '{st.strategy}' trains without labels, so val Dice would be the only label it "
                         "sees: use label_free (an unsupervised stopping rule) or last")
    if st.select in ("auto", "val_dice") and sd.labeled_domain not in (None, sd.domain) and sd.val_split:
        raise ValueError(f"stages.{i}: labelled domain '{sd.labeled_domain}' differs from the evaluated domain "
                         f"'{sd.domain}', whose labels must not choose the model: set data.val_split: null (the "
                         "stage keeps its last step) or select: label_free (an unsupervised stopping rule)")
    if st.select == "val_loss" and not cls.has_validation_loss():
        has = [n for n in STRATEGIES if STRATEGIES.get(n).has_validation_loss()]
        raise ValueError(f"{where}: '{st.strategy}' defines no validation loss; strategies that do: {has}. Use "
                         "label_free, val_dice or last")
    if st.select in ("val_dice", "label_free", "val_loss") and sd.val_split is None:
        raise ValueError(f"{where}: {st.select} scores the val split, but data.val_split is null")


def _check_aux_masks(recipe: Recipe, i: int) -> None:
    st, has = recipe.stages[i], recipe.stage_data(i).aux_masks is not None
    needs = "aux_masks" in STRATEGIES.get(st.strategy).requires.streams
    if needs and not has:
        raise ValueError(f"stages.{i}: strategy '{st.strategy}' learns from unpaired auxiliary masks: set "
                         "data.aux_masks ({kind: shapes, count: N} or {kind: dataset, dataset: <name>, domain: "
                         "<d>}), at the top level or in this stage's data")
    if has and not needs:
        takes = names_where(lambda r: "aux_masks" in r.streams)
        raise ValueError(f"stages.{i}: strategy '{st.strategy}' does not use auxiliary masks, but data.aux_masks "
                         f"is set (set stages.{i}.data.aux_masks: null); strategies that use them: {takes}")


def _check_optimizers(recipe: Recipe, i: int) -> None:
    st = recipe.stages[i]
    names = STRATEGIES.get(st.strategy).requires.optimizers
    for name, override in st.optimizers.items():
        if name not in names:
            raise ValueError(f"stages.{i}.optimizers: strategy '{st.strategy}' has no optimizer '{name}'."
                             f"{did_you_mean(name, names)} Its optimizers: {list(names) or 'one, set optimizer'}")
        try:
            OptimizerConfig.model_validate({**st.optimizer.model_dump(), **override})
        except ValidationError as e:
            raise ValueError(_format(e, OptimizerConfig, f"stages.{i}.optimizers.{name}")) from None


def _check_source_free(recipe: Recipe, i: int) -> None:
    """A source-free stage gets a trained model and unlabelled target images: no labels, no source domain."""
    st, who = recipe.stages[i], f"stages.{i} ({recipe.stages[i].strategy}, source-free)"
    if "budget" in st.data:
        raise ValueError(f"{who}: takes no target labels; remove stages.{i}.data.budget "
                         "(every target train image is used unlabelled)")
    if i == 0 and st.init in ("previous_best", "previous_last", "none"):
        raise ValueError(f"{who}: needs a source model; put a source stage before it or set init to a checkpoint")
    target = {**recipe.data.model_dump(), **st.data}
    for j in range(i):
        prev = {**recipe.data.model_dump(), **recipe.stages[j].data}
        if prev["dataset"] == target["dataset"] and prev["domain"] == target["domain"] \
                and not STRATEGIES.get(recipe.stages[j].strategy).requires.source_free:
            raise ValueError(f"{who}: uses dataset '{target['dataset']}' domain '{target['domain']}', the source "
                             f"data of stages.{j}; source data must not reach a source-free stage: set "
                             f"stages.{i}.data.domain to the target domain")


def check_strategy_fits(plan_: StagePlan, intensity: str, spatial_dims: int, dataset: str) -> None:
    """The stage's strategy takes the dataset's intensity scaling and dimensionality (checked before training)."""
    from .errors import DataError

    req, name, where = plan_.requires, plan_.stage.strategy, f"stages.{plan_.index}"
    if req.intensity not in (None, intensity):
        raise DataError(f"{where}: strategy '{name}' assumes {req.intensity!r} image intensities, but dataset "
                        f"'{dataset}' is {intensity!r}-normalised")
    if spatial_dims not in req.spatial_dims:
        takes = names_where(lambda r: spatial_dims in r.spatial_dims)
        raise RecipeError(f"{where}: strategy '{name}' works on {req.spatial_dims[0]}D images, but dataset "
                          f"'{dataset}' is {spatial_dims}D; strategies for {spatial_dims}D data: {takes}")
