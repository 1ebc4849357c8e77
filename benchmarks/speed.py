"""Step overhead: a strategy in our Lightning module and in a plain loop, against a raw PyTorch loop doing the
same forward/backward passes on the same pre-built batches (ACDC slices at the ACDC-CPU protocol's size).

    python benchmarks/speed.py [--steps 100] [--threads 2] [--repeats 5] [--strategies mean_teacher ...]
    # the official BCP configuration (its U-Net, batch 12 + 12, SGD), for the side-by-side with its script:
    python benchmarks/speed.py --backbone basic_unet --batch 12 --optimizer sgd --strategies bcp --out speed_bcp.json

Run it alone on the machine: another busy process changes the numbers by 20–40× on 2 cores. It imports only
``benchmarks/common.py`` (and torch inside the measuring functions); ``section(rows)`` is its part of RESULTS.md,
from every ``results/speed*.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from common import RESULTS_DIR, load_rows, md_table, write_json


def batches(n: int, size: int, nl: int, nu: int):
    from label_efficient.data import CaseStore, LabelBudget, StepBatches, Stream, build_dataset, split_labeled

    spec = build_dataset("acdc")
    lab, unl = split_labeled(spec.select("train"), LabelBudget(flag="labeled_7"))
    sb = StepBatches(CaseStore(spec, (size, size)), {"labeled": Stream(lab, nl, True),
                                                     "unlabeled": Stream(unl[:200], nu, False)}, n)
    return [sb[(0, i)] for i in range(n)]


BACKBONE, OPTIMIZER = "unet", "adamw"  # set in main()
OPTIMIZERS = {"adamw": dict(name="adamw", lr=3e-3, weight_decay=0.01),
              "sgd": dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)}


def model():
    from label_efficient.backbones import build_backbone
    from label_efficient.utils import use_channels_last

    if BACKBONE == "unet":
        return build_backbone("unet", 2, 1, 4, channels=[16, 32, 64, 128, 256], num_res_units=0)
    return use_channels_last(build_backbone(BACKBONE, 2, 1, 4))  # as the runner builds it (trainer.channels_last)


def _optimizer(params):
    import torch

    kw = dict(OPTIMIZERS[OPTIMIZER])
    return (torch.optim.SGD if kw.pop("name") == "sgd" else torch.optim.AdamW)(params, **kw)


def _timed(data, steps, step) -> float:
    """Steps per second of ``step(i, batch)`` over ``data``, after 5 warm-up steps."""
    t0 = 0.0
    for i, b in enumerate(data[:steps]):
        if i == 5:
            t0 = time.perf_counter()
        step(i, b)
    return (steps - 5) / (time.perf_counter() - t0)


PRECISION = None  # set in main(): the precision ``trainer.precision: auto`` picks on this host


def _autocast():
    """bf16 autocast only where the CPU runs it natively (label_efficient.precision), else plain fp32."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if PRECISION == "bf16-mixed" else contextlib.nullcontext()


def _loss_fn():
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True, lambda_dice=0.5, lambda_ce=0.5)


def _student_teacher():
    """A fresh student, its frozen copy, ½(CE+Dice) and the optimizer — the setup every raw loop shares."""
    import copy

    net = model().train()
    return net, copy.deepcopy(net).eval(), _loss_fn(), _optimizer(net.parameters())


def raw_supervised(data, steps):
    """The hand-written loop a user would write: forward, ½(CE+Dice), backward, step."""
    net, _, loss_fn, opt = _student_teacher()

    def step(i, b):
        with _autocast():
            loss = loss_fn(net(b["labeled"]["image"]), b["labeled"]["label"][:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _timed(data, steps, step)


def raw_mean_teacher(data, steps):
    import torch

    net, teacher, loss_fn, opt = _student_teacher()
    teacher.train()  # SSL4MIS: the teacher normalises its noisy input with batch statistics

    def step(i, b):
        xl, yl, xu = b["labeled"]["image"], b["labeled"]["label"], b["unlabeled"]["image"]
        with _autocast():
            out = net(torch.cat([xl, xu]))
            with torch.no_grad():
                t = teacher(xu + (torch.randn_like(xu) * 0.1).clamp(-0.2, 0.2)).softmax(1)
            loss = loss_fn(out[: len(xl)], yl[:, None]) + 0.1 * ((out[len(xl):].softmax(1) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), net.parameters()):
                pt.mul_(0.99).add_(ps, alpha=0.01)
            for bt, bs in zip(teacher.buffers(), net.buffers()):
                bt.copy_(bs) if not bt.dtype.is_floating_point else bt.mul_(0.99).add_(bs, alpha=0.01)

    return _timed(data, steps, step)


def raw_bcp_passes(data, steps):
    """Only the network passes a BCP self-training step needs: teacher on u and v (no grad), student
    forward/backward on the two mixed halves, ½(CE+Dice) — no box mask, mixing or component cleaning."""
    import torch

    net, teacher, loss_fn, opt = _student_teacher()

    def step(i, b):
        xl, yl, xu = b["labeled"]["image"], b["labeled"]["label"], b["unlabeled"]["image"]
        with _autocast():
            with torch.no_grad():
                teacher(xu[: len(xu) // 2]), teacher(xu[len(xu) // 2 :])
            loss = loss_fn(net(torch.cat([xu[: len(xu) // 2], xl[len(xl) // 2 :]])), yl[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _timed(data, steps, step)


def strategy_loop(name, data, steps):
    from label_efficient.strategies import build_strategy

    s = build_strategy(name, model(), 4)
    s.setup(steps)
    s.train()
    opt = _optimizer(s.trainable_parameters())

    def step(i, b):
        with _autocast():
            out = s.training_step(b, i)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        s.after_optimizer_step(i)

    return _timed(data, steps, step)


class _Timer:
    def __init__(self):
        import pytorch_lightning as pl

        class T(pl.Callback):
            def __init__(self):
                self.t0, self.n = None, 0

            def on_train_batch_start(self, trainer, *a):
                if trainer.global_step == 5:
                    self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, *a):
                self.t1 = time.perf_counter()
                self.n = trainer.global_step

        self.cb = T()


def lightning_loop(name, data, steps):
    import pytorch_lightning as pl
    import torch

    from label_efficient.lightning import StrategyModule
    from label_efficient.recipe import OptimizerConfig
    from label_efficient.strategies import build_strategy

    s = build_strategy(name, model(), 4)
    module = StrategyModule(s, OptimizerConfig(**OPTIMIZERS[OPTIMIZER], schedule="constant"), steps)
    timer = _Timer().cb
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, precision=PRECISION, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data[:steps], batch_size=None))
    return (timer.n - 5) / (timer.t1 - timer.t0)


RAW = {"supervised": raw_supervised, "mean_teacher": raw_mean_teacher, "bcp": raw_bcp_passes}


def load_results() -> dict:
    """Every ``results/speed*.json``, by file name."""
    return {f.name: load_rows(f) for f in sorted(RESULTS_DIR.glob("speed*.json"))}


def section(rows: dict) -> str:
    speed = [r for f in rows.values() for r in f]
    if not speed:
        return ""
    spread = max(abs(x / statistics.median(v) - 1) for r in speed for v in r["repeats"].values() for x in v)
    table = md_table(["strategy", "backbone", "batch", "precision", "threads", "raw it/s", "Lightning it/s",
                      "Lightning s/it", "overhead", "plain-loop it/s", "peak RSS MB"],
                     [[r["strategy"], r.get("backbone", "unet"), f"{r.get('batch', 8)} + {r.get('batch', 8)}",
                       r.get("precision", "bf16-mixed"), r["threads"], f"{r['raw_its']:.2f}", f"{r['lightning_its']:.2f}",
                       f"{1 / r['lightning_its']:.2f}", f"{r['overhead_pct']:+.1f} %", f"{r['strategy_loop_its']:.2f}",
                       f"{r['peak_rss_mb']:.0f}"] for r in speed])
    return "\n".join([
        "## Step time against a raw PyTorch loop", "",
        "`python benchmarks/speed.py [--backbone basic_unet --batch 12 --optimizer sgd --strategies bcp --out "
        "speed_bcp_official_config.json]`: the same pre-built ACDC batches (128²), run alone; median of interleaved "
        f"repeats (raw, Lightning, plain loop, raw, …; in these rows one repeat lies up to {100 * spread:.0f} % from "
        "its median). The raw loop is hand-written PyTorch doing the same network passes (for BCP: only the teacher "
        "and student passes, so the overhead includes box masks, mixing and connected-component cleaning). Lightning = "
        "our `StrategyModule` in a `Trainer`; plain loop = the strategy object in a 10-line loop.", "", table, ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    ap.add_argument("--strategies", nargs="*", default=list(RAW), choices=list(RAW))
    ap.add_argument("--backbone", default="unet", help="zoo name; `unet` is the MONAI U-Net 16…256 of the old table")
    ap.add_argument("--batch", type=int, default=8, help="labelled and unlabelled images per step, each")
    ap.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    ap.add_argument("--out", default="speed.json", help="file name under benchmarks/results/")
    ap.add_argument("--precision", default="auto", help="auto (what trainer.precision: auto picks here), 32-true, "
                                                        "bf16-mixed")
    args = ap.parse_args()
    global BACKBONE, OPTIMIZER
    BACKBONE, OPTIMIZER = args.backbone, args.optimizer
    results = RESULTS_DIR / args.out
    import logging

    import torch

    torch.set_num_threads(args.threads)

    from label_efficient.precision import resolve_precision

    global PRECISION
    PRECISION = resolve_precision(args.precision, "cpu")

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data = batches(args.steps, 128, args.batch, args.batch)
    rows = {r["strategy"]: r for r in load_rows(results)}
    for name in args.strategies:
        # Interleaved repeats (raw, Lightning, plain loop, raw, ...): a slow drift of the machine hits all three alike.
        its: dict[str, list[float]] = {"raw": [], "lightning": [], "loop": []}
        for _ in range(args.repeats):
            its["raw"].append(RAW[name](data, args.steps))
            its["lightning"].append(lightning_loop(name, data, args.steps))
            its["loop"].append(strategy_loop(name, data, args.steps))
        # Medians: on this 2-core VM one 100-step measurement moves by up to ±20 %, and a best-of picks outliers.
        r, lt, sl = (statistics.median(its[k]) for k in ("raw", "lightning", "loop"))
        rows[name] = {"strategy": name, "raw_its": r, "lightning_its": lt, "strategy_loop_its": sl,
                     "overhead_pct": 100 * (r / lt - 1), "loop_overhead_pct": 100 * (r / sl - 1),
                     "threads": args.threads, "steps": args.steps, "statistic": "median", "precision": PRECISION,
                     "backbone": BACKBONE, "batch": args.batch, "optimizer": OPTIMIZER,
                     "repeats": {k: [round(x, 3) for x in v] for k, v in its.items()},
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(json.dumps(rows[name]), flush=True)
    write_json(results, [rows[k] for k in RAW if k in rows])


if __name__ == "__main__":
    main()
