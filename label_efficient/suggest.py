"""Which cases to label next: rank the unlabelled train groups of a recipe's dataset for annotation (issue 27).

    label-efficient suggest recipes/acdc_quick.yaml --count 3 --model runs/quick/model.pt --out to_label.csv

The unit is the one a label budget picks, ``Case.group``: the patient for ACDC, the volume for 3D folders, the image
for image folders. The pool is the recipe's train split minus the groups its current label budget labels (the last
stage's data section; ``data.max_unlabeled`` is ignored, every unlabelled group is a candidate). **No rule reads a
mask of the pool**: images are loaded with ``CaseStore.get(case, with_label=False)`` only (tested).

Rules (``RULES``):

- ``random``: K groups drawn uniformly without replacement, seeded: the reference every other rule must beat.
- ``kcenter``: k-center greedy, the core-set rule of Sener & Savarese, "Active Learning for Convolutional Neural
  Networks: A Core-Set Approach", ICLR 2018: repeatedly take the pool group farthest (Euclidean) from its nearest
  labelled-or-already-chosen group (their greedy 2-approximation, started from the labelled set).
- ``typiclust``: TPC-RP of Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High
  and Low Budgets", ICML 2022: k-means (k-means++ init, seeded) of labelled + pool features into |L| + K clusters;
  K times, from the cluster holding the fewest labelled-or-chosen groups (the largest first among ties) take its
  most typical pool group, typicality = 1 / mean distance to its min(20, n − 1) nearest neighbours in the cluster.
- ``entropy`` (needs ``--model``): MC-dropout predictive entropy, Gal, Islam & Ghahramani, "Deep Bayesian Active
  Learning with Image Data", ICML 2017: H[mean_t softmax(f_t(x))] over T passes with the backbone's dropout layers
  on (batch norm stays in eval mode), averaged over the pixels/voxels and the slices of a group. A backbone without
  dropout gets the softmax entropy of one deterministic pass instead; the log and every row's reason say so.
- ``entropy_kcenter`` (needs ``--model``): uncertainty, then diversity, in the manner of Yang et al., "Suggestive
  Annotation: A Deep Active Learning Framework for Biomedical Image Segmentation", MICCAI 2017 (the K most
  representative among the top-M most uncertain): the M = ``top_factor`` · K (default 2K) groups of highest entropy,
  then k-center greedy on their bottleneck features. Yang et al. pick the subset by a max-cover of cosine
  similarities; the k-center step is Sener & Savarese's (a BADGE-like "uncertain and spread out", not BADGE itself).

Features (``kcenter``, ``typiclust``, ``entropy_kcenter``): with a model, its pooled bottleneck features (tap point
``bottleneck``, average-pooled per image as :func:`label_efficient.ood.pooled_features`); without one (cold start),
label-free intensity features: an area-averaged thumbnail (16² in 2D, 8³ in 3D) and a 32-bin intensity histogram,
each L2-normalised. Either is averaged over the group's slices and L2-normalised per group.

Speed: with a model, at most ``max_slices`` slices per group (default 4, evenly spaced in volume and slice order) go
through the network, T = ``passes`` (default 4) dropout passes, in bf16 autocast where the host's automatic
precision is bf16 (``precision.resolve_precision``). Images are those the recipe's store gives (2D resized to
``data.image_size``; 2D patch recipes and 3D cut into non-overlapping tiles of the training ``patch_size``, padded).

The output CSV (``write_csv``) has the first column ``id``; by default it lists the suggested groups (``status``
``suggested``, ranked) followed by the currently labelled ones (``status`` ``labelled``), so that
``data.budget: {ids_file: to_label.csv}`` is the next round's budget (current + suggested) once they are annotated.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Case, CaseStore, DatasetSpec, build_dataset, split_labeled
from .errors import DataError, OutputError, RecipeError
from .recipe import Recipe

log = logging.getLogger("label_efficient")

RULES = ("random", "kcenter", "typiclust", "entropy", "entropy_kcenter")
NEEDS_MODEL = ("entropy", "entropy_kcenter")
TYPICLUST_NEIGHBOURS = 20  #: Hacohen et al.'s K for typicality


@dataclass
class Suggestion:
    id: str  #: the group (what a budget's ``ids`` lists)
    rank: int
    score: float  #: the rule's criterion at the pick (random key, distance, typicality, entropy)
    reason: str


@dataclass
class Pool:
    """The labelled and unlabelled train groups of a recipe, and the store that loads their images."""

    spec: DatasetSpec
    store: CaseStore
    labeled: dict[str, list[Case]]  #: group -> its cases
    unlabeled: dict[str, list[Case]]
    data_dirs: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------ pool
def build_pool(recipe: Recipe, image_size: Sequence[int] | None = None) -> Pool:
    """The recipe's train groups split by its label budget (last stage's data section); ``image_size`` overrides
    the 2D resize (e.g. the model's own training size)."""
    from .context import store_for

    cfg = recipe.stage_data(len(recipe.stages) - 1)
    if image_size is not None and cfg.image_size is not None:
        cfg = cfg.model_copy(update={"image_size": list(image_size)})
    spec = build_dataset(cfg.dataset, cfg.root, **cfg.options)
    train = spec.select(cfg.train_split, cfg.labeled_domain or cfg.domain)
    labeled, unlabeled = split_labeled(train, cfg.budget)
    if not unlabeled:
        raise DataError(f"the label budget {cfg.budget.model_dump(exclude_defaults=True)} labels every train group of "
                        f"'{spec.name}': there is nothing left to suggest")
    store = store_for(spec, cfg)
    if labeled:
        store.fit_normalization(labeled)  # CT statistics from the labelled cases, as the run does (else a no-op)
    dirs = {Path(p).resolve().parent for c in spec.cases for p in (c.image, c.mask) if p}
    data_dirs = [Path(os.path.commonpath([str(d) for d in dirs]))] if dirs else []
    if cfg.root:
        data_dirs.append(Path(cfg.root).expanduser().resolve())
    return Pool(spec, store, _by_group(labeled), _by_group(unlabeled), data_dirs)


def _by_group(cases: Sequence[Case]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for c in sorted(cases, key=lambda c: (c.group, c.volume, c.index, c.id)):
        out.setdefault(c.group, []).append(c)
    return dict(sorted(out.items()))


def _image(store: CaseStore, case: Case) -> np.ndarray:
    """The preprocessed image of ``case``; its mask is never read."""
    return np.asarray(store.get(case, with_label=False).image, dtype=np.float32)


def _evenly(cases: list[Case], n: int | None) -> list[Case]:
    if n is None or len(cases) <= n:
        return cases
    return [cases[i] for i in np.linspace(0, len(cases) - 1, n).round().astype(int)]


# -------------------------------------------------------------------------------------------------------- features
def intensity_features(pool: Pool, groups: Sequence[str], bins: int = 32) -> np.ndarray:
    """(G, D) label-free features: per image an area-averaged thumbnail (16² / 8³) and a ``bins``-bin intensity
    histogram (over the 0.5–99.5 % intensity range of all these images), each L2-normalised; mean over the group's
    images, L2-normalised."""
    cases = {**pool.labeled, **pool.unlabeled}
    images = {g: [_image(pool.store, c) for c in cases[g]] for g in groups}
    sample = np.concatenate([im.ravel()[::97] for ims in images.values() for im in ims])
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1.0
    out = []
    for g in groups:
        feats = []
        for im in images[g]:
            x = torch.from_numpy(im)[None]
            side = 16 if x.ndim == 4 else 8
            thumb = (F.adaptive_avg_pool2d(x, side) if x.ndim == 4 else F.adaptive_avg_pool3d(x, side)).flatten()
            hist = torch.histc(x.clamp(lo, hi), bins=bins, min=lo, max=hi)
            feats.append(torch.cat([_unit(thumb), _unit(hist)]).numpy())
        out.append(np.mean(feats, axis=0))
    return _rows_unit(np.stack(out))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-8)


def _rows_unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)


def _views(image: np.ndarray, roi: Sequence[int] | None, stride: int) -> torch.Tensor:
    """(N, C, *S) network inputs of one image (C, *S): the image padded to the network stride, or with ``roi`` its
    non-overlapping tiles (the image padded to a multiple of ``roi``)."""
    from .evaluation import pad_to_multiple

    x = torch.from_numpy(image)[None]
    if roi is None:
        return pad_to_multiple(x, stride)[0]
    roi = [int(r) for r in roi]
    pad = []
    for s, r in zip(reversed(x.shape[2:]), reversed(roi)):
        pad += [0, (-s) % r]
    x = F.pad(x, pad)
    for axis, r in enumerate(roi):
        x = x.unfold(2 + axis, r, r)  # (1, C, n1, [n2, [n3,]] ..., r1, r2[, r3])
    d = len(roi)
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(-1, image.shape[0], *roi)


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _group_views(model: torch.nn.Module, pool: Pool, groups: Sequence[str], max_slices: int | None,
                 roi: Sequence[int] | None) -> tuple[list[torch.Tensor], np.ndarray]:
    """The network inputs of each group (≤ ``max_slices`` evenly spaced slices in 2D) and the group of each."""
    cases = {**pool.labeled, **pool.unlabeled}
    stride = int(getattr(model, "stride", 16))
    views, owner = [], []
    for gi, g in enumerate(groups):
        for c in _evenly(cases[g], max_slices if pool.spec.spatial_dims == 2 else None):
            v = _views(_image(pool.store, c), roi, stride)
            views.append(v)
            owner += [gi] * len(v)
    return views, np.asarray(owner)


@torch.no_grad()
def model_scores(model: torch.nn.Module, pool: Pool, groups: Sequence[str], *, entropy: bool, features: bool = True,
                 passes: int = 4,
                 max_slices: int | None = 4, seed: int = 0, roi: Sequence[int] | None = None, batch_size: int = 32,
                 autocast: torch.dtype | None = None) -> tuple[np.ndarray | None, np.ndarray, int]:
    """Per group: mean predictive entropy (nats; None unless ``entropy``) and the L2-normalised mean pooled
    bottleneck feature (None unless ``features``); and the number of stochastic passes used (0: one deterministic
    pass).

    With ``entropy`` and dropout in the network: ``passes`` forward passes with the dropout layers in train mode
    (MC dropout; seeded), features averaged over the passes; else one pass in eval mode."""
    from .backbones.taps import FeatureTap

    views, owner = _group_views(model, pool, groups, max_slices, roi)
    mc = passes if entropy and has_dropout(model) and passes > 1 else 0
    model.eval()
    drop = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    shapes = {tuple(v.shape[1:]) for v in views}
    chunks = [torch.cat(views)] if len(shapes) == 1 else views  # differing sizes (native 2D): one image at a time
    ent_parts, feat_parts = [], []
    try:
        if mc:
            for m in drop:
                m.train()
        with torch.random.fork_rng(devices=[]), (FeatureTap(model, detach=True) if features else _NoTap()) as tap:
            torch.manual_seed(seed)
            for chunk in chunks:
                for b0 in range(0, len(chunk), batch_size):
                    x = chunk[b0: b0 + batch_size]
                    probs, feats = 0.0, 0.0
                    for _ in range(max(mc, 1)):
                        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                            logits = model(x)
                        probs = probs + logits.float().softmax(1)
                        if features:
                            z = tap["bottleneck"].float()
                            feats = feats + z.mean(dim=tuple(range(2, z.ndim)))
                    probs, feats = probs / max(mc, 1), feats / max(mc, 1)
                    if entropy:
                        h = -(probs * probs.clamp_min(1e-12).log()).sum(1)
                        ent_parts.append(h.flatten(1).mean(1).numpy())
                    if features:
                        feat_parts.append(feats.numpy())
    finally:
        for m in drop:
            m.eval()
    g_feat = g_ent = None
    if features:
        feats = np.concatenate(feat_parts)
        g_feat = _rows_unit(np.stack([feats[owner == i].mean(0) for i in range(len(groups))]))
    if entropy:
        ent = np.concatenate(ent_parts)
        g_ent = np.array([ent[owner == i].mean() for i in range(len(groups))])
    return g_ent, g_feat, mc


class _NoTap:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


# ----------------------------------------------------------------------------------------------------------- rules
def kcenter_greedy(pool: np.ndarray, k: int, centres: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> tuple[list[int], list[float]]:
    """Sener & Savarese's greedy k-center: ``k`` indices into ``pool`` (N, D), each the point farthest from its
    nearest centre (``centres`` (M, D), then the points already chosen); returns them and that distance at each
    pick. Without centres the first pick is a seeded random point (its distance reported as inf)."""
    n = len(pool)
    if not 0 < k <= n:
        raise ValueError(f"k-center: cannot choose {k} of {n} points")
    if centres is not None and len(centres):
        d = np.sqrt(((pool[:, None, :] - centres[None]) ** 2).sum(-1)).min(1)
        chosen, dist = [], []
    else:
        first = int((rng or np.random.default_rng(0)).integers(n))
        d = np.sqrt(((pool - pool[first]) ** 2).sum(-1))
        chosen, dist = [first], [float("inf")]
    while len(chosen) < k:
        d_masked = d.copy()
        d_masked[chosen] = -1.0
        i = int(np.argmax(d_masked))  # ties: the lowest index (groups are sorted): deterministic
        chosen.append(i)
        dist.append(float(d[i]))
        d = np.minimum(d, np.sqrt(((pool - pool[i]) ** 2).sum(-1)))
    return chosen, dist


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the cluster of each row."""
    centres = [x[int(rng.integers(len(x)))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres.append(x[int(rng.choice(len(x), p=p))])
    c = np.asarray(centres)
    labels = np.zeros(len(x), int)
    for it in range(iters):
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
    return labels


def typiclust(pool: np.ndarray, k: int, labelled: np.ndarray | None = None,
              rng: np.random.Generator | None = None) -> tuple[list[int], list[float], list[str]]:
    """Hacohen et al.'s TPC-RP: ``k`` indices into ``pool``, their typicality and a short note each (see the module
    docstring)."""
    rng = rng or np.random.default_rng(0)
    lab = labelled if labelled is not None else np.zeros((0, pool.shape[1]))
    allx = np.concatenate([lab, pool])
    n_clusters = min(len(lab) + k, len(allx))
    labels = kmeans(allx, n_clusters, rng)
    lab_cl, pool_cl = labels[: len(lab)], labels[len(lab):]
    covered = np.bincount(lab_cl, minlength=n_clusters).astype(float)
    sizes = np.bincount(labels, minlength=n_clusters)
    avail = np.ones(len(pool), bool)
    chosen, typ, notes = [], [], []
    for _ in range(k):
        free = np.unique(pool_cl[avail])
        j = int(min(free, key=lambda j: (covered[j], -sizes[j], j)))
        members = np.flatnonzero(labels == j)  # labelled and pool points of the cluster
        cand = np.flatnonzero((pool_cl == j) & avail)
        nn = min(TYPICLUST_NEIGHBOURS, len(members) - 1)
        best, best_t = None, -1.0
        for i in cand:
            if nn < 1:
                t = 1.0  # a cluster of one: typicality undefined, taken as is
            else:
                d = np.sqrt(((allx[members] - pool[i]) ** 2).sum(-1))
                d = np.sort(d)[1: nn + 1]  # [0] is the point itself
                t = 1.0 / max(float(d.mean()), 1e-8)
            if t > best_t:
                best, best_t = i, t
        avail[best] = False
        covered[j] += 1
        chosen.append(int(best))
        typ.append(best_t)
        notes.append(f"cluster {j} of {n_clusters} ({sizes[j]} groups, "
                     f"{int(covered[j]) - 1} labelled or chosen before)")
    return chosen, typ, notes


# ------------------------------------------------------------------------------------------------------------ main
@dataclass
class SuggestResult:
    rule: str
    suggestions: list[Suggestion]
    labelled: list[str]  #: the groups the recipe's budget labels now
    pool_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)  #: what was done (features, passes, fallbacks), for the log
    pool: Pool | None = field(default=None, repr=False)


def suggest(recipe: Recipe, count: int, rule: str | None = None, model: str | Path | torch.nn.Module | None = None,
            seed: int | None = None, passes: int = 4, max_slices: int | None = 4, top_factor: int = 2,
            precision: str = "auto") -> SuggestResult:
    """Rank the unlabelled train groups of ``recipe`` and return the ``count`` to label next (see the module
    docstring). ``rule`` None: ``entropy_kcenter`` with a model, ``typiclust`` without; ``seed`` None: the
    recipe's seed."""
    t0 = time.perf_counter()
    rule = _checked_rule(rule, model, count)
    seed = recipe.seed if seed is None else seed
    net, blob = _model(model)
    image_size = (blob or {}).get("data", {}).get("image_size")
    pool = build_pool(recipe, image_size if image_size and rule != "random" else None)
    groups = list(pool.unlabeled)
    if count > len(groups):
        raise DataError(f"--count {count} exceeds the {len(groups)} unlabelled train groups of '{pool.spec.name}'")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if rule == "random":
        keys = rng.random(len(groups))
        order = np.argsort(-keys, kind="stable")[:count]
        picks = [(int(i), float(keys[i]), f"random draw (seed {seed})") for i in order]
    else:
        labelled = list(pool.labeled) if rule != "entropy" else []  # entropy alone needs no labelled group
        ent, feats, mc = _scores(rule, recipe, pool, blob, net, labelled, groups, passes, max_slices, seed, precision,
                                 notes)
        lab_f, pool_f = (feats[: len(labelled)], feats[len(labelled):]) if feats is not None else (None, None)
        picks = _picks(rule, count, ent, mc, lab_f, pool_f, len(groups), top_factor, rng)
    out = [Suggestion(groups[i], r + 1, s, why) for r, (i, s, why) in enumerate(picks)]
    res = SuggestResult(rule, out, list(pool.labeled), len(groups), time.perf_counter() - t0, notes, pool)
    for n in notes:
        log.info("suggest: %s", n)
    return res


def _checked_rule(rule: str | None, model, count: int) -> str:
    rule = rule or ("entropy_kcenter" if model is not None else "typiclust")
    if rule not in RULES:
        from .registry import did_you_mean

        raise RecipeError(f"unknown suggestion rule '{rule}'.{did_you_mean(rule, RULES)} Rules: {', '.join(RULES)}")
    if rule in NEEDS_MODEL and model is None:
        raise RecipeError(f"rule '{rule}' ranks by the model's uncertainty: give --model (a model.pt of a run on this "
                          "data); without one use random, kcenter or typiclust")
    if count < 1:
        raise RecipeError(f"--count must be at least 1, got {count}")
    return rule


def _scores(rule, recipe, pool, blob, net, labelled, groups, passes, max_slices, seed, precision, notes):
    """(entropy of each pool group or None, features of labelled + pool groups or None, MC passes); ``notes`` gets
    what was computed."""
    if net is None:
        feats = intensity_features(pool, labelled + groups)
        ent, mc = None, 0
        what = "image-intensity features (16² thumbnail + 32-bin histogram, mean over the group's images)"
    else:
        roi = _roi(recipe, pool, blob)
        autocast = torch.bfloat16 if _bf16(precision) else None
        want_entropy = rule in NEEDS_MODEL
        # the labelled groups go through the same passes, so that their features (k-center anchors) and the
        # pool's are averaged alike
        ent, feats, mc = model_scores(net, pool, labelled + groups, entropy=want_entropy,
                                      features=rule != "entropy", passes=passes, max_slices=max_slices,
                                      seed=seed, roi=roi, autocast=autocast)
        ent = ent[len(labelled):] if ent is not None else None
        what = (f"pooled bottleneck features of the model (≤ {max_slices} slices per group"
                f"{', bf16 autocast' if autocast else ''})")
        if want_entropy and not mc:
            notes.append("the backbone has no dropout layer: entropy is the softmax entropy of one deterministic "
                         "pass, not MC-dropout" if not has_dropout(net) else "passes ≤ 1: one deterministic pass")
    notes.append(f"{rule} on {what}" if rule != "entropy" else "entropy" + (f": MC dropout, T = {mc} passes"
                                                                             if mc else ": single pass"))
    return ent, feats, mc


def _picks(rule, count, ent, mc, lab_f, pool_f, n_groups, top_factor, rng) -> list[tuple[int, float, str]]:
    """(index into the pool, score, reason) of each pick of a model- or feature-based rule, in order."""
    ent_kind = f"MC-dropout predictive entropy (T={mc})" if mc else "softmax entropy (one pass, no dropout)"
    if rule == "kcenter":
        idx, dist = kcenter_greedy(pool_f, count, lab_f, rng)
        return [(i, d, f"k-center: farthest from the labelled and earlier picks (distance {d:.3f})")
                for i, d in zip(idx, dist)]
    if rule == "typiclust":
        idx, typ, cl = typiclust(pool_f, count, lab_f, rng)
        return [(i, t, f"typiclust: most typical of the least covered {c}") for i, t, c in zip(idx, typ, cl)]
    if rule == "entropy":
        order = np.argsort(-ent, kind="stable")[:count]
        return [(int(i), float(ent[i]), f"{ent_kind} {ent[i]:.4f} nats, rank {r + 1} of {n_groups}")
                for r, i in enumerate(order)]
    m = min(n_groups, max(count, top_factor * count))  # entropy_kcenter
    top = np.argsort(-ent, kind="stable")[:m]
    idx, dist = kcenter_greedy(pool_f[top], count, lab_f, rng)
    rank = {int(i): r + 1 for r, i in enumerate(top)}
    return [(int(top[i]), float(ent[top[i]]),
             f"{ent_kind} {ent[top[i]]:.4f} (rank {rank[int(top[i])]} of {n_groups}, among the top {m}); "
             f"k-center distance {d:.3f}") for i, d in zip(idx, dist)]


def _model(model) -> tuple[torch.nn.Module | None, dict | None]:
    if model is None:
        return None, None
    if isinstance(model, torch.nn.Module):
        return model.eval(), None
    from .checkpoints import load_bundle

    if not Path(model).is_file():
        raise RecipeError(f"--model {model} not found (give the model.pt of a run)")
    return load_bundle(model)


def _roi(recipe: Recipe, pool: Pool, blob: dict | None) -> list[int] | None:
    """Tiles for 3D and 2D-patch models (their training patch size); None: whole resized 2D images."""
    cfg = recipe.stage_data(len(recipe.stages) - 1)
    patch = (blob or {}).get("data", {}).get("patch_size") or cfg.patch_size
    if pool.spec.spatial_dims == 3 or (patch is not None and pool.store.image_size is None):
        if patch is None:
            raise RecipeError("suggest with a 3D model needs its training patch size (data.patch_size)")
        return list(patch)
    return None


def _bf16(precision: str) -> bool:
    from .precision import resolve_precision

    return resolve_precision(precision, "cpu") == "bf16-mixed"


# ------------------------------------------------------------------------------------------------------------- CSV
COLUMNS = ["id", "status", "rank", "rule", "score", "reason"]


def csv_text(result: SuggestResult, new_only: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for s in result.suggestions:
        w.writerow([s.id, "suggested", s.rank, result.rule, f"{s.score:.6g}", s.reason])
    if not new_only:
        for g in result.labelled:
            w.writerow([g, "labelled", "", "", "", "labelled in the current budget"])
    return buf.getvalue()


def check_out(out: str | Path, force: bool, data_dirs: Sequence[Path]) -> Path:
    """``out`` may be written: not existing (unless ``force``), not a folder, not inside a data folder."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a .csv file")
    if out.exists() and not force:
        raise OutputError(f"--out {out} exists; choose another file or pass --force to overwrite it")
    where = out.resolve()
    for d in data_dirs:
        if where == d or d in where.parents:
            raise OutputError(f"--out {out} is inside the data folder {d}; write it elsewhere (data is never written)")
    return out


def write_csv(result: SuggestResult, out: str | Path, force: bool = False, new_only: bool = False) -> Path:
    from .utils import atomic_write_text

    out = check_out(out, force, result.pool.data_dirs if result.pool is not None else [])
    atomic_write_text(out, csv_text(result, new_only))
    return out


def format_table(result: SuggestResult) -> str:
    lines = [f"{result.rule}: {len(result.suggestions)} of {result.pool_size} unlabelled groups "
             f"({len(result.labelled)} labelled), {result.seconds:.1f} s"]
    lines += [f"  {s.rank:>3}  {s.id:<24} {s.score:>10.4g}  {s.reason}" for s in result.suggestions]
    return "\n".join(lines)
