"""The run folder: created once for one recipe, resumed only by the same recipe, never mixed with another run.

``recipe.resolved.yaml`` records the recipe that made the folder. ``--resume`` re-validates it with today's
defaults and compares it with the recipe given; any difference in a key that can change a result is refused,
naming the keys, so a finished stage is never relabelled as the product of another recipe. Hidden temporary files
of writes that a kill interrupted (``utils.atomic_write_bytes``) are removed on resume; no reader ever opens one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import OutputError, OutputExistsError, RecipeError
from .recipe import Recipe, parse_recipe
from .utils import atomic_write_text

log = logging.getLogger("label_efficient")
RECIPE_FILE = "recipe.resolved.yaml"
#: keys that change how a run looks or how fast it goes, never its results: they may differ on resume
COSMETIC = ("trainer.progress_bar", "data.num_workers")


def resolved(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 of the resolved recipe without its cosmetic keys (recorded in ``metrics.json``)."""
    flat = {k: v for k, v in _flatten(resolved(recipe)).items() if not _cosmetic(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        return {k: v for i, sub in enumerate(node) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def _cosmetic(key: str) -> bool:
    return key in COSMETIC or re.fullmatch(r"stages\.\d+\.data\.num_workers", key) is not None


def differing_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, each as ``key (old → new)``."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if not _cosmetic(k) and a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k} ({a.get(k, '<absent>')!r} → {b.get(k, '<absent>')!r})")
    return out


def has_results(out: Path) -> bool:
    """A folder that holds more than its recipe (a stage was started): only ``--resume`` may continue it."""
    return any(p.name != RECIPE_FILE for p in out.iterdir())


def prepare(out: Path, recipe: Recipe, resume: bool) -> None:
    """Create (or check, on resume) the run folder ``out`` for ``recipe``; see the module docstring."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out} cannot be created ({e.strerror}); choose another folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out} is not writable; choose another folder")
    saved = out / RECIPE_FILE
    started = has_results(out)
    if started and not saved.is_file():
        raise OutputError(f"--out {out} holds files but no {RECIPE_FILE}: it is not a label-efficient run folder; "
                          "choose another --out")
    if started and not resume:
        raise OutputExistsError(f"output folder {out} is not empty; pass --resume to continue it or choose another --out")
    if started:  # a folder holding only its recipe (stopped before any stage began) is simply reused
        try:
            before = resolved(parse_recipe(yaml.safe_load(saved.read_text()), source=str(saved)))
        except (RecipeError, yaml.YAMLError) as e:
            raise OutputError(f"{saved} cannot be read as a recipe ({str(e).splitlines()[0]}); choose another --out") \
                from None
        diff = differing_keys(before, resolved(recipe))
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise RecipeError(f"--resume: {out} was made by another recipe; differing keys: {shown}. Restore them, "
                              "or run into a new --out")
        remove_partial_writes(out)
        return
    atomic_write_text(saved, yaml.safe_dump(resolved(recipe), sort_keys=False))


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the hidden temporary files that interrupted atomic writes left under ``folder``."""
    gone = [p for p in folder.rglob(".*.tmp*") if p.is_file()]
    for p in gone:
        p.unlink()
    if gone:
        log.info("removed %d partial write(s) of an interrupted run in %s", len(gone), folder)
    return gone
