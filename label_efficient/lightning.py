"""Lightning adapter: one ``LightningModule`` drives any :class:`~label_efficient.strategies.Strategy`."""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .data.loaders import EvalVolume
from .checkpoints import AtomicCheckpointIO, CheckpointMismatchError, check_meta, load_state  # noqa: F401
from .evaluation import case_metrics, flip_consistency, predict_volume
from .optim import build_optimizer, build_optimizers, optimizer_names  # noqa: F401  (public here)
from .recipe import OptimizerConfig
from .strategies.base import NonFiniteLossError, Strategy
from .utils import atomic_torch_save, atomic_write_text, fault_point, seed_everything


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in ``save_dir`` that keeps what an interrupted run logged before ``resume_step`` (Lightning's
    CSV writer deletes the file when it starts, so a resumed run's learning curve would begin at the resume step)."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None):
        super().__init__(save_dir, name="", version="")
        self._resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is not None or self._resume_step is None:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        header, kept = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [r for r in reader if _step_of(r) is not None and _step_of(r) < self._resume_step]
        writer = super().experiment  # removes metrics.csv
        if kept and hasattr(writer, "metrics_keys"):  # rank 0 only (other ranks get a dummy writer)
            writer.metrics_keys = sorted(header)  # the writer appends rows in this column order
            text = io.StringIO(newline="")
            w = csv.DictWriter(text, fieldnames=writer.metrics_keys)
            w.writeheader()
            w.writerows(kept)
            atomic_write_text(path, text.getvalue())
        return writer


def _step_of(row: dict) -> int | None:
    """The step of a ``metrics.csv`` row, or None for a row a kill cut short."""
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class StrategyModule(pl.LightningModule):
    """Runs ``strategy.training_step`` each step, its hooks after the optimizer step and at epoch end,
    and scores validation volumes for model selection: per-volume Dice (``val/mean_dice``) on labelled volumes,
    :func:`~label_efficient.evaluation.flip_consistency` (``val/label_free``) on volumes loaded without masks, or,
    with ``val_loss=True``, the strategy's :meth:`~Strategy.validation_loss` on those images (``val/loss``).

    A strategy with named ``optimizers`` runs under Lightning's manual optimisation: it steps each optimizer once per
    step through :meth:`Strategy.optimizer_step` (with ``manual_backward``), so Lightning's ``global_step`` advances
    by the number of its optimizers per training step (:attr:`optimizer_steps_per_step`)."""

    def __init__(self, strategy: Strategy, optimizer: OptimizerConfig | dict[str, OptimizerConfig], total_steps: int,
                 seed: int = 0, spatial_dims: int = 2, roi_size: Sequence[int] | None = None, meta: dict | None = None,
                 overlap: float = 0.5, val_loss: bool = False):
        super().__init__()
        self.strategy = strategy
        self.val_loss = val_loss
        self.optimizer_names = optimizer_names(strategy)
        self.automatic_optimization = not self.optimizer_names
        self.optimizer_cfg = optimizer
        self.total_steps = total_steps
        self.seed = seed
        self.spatial_dims = spatial_dims
        self.roi_size = roi_size
        self.overlap = overlap
        self.meta = meta or {}
        self._val_scores: dict[str, list[float]] = {}
        self._seconds_before = 0.0  # time spent by earlier, interrupted runs of this stage (from the checkpoint)
        self._fit_start: float | None = None
        strategy.setup(total_steps)

    @property
    def train_seconds(self) -> float:
        """Wall time of this stage's training (validation included), summed over interrupted and resumed runs."""
        return self._seconds_before + (time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0)

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        # Re-seeding at each epoch makes a run resumed from an epoch-end checkpoint bit-identical.
        seed_everything(self.seed * 100_003 + self.current_epoch)

    @property
    def optimizer_steps_per_step(self) -> int:
        return max(1, len(self.optimizer_names))

    @property
    def step_index(self) -> int:
        """Training steps done (``global_step`` counts optimizer steps)."""
        return self.global_step // self.optimizer_steps_per_step

    def training_step(self, batch, batch_idx):
        fault_point("step")
        if not self.automatic_optimization:
            return self._manual_step(batch)
        out = self.strategy.training_step(batch, self.global_step)
        self._check_finite(out)
        return self._log_step(batch, out)

    def _manual_step(self, batch):
        step, before = self.step_index, self.global_step
        opts = self.optimizers()
        self.strategy.bind_optimizers(dict(zip(self.optimizer_names, opts if isinstance(opts, list) else [opts])),
                                      backward=self.manual_backward)
        out = self.strategy.training_step(batch, step)
        if self.global_step - before != self.optimizer_steps_per_step:
            raise RuntimeError(f"strategy '{self.strategy.name}' must step each of its optimizers "
                               f"{list(self.optimizer_names)} exactly once per training step; it made "
                               f"{self.global_step - before} optimizer steps at step {step}")
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else [scheds]:
            s.step()
        self._check_finite(out)
        self._log_step(batch, out)

    def _check_finite(self, out) -> None:
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"loss is {out.loss.item()} at step {self.step_index} (strategy '{self.strategy.name}'); "
                f"logs: { {k: float(v) for k, v in out.logs.items()} }. The last good checkpoint is kept."
            )

    def _log_step(self, batch, out):
        """The step's values, logged only at the steps Lightning writes (every ``log_every_n_steps``): a
        ``self.log`` call costs about a millisecond, most of this module's overhead over a raw loop at small
        steps. The written logs are the same; the progress bar shows the last written loss."""
        if self._writes_logs():
            n = next(iter(batch.values()))["image"].shape[0]
            self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=n)
            for k, v in out.logs.items():
                self.log(f"train/{k}", float(v), batch_size=n)
        return out.loss

    def _writes_logs(self) -> bool:
        """Whether Lightning writes this training step's logged values (its ``should_update_logs``, read in the
        step as its logger connector reads it after; True outside a Trainer or where the check is missing)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or not hasattr(connector, "should_update_logs") or connector.should_update_logs \
            or bool(self._trainer.fast_dev_run)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.strategy.after_optimizer_step(self.step_index - 1)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, EvalVolume):  # moved slice by slice (or window by window) in predict_volume
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def validation_step(self, volume, batch_idx):
        kw = {"roi_size": self.roi_size, "device": self.device, "overlap": self.overlap}
        if self.val_loss:  # the strategy's objective, with the same sampled terms at every validation
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed * 1_000_003 + batch_idx)
                loss = self.strategy.validation_loss({"unlabeled": {"image": volume.image.to(self.device)}})
            self._val_scores.setdefault("val/loss", []).append(float(loss))
            return
        if volume.label is None:  # loaded without its mask: the label-free score
            self._val_scores.setdefault("val/label_free", []).append(
                flip_consistency(self.strategy.predict, volume, self.spatial_dims, **kw))
            return
        pred = predict_volume(self.strategy.predict, volume, self.spatial_dims, **kw)
        dice = case_metrics(pred, volume.label, self.strategy.num_classes, ["dice"])["dice"]
        self._val_scores.setdefault("val/mean_dice", []).append(float(np.mean(list(dice.values()))))

    @torch.no_grad()
    def score(self, volumes) -> dict[str, float]:
        """The validation scores of ``volumes`` for the current weights, outside a Trainer (eval mode)."""
        was_training = self.strategy.training
        self.strategy.eval()
        for i, volume in enumerate(volumes):
            self.validation_step(volume, i)
        self.strategy.train(was_training)
        out = {k: float(np.mean(v)) for k, v in self._val_scores.items()}
        self._val_scores.clear()
        return out

    def on_validation_epoch_end(self) -> None:
        for key, values in self._val_scores.items():
            self.log(key, float(np.mean(values)), prog_bar=True, sync_dist=True)
        self._val_scores.clear()

    def configure_optimizers(self):
        pairs = build_optimizers(self.strategy, self.optimizer_cfg, self.total_steps)
        return [{"optimizer": o, "lr_scheduler": {"scheduler": s, "interval": "step"}} for o, s in pairs]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["label_efficient"] = self.meta
        checkpoint["label_efficient_train_seconds"] = self.train_seconds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_meta(checkpoint.get("label_efficient", {}), self.meta, "checkpoint")
        self._seconds_before = float(checkpoint.get("label_efficient_train_seconds", 0.0))

