"""Training streams and evaluation volumes.

Training data is a sequence of *draws*. Item ``(epoch, draw)`` is one combined batch
``{"labeled": {"image", "label"}, "unlabeled": {"image"}}``; which samples and which augmentation
it holds depend only on (seed, draw), so a run resumed at an epoch boundary sees the same data. One process
takes draws epoch·S … epoch·S + S − 1 (S steps per epoch); under DDP with W processes, process r takes draws
(epoch·S + k)·W + r, so the W processes together see exactly what one process sees with a W-times larger batch.
A sparse annotation adds ``label_mask`` (1 where a voxel is annotated) to the labelled part, and a strategy's
per-case targets (``Strategy.target_transform``) add their named maps; all follow the image's augmentation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils import atomic_save_npz, worker_init
from .annotation import SliceAnnotation
from .datasets import Case
from .readers import DataError
from .store import CaseStore
from .transforms import Augment2D, Augment3D, PatchAugment2D

log = logging.getLogger(__name__)
#: ``(image (C, *S), label (*S), label_mask (*S), case id) -> {name: map (*S)}``: a strategy's per-case targets
TargetTransform = Callable[[np.ndarray, np.ndarray, np.ndarray, str], dict[str, np.ndarray]]


def volume_positions(cases: Sequence[Case]) -> dict[str, list[int]]:
    """Positions in ``cases`` of each volume's slices, in slice order (``index``); volumes in order of first
    appearance."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.volume, []).append(i)
    return {v: sorted(ix, key=lambda i: cases[i].index) for v, ix in groups.items()}


def group_by_volume(cases: Sequence[Case]) -> dict[str, list[Case]]:
    """Cases grouped by ``volume`` (in order of first appearance), each volume's slices in order of ``index``."""
    return {v: [cases[i] for i in ix] for v, ix in volume_positions(cases).items()}


@dataclass
class Stream:
    """A sampled stream of cases; ``with_label=False`` streams never read or return masks.

    Random batches by default. With ``partitions`` = S (volume-partition sampling, Chaitanya et al. 2020 §3.1) each
    step draws ``volumes`` = m volumes, splits each volume's ordered slices into S equal chunks and takes one random
    slice per chunk (set 1), then draws set 2 the same way: a batch of 2·m·S slices ordered
    [set 1: volume 1 chunks 0…S−1, volume 2 …| set 2 …], each with its ``partition`` index. ``batch_size`` is then
    2·m·S.

    With ``slab`` = k (odd; 2D datasets) every drawn slice comes with its k − 1 neighbours in its volume (``index``
    order, the volume's end slices repeated), stacked on the channel axis: images are ``(k·C, H, W)`` with the drawn
    slice in the middle, augmented as one image; the label stays the middle slice's (2.5D input)."""

    cases: Sequence[Case]
    batch_size: int
    with_label: bool
    partitions: int | None = None
    volumes: int = 5
    #: generated (image, label) pairs mixed into a labelled stream: ``round(synthetic_ratio · batch_size)`` per batch
    synthetic: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
    synthetic_ratio: float = 0.0
    slab: int | None = None

    def __post_init__(self):
        if not self.cases:
            raise DataError(f"an empty {'labelled' if self.with_label else 'unlabelled'} stream cannot be sampled")
        if self.partitions is not None:
            self.batch_size = 2 * self.volumes * self.partitions
        if self.batch_size < 1:
            raise DataError(f"batch size must be ≥ 1, got {self.batch_size}")
        if self.synthetic and not self.with_label:
            raise DataError("generated pairs carry labels: they can only join a labelled stream")
        if self.slab is not None and (self.slab < 1 or self.slab % 2 == 0):
            raise DataError(f"a slab is an odd number of neighbouring slices (centre ± k), got slab={self.slab}")
        if self.slab is not None and self.synthetic:
            raise DataError("generated pairs are single slices: they cannot join a slab stream")

    def slab_neighbours(self) -> list[list[int]]:
        """For each case, the indices into ``cases`` of its slab (centre ± slab//2, clamped at the volume's ends)."""
        half, out = self.slab // 2, [[] for _ in self.cases]
        for ix in volume_positions(self.cases).values():
            for z, i in enumerate(ix):
                out[i] = [ix[min(max(z + d, 0), len(ix) - 1)] for d in range(-half, half + 1)]
        return out

    @property
    def n_synthetic(self) -> int:
        """Generated pairs per batch (the first slots), at least one when there are any."""
        return max(1, round(self.synthetic_ratio * self.batch_size)) if self.synthetic else 0

    def volume_slices(self) -> list[list[int]]:
        """Indices into ``cases`` of each volume's slices, in slice order (for volume-partition sampling)."""
        by_volume = volume_positions(self.cases)
        vols = [ix for _, ix in sorted(by_volume.items())]
        short = [self.cases[v[0]].volume for v in vols if len(v) < (self.partitions or 1)]
        if short:
            raise DataError(f"volume-partition sampling with {self.partitions} partitions needs at least that many "
                            f"slices per volume; {len(short)} volume(s) have fewer, e.g. {short[0]} "
                            f"({len(by_volume[short[0]])} slices)")
        return vols


@dataclass
class MaskStream:
    """Unpaired masks only (``data.aux_masks``): batches ``{"label": (B, *S)}``, never an image; drawn independently
    of the image streams and augmented with the labels' geometry."""

    masks: Sequence[np.ndarray]
    batch_size: int

    def __post_init__(self):
        if not self.masks:
            raise DataError("an empty auxiliary-mask stream cannot be sampled")
        if self.batch_size < 1:
            raise DataError(f"batch size must be ≥ 1, got {self.batch_size}")


def _mix(*ints: int) -> int:
    return int(np.random.SeedSequence([i % 2**32 for i in ints]).generate_state(1)[0])


class StepBatches(Dataset):
    def __init__(self, store: CaseStore, streams: Mapping[str, Stream], steps_per_epoch: int, seed: int = 0,
                 augment: bool = True, patch_size: Sequence[int] | None = None,
                 image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 annotation: SliceAnnotation | None = None, target_transform: TargetTransform | None = None,
                 target_cache: str | Path | None = None, foreground_ratio: float = 0.0):
        self.store, self.streams, self.steps_per_epoch, self.seed = store, dict(streams), steps_per_epoch, seed
        self.image_transform = image_transform
        self._transformed: dict[str, np.ndarray] = {}
        self.annotation, self.target_transform = annotation, target_transform
        self.target_cache = Path(target_cache) if target_cache is not None else None
        self._targets: dict[str, dict[str, np.ndarray]] = {}
        spec = store.spec
        if spec.spatial_dims == 3:
            if patch_size is None:
                raise DataError(f"dataset '{spec.name}' is 3D: set data.patch_size (e.g. [96, 96, 64])")
            self.augment = Augment3D(patch_size, enabled=augment, foreground_ratio=foreground_ratio)
        elif patch_size is not None:  # 2D patches at the images' own size (or at data.image_size)
            self.augment = PatchAugment2D(patch_size, enabled=augment, foreground_ratio=foreground_ratio)
        else:
            self.augment = Augment2D(enabled=augment)
        self.mask_streams = {k: s for k, s in self.streams.items() if isinstance(s, MaskStream)}
        self.streams = {k: s for k, s in self.streams.items() if k not in self.mask_streams}
        for s in self.streams.values():
            s.cases = store.load(s.cases, s.with_label)
        self._volumes = {name: s.volume_slices() for name, s in self.streams.items() if s.partitions}
        if spec.spatial_dims == 3 and any(s.slab for s in self.streams.values()):
            raise DataError(f"dataset '{spec.name}' is 3D: slab streams stack neighbouring 2D slices")
        self._slabs = {name: s.slab_neighbours() for name, s in self.streams.items() if s.slab}
        if spec.spatial_dims == 3:  # volumes smaller than the patch, structures the patch cannot cover: logged once
            from .geometry import check_patch_coverage, foreground_extent

            items = {(c.id, s.with_label): store.get(c, s.with_label) for s in self.streams.values() for c in s.cases}
            check_patch_coverage([(cid, tuple(it.image.shape[1:]), it.spacing, foreground_extent(it.foreground),
                                   it.native_spacing) for (cid, _), it in items.items()], patch_size)
        labeled = [c for s in self.streams.values() if s.with_label for c in s.cases]
        if any(s.synthetic for s in self.streams.values()) and self._targets_on:
            raise DataError("generated pairs are densely labelled: they cannot be mixed with a sparse annotation or "
                            "a strategy's per-case targets")
        if self.annotation is not None or self.target_transform is not None:
            for k, case in enumerate(labeled):  # once per case, up front (registration may take a minute per case)
                self._case_targets(case)
                log.info("labelled targets: %d/%d cases ready", k + 1, len(labeled))

    def _case_targets(self, case: Case) -> dict[str, np.ndarray]:
        """Per-case ``label`` (sparse when annotated), ``label_mask`` and the strategy's maps; cached in memory and,
        with ``target_cache``, on disk (an interrupted run does not recompute them)."""
        if case.id in self._targets:
            return self._targets[case.id]
        path = self.target_cache / f"{case.id}.npz" if self.target_cache is not None else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                self._targets[case.id] = {k: z[k] for k in z.files}
            return self._targets[case.id]
        item = self.store.get(case, True)
        if self.annotation is not None:
            label, mask, _ = self.annotation(item.label, case.id)
        else:
            label, mask = item.label, np.ones(item.label.shape, dtype=np.float32)
        out = {"label": label, "label_mask": mask}
        if self.target_transform is not None:
            out.update(self.target_transform(item.image, label, mask, case.id))
        if path is not None:
            atomic_save_npz(path, out)
        self._targets[case.id] = out
        return out

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _image(self, case: Case, image: np.ndarray) -> np.ndarray:
        if self.image_transform is None:
            return image
        if case.id not in self._transformed:
            self._transformed[case.id] = self.image_transform(image)
        return self._transformed[case.id]

    def _index(self, stream_id: int, stream: Stream | MaskStream, position: int) -> int:
        n = len(stream.masks) if isinstance(stream, MaskStream) else len(stream.cases)
        block, offset = divmod(position, n)
        return int(np.random.default_rng(_mix(self.seed, stream_id, block)).permutation(n)[offset])

    def _partition_draw(self, sid: int, name: str, step: int) -> tuple[list[int], list[int]]:
        """Case indices and partition indices of one volume-partition batch (see :class:`Stream`)."""
        stream, vols = self.streams[name], self._volumes[name]
        rng = np.random.default_rng(_mix(self.seed, sid, step, 1))
        index, part = [], []
        for _ in range(2):  # set 1, set 2
            for v in rng.choice(len(vols), stream.volumes, replace=len(vols) < stream.volumes):
                for p, chunk in enumerate(np.array_split(np.asarray(vols[v]), stream.partitions)):
                    index.append(int(chunk[rng.integers(len(chunk))]))
                    part.append(p)
        return index, part

    def __getitem__(self, key: tuple[int, int]) -> dict:
        _, step = key
        out = {}
        for sid, (name, stream) in enumerate(sorted(self.streams.items())):
            images, labels, maps = [], [], []
            if stream.partitions:
                index, part = self._partition_draw(sid, name, step)
            else:
                index = [self._index(sid, stream, step * stream.batch_size + j) for j in range(stream.batch_size)]
            n_syn = stream.n_synthetic
            if n_syn:
                drawn = np.random.default_rng(_mix(self.seed, sid, step, 2)).integers(len(stream.synthetic), size=n_syn)
            for j in range(stream.batch_size):
                if j < n_syn:  # a generated pair: augmented like a real one
                    img, lab, _ = self.augment(*stream.synthetic[drawn[j]], _mix(self.seed, sid, step, j))
                    images.append(torch.from_numpy(img))
                    labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
                    maps.append({})
                    continue
                case = stream.cases[index[j]]
                item = self.store.get(case, stream.with_label)
                label, extra = None, None
                if stream.with_label:
                    label = item.label
                    if self._targets_on:
                        extra = dict(self._case_targets(case))
                        label = extra.pop("label")
                image = self._image(case, item.image)
                if stream.slab:  # the slice's neighbours stacked on the channel axis, augmented as one image
                    image = np.concatenate([self._image(stream.cases[k], self.store.get(stream.cases[k],
                                                                                        stream.with_label).image)
                                            for k in self._slabs[name][index[j]]])
                # precomputed foreground voxels for foreground-centred crops (not for a sparse label: its own voxels)
                fg = {"foreground": item.foreground} if stream.with_label and not self._targets_on \
                    and isinstance(self.augment, (Augment3D, PatchAugment2D)) else {}
                img, lab, extra = self.augment(image, label, _mix(self.seed, sid, step, j), extra, **fg)
                images.append(torch.from_numpy(img))
                if stream.with_label:
                    labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
                    maps.append(extra)
            out[name] = {"image": torch.stack(images)}
            if stream.partitions:
                out[name]["partition"] = torch.tensor(part)
            if stream.with_label:
                out[name]["label"] = torch.stack(labels).long()
                for k in maps[0]:
                    out[name][k] = torch.stack([torch.from_numpy(np.ascontiguousarray(m[k])) for m in maps]).float()
        for sid, (name, stream) in enumerate(sorted(self.mask_streams.items()), 1000):  # after the image streams
            labels = []
            for j in range(stream.batch_size):
                mask = stream.masks[self._index(sid, stream, step * stream.batch_size + j)]
                blank = np.zeros((1, *mask.shape), np.float32)  # geometry only: the augmentation needs an image
                labels.append(torch.from_numpy(np.ascontiguousarray(
                    self.augment(blank, mask, _mix(self.seed, sid, step, j))[1])))
            out[name] = {"label": torch.stack(labels).long()}
        return out

    @property
    def _targets_on(self) -> bool:
        return self.annotation is not None or self.target_transform is not None


class EpochSampler(Sampler):
    """Yields ``(epoch, draw)`` for this process's share of the epoch (see the module docstring); Lightning calls
    ``set_epoch`` at every epoch start. Under ``torch.distributed`` the rank and world size are read when iterating."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch, self.epoch = steps_per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch.distributed as dist

        # a generator body runs at the first draw: a resumed Lightning loop calls set_epoch after iter()
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        epoch = self.epoch
        for k in range(self.steps_per_epoch):
            yield epoch, (epoch * self.steps_per_epoch + k) * world + rank

    def __len__(self) -> int:
        return self.steps_per_epoch


def train_loader(batches: StepBatches, num_workers: int = 0) -> DataLoader:
    return DataLoader(batches, sampler=EpochSampler(batches.steps_per_epoch), batch_size=None,
                      num_workers=num_workers, worker_init_fn=worker_init, persistent_workers=False)


@dataclass
class EvalVolume:
    """One evaluation case: network-ready input and the label at the file's own resolution.

    2D: ``image`` is (Z, C, H, W) of the volume's slices at training size; ``label`` is (Z, H0, W0).
    3D: ``image`` is (1, C, X, Y, Z); ``label`` is (X, Y, Z).
    """

    id: str
    image: torch.Tensor
    label: np.ndarray | None
    cases: list[Case]
    size: tuple[int, ...]  # spatial size of one slice (2D) or of the volume (3D) in the file
    #: voxel size (mm) of ``label`` (the file's grid; NIfTI only): distances are then reported in mm
    spacing: tuple[float, ...] | None = None
    #: 3D on a training grid other than the file's (reoriented/resampled): logits (C, *grid) or a label map on the
    #: image's grid → label map on ``label``'s grid (:meth:`~label_efficient.data.geometry.Grid.to_native`); None:
    #: the image is on the label's grid
    to_native: Callable[[np.ndarray | torch.Tensor], np.ndarray] | None = None


def eval_volumes(store: CaseStore, cases: Sequence[Case], with_label: bool = True) -> list[EvalVolume]:
    """Group cases into evaluation volumes (2D slices stacked in order of ``index``)."""
    cases = store.load(cases, with_label)
    out = []
    for vid, cs in group_by_volume(cases).items():
        items = [store.get(c, with_label) for c in cs]
        if store.spec.spatial_dims == 2:
            image = torch.from_numpy(np.stack([it.image for it in items]))
            shapes = {it.original_size for it in items}
            if len(shapes) > 1:
                raise DataError(f"volume {vid}: slices have different sizes {sorted(shapes)}")
            label = np.stack([it.original_label for it in items]) if with_label else None
        else:
            image = torch.from_numpy(items[0].image)[None]
            label = items[0].original_label if with_label else None
        grid = getattr(items[0], "grid", None)
        out.append(EvalVolume(vid, image, label, cs, items[0].original_size,
                              spacing=grid.native_spacing if grid is not None else None,
                              to_native=grid.to_native if grid is not None and not grid.identity else None))
    return out


def volume_loader(volumes: list[EvalVolume]) -> DataLoader:
    return DataLoader(volumes, batch_size=None, collate_fn=lambda v: v, shuffle=False)
