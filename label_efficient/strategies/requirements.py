"""What a strategy needs from the loop, declared once per strategy and read in one place (``label_efficient.planning``).

A strategy class sets ``requires = Requirements(...)``; recipe validation, the stage plan (which streams to build,
which checkpoint to keep, whether to score the test split), the sweep and the batch check all read it through
:func:`label_efficient.planning.plan_stage` or :func:`check_batch`, never through ad-hoc flags.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch

STREAMS = ("labeled", "unlabeled", "aux_masks")


class LabelLeakError(RuntimeError):
    """A label reached a strategy through a stream that must be unlabelled."""


@dataclass(frozen=True)
class Requirements:
    #: the batch streams the strategy consumes (``labeled``: images with labels; ``unlabeled``: images, never a
    #: label; ``aux_masks``: unpaired masks, never an image — see ``data.aux_masks``)
    streams: tuple[str, ...] = ("labeled",)
    #: the labels it learns from: ``dense``; ``sparse`` (dense too, and it honours ``label_mask`` of a sparse
    #: annotation); ``none`` (no training label: every train image arrives unlabelled, the budget is ignored)
    labels: Literal["dense", "sparse", "none"] = "dense"
    #: what the stage hands on: ``segmenter`` (scored on the test split), ``pretrainer`` (features or an embedding:
    #: nothing to score; its ``model.pt`` / ``handover_parts`` pass on), ``generator`` (after training,
    #: ``generate`` writes image–label pairs for later stages, see ``data.synthetic``), ``adapter`` (source-free
    #: adaptation: a trained model and unlabelled target images only, never a label or a source image)
    role: Literal["segmenter", "pretrainer", "generator", "adapter"] = "segmenter"
    #: the image scaling its fixed constants assume (``"unit"``: intensities in [0, 1]); None: any
    intensity: str | None = None
    #: the image dimensionalities it works on
    spatial_dims: tuple[int, ...] = (2, 3)
    #: names of the optimizers it steps itself, in order, once each per training step; empty: one optimizer, stepped
    #: by the loop on the returned loss
    optimizers: tuple[str, ...] = ()
    #: a generator of a 2D dataset that receives whole volumes (Z, C, H, W), e.g. a 2.5D translator
    generates_volumes: bool = False

    def __post_init__(self):
        bad = [s for s in self.streams if s not in STREAMS]
        if bad:
            raise ValueError(f"unknown stream(s) {bad}; streams are {STREAMS}")
        if self.labels == "none" and "labeled" in self.streams:
            raise ValueError("a strategy without training labels (labels='none') cannot consume a 'labeled' stream")

    @property
    def label_free(self) -> bool:
        """Trains without any label (self-/unsupervised); its data is every train image, unlabelled."""
        return self.labels == "none" and self.role != "adapter"

    @property
    def source_free(self) -> bool:
        return self.role == "adapter"

    @property
    def segments(self) -> bool:
        """Its exported network is a segmenter, scored on the test split."""
        return self.role in ("segmenter", "adapter")


def check_batch(name: str, requires: Requirements, batch: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Refuse a batch that misses a stream the strategy needs or carries a label where none may be."""
    for stream in requires.streams:
        if stream not in batch:
            article = "an" if stream[0] in "aeiou" else "a"
            raise KeyError(f"strategy '{name}' needs {article} '{stream}' stream; batch has {sorted(batch)}")
    if "label_mask" in batch.get("labeled", {}) and requires.labels != "sparse":
        raise ValueError(f"strategy '{name}' does not take sparse labels (label_mask); use one whose requirements "
                         "have labels='sparse'")
    if "image" in batch.get("aux_masks", {}):
        raise LabelLeakError("the auxiliary-mask stream carries an 'image': its masks must stay unpaired")
    if "label" in batch.get("unlabeled", {}):
        raise LabelLeakError("the unlabelled stream carries a 'label': labels must never reach unlabelled data")
    if requires.source_free and "labeled" in batch:
        raise LabelLeakError(f"'{name}' is source-free: it takes unlabelled target images only, but the batch "
                             "has a 'labeled' stream (source data or target labels)")
