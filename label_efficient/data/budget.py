"""Label budgets: which train cases are labelled, chosen by patient/volume, deterministic for a seed."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from ..registry import did_you_mean
from .datasets import Case
from .readers import DataError


class LabelBudget(BaseModel):
    """Exactly one of: ``all``, ``count`` (groups), ``fraction`` (of groups), ``ids`` (groups), ``ids_file`` (a CSV
    whose first column ``id`` lists the groups, e.g. the output of ``label-efficient suggest``; a relative path is
    read from the working directory), ``flag`` (CSV column)."""

    model_config = ConfigDict(extra="forbid")
    all: bool = False
    count: int | None = None
    fraction: float | None = None
    ids: list[str] | None = None
    ids_file: str | None = None
    flag: str | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("count", "fraction", "ids", "ids_file", "flag") if getattr(self, k) is not None] + (["all"] if self.all else [])
        if len(given) != 1:
            raise ValueError(f"a label budget needs exactly one of all/count/fraction/ids/ids_file/flag, got {given or 'none'}")
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
    elif budget.ids is not None or budget.ids_file is not None:
        ids = budget.ids if budget.ids is not None else read_ids_file(budget.ids_file)
        unknown = sorted(set(ids) - set(groups))
        if unknown:
            raise DataError(f"label-budget ids not in the train split: {unknown[:5]}"
                            f"{did_you_mean(unknown[0], groups)}")
        chosen = set(ids)
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


def read_ids_file(path: str | Path) -> list[str]:
    """The ids of a budget CSV: its first column, which must be named ``id`` (``label-efficient suggest`` writes it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.budget.ids_file: {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a CSV saved by a spreadsheet
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "id":
        raise DataError(f"data.budget.ids_file: the first column of {path} must be named 'id', got "
                        f"{rows[0][:1] if rows else 'an empty file'}")
    ids = [r[0].strip() for r in rows[1:] if r and r[0].strip()]
    if not ids:
        raise DataError(f"data.budget.ids_file: {path} lists no id")
    return ids
