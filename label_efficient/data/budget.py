"""Label budgets: which train cases are labelled, chosen by patient/volume, deterministic for a seed."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from ..registry import did_you_mean
from .datasets import Case
from .readers import DataError


class LabelBudget(BaseModel):
    """Exactly one of: ``all``, ``count`` (groups), ``fraction`` (of groups), ``ids`` (groups), ``flag`` (CSV column)."""

    model_config = ConfigDict(extra="forbid")
    all: bool = False
    count: int | None = None
    fraction: float | None = None
    ids: list[str] | None = None
    flag: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("count", "fraction", "ids", "flag") if getattr(self, k) is not None] + (["all"] if self.all else [])
        if len(given) != 1:
            raise ValueError(f"a label budget needs exactly one of all/count/fraction/ids/flag, got {given or 'none'}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"label budget count must be ≥ 1, got {self.count}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"label budget fraction must be in (0, 1], got {self.fraction}")
        return self


def split_labeled(train: Sequence[Case], budget: LabelBudget) -> tuple[list[Case], list[Case]]:
    """Split the train cases into (labelled, unlabelled pool) by whole groups (patients/volumes)."""
    if not train:
        raise DataError("the train split is empty: no case to label")
    groups = sorted({c.group for c in train})
    if budget.all:
        chosen = set(groups)
    elif budget.flag is not None:
        flags = {k for c in train for k in c.flags}
        if budget.flag not in flags:
            raise DataError(f"unknown label-budget flag '{budget.flag}'.{did_you_mean(budget.flag, flags)} "
                            f"Flags of this dataset: {sorted(flags) or 'none'}")
        chosen = {c.group for c in train if c.flags.get(budget.flag) == 1}
    elif budget.ids is not None:
        unknown = sorted(set(budget.ids) - set(groups))
        if unknown:
            raise DataError(f"label-budget ids not in the train split: {unknown[:5]}"
                            f"{did_you_mean(unknown[0], groups)}")
        chosen = set(budget.ids)
    else:
        n = budget.count if budget.count is not None else max(1, round(budget.fraction * len(groups)))
        if n > len(groups):
            raise DataError(f"data.budget: a label budget of {n} groups exceeds the {len(groups)} train groups (patients/volumes); "
                            "lower data.budget")
        order = np.random.default_rng(budget.seed).permutation(len(groups))
        chosen = {groups[i] for i in order[:n]}
    labeled = [c for c in train if c.group in chosen]
    if not labeled:
        raise DataError(f"the label budget {budget.model_dump(exclude_defaults=True)} selects no case")
    return labeled, [c for c in train if c.group not in chosen]
