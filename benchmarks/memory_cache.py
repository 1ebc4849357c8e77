"""Peak memory of the case store in memory vs on disk (memory-mapped ``data.cache_dir``), issue 29.

    OMP_NUM_THREADS=1 python benchmarks/memory_cache.py [--copies 10] [--batches 20] [--patch 112 112 80]

The 24 LA volumes are repeated under new names (symlinks in a temporary folder: 24 × copies cases, 240 by default)
as a ``nifti_folder`` dataset; each mode runs in a fresh process that builds a :class:`CaseStore` with every case
labelled, a ``StepBatches`` stream over all of them (batch 2, the LA v2 crop), and draws ``--batches`` batches.
Recorded per mode: the build time, the mean step time, the peak resident set (``VmHWM``: anonymous + file-backed
pages) and the peak anonymous memory (``RssAnon``, sampled every 20 ms: what cannot be evicted; the memory-mapped
pages of the disk cache are file-backed page cache the kernel can drop). ``disk (cold)`` builds the cache,
``disk (warm)`` is a second process reading it. Results: ``results/memory_cache.json``. It needs the installed
``label_efficient`` package (``pip install -e .``) and imports no other benchmark script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "memory_cache.json"


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_root(tmp: Path, copies: int) -> Path:
    from label_efficient.data.datasets import default_root

    la = default_root("la_heart")
    for sub in ("imagesTr", "labelsTr"):
        (tmp / sub).mkdir(parents=True)
        for f in sorted((la / sub).glob("*.nii.gz")):
            stem = f.name[: -len(".nii.gz")]
            for k in range(copies):
                (tmp / sub / f"{stem}_r{k:02d}.nii.gz").symlink_to(f)
    return tmp


def child(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from label_efficient.data import CaseStore, StepBatches, Stream, build_dataset

    peak = {"anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status("RssAnon"))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    spec = build_dataset("nifti_folder", args.root, num_classes=2)
    t0 = time.perf_counter()
    store = CaseStore(spec, orientation="RAS", cache_dir=args.cache if args.mode == "disk" else None)
    batches = StepBatches(store, {"labeled": Stream(spec.cases, 2, True)}, args.batches, seed=0,
                          patch_size=args.patch, foreground_ratio=1 / 3)
    build = time.perf_counter() - t0
    after_build = _status("RssAnon")
    times = []
    for k in range(args.batches):
        t1 = time.perf_counter()
        b = batches[(0, k)]
        times.append(time.perf_counter() - t1)
        assert b["labeled"]["image"].shape[2:] == tuple(args.patch)
    stop.set()
    t.join()
    return {"cases": len(spec.cases), "build_s": round(build, 1), "step_s": round(float(np.mean(times)), 4),
            "peak_rss_mb": round(_status("VmHWM") / 2**20), "peak_anon_mb": round(max(peak["anon"], _status("RssAnon")) / 2**20),
            "anon_after_build_mb": round(after_build / 2**20)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--patch", type=int, nargs=3, default=[112, 112, 80])
    p.add_argument("--modes", nargs="+", default=["disk", "memory"])
    p.add_argument("--child", choices=["memory", "disk"])
    p.add_argument("--root")
    p.add_argument("--cache")
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="le_memcache_") as tmp:
        root, cache = make_root(Path(tmp) / "data", args.copies), Path(tmp) / "cache"
        runs = [("disk", "disk (cold)"), ("disk", "disk (warm)")] if "disk" in args.modes else []
        runs += [("memory", "memory")] if "memory" in args.modes else []
        for mode, name in runs:
            cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--cache", str(cache),
                   "--batches", str(args.batches), "--patch", *map(str, args.patch)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:12s} {rows[name]}", flush=True)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    result = {"what": "CaseStore on LA volumes repeated under new names, every case labelled; StepBatches batch 2, "
                      f"patch {args.patch}, foreground_ratio 1/3, {args.batches} batches, 1 thread",
              "copies": args.copies, "cache_mb": round(size / 2**20), "rows": rows}
    RESULT.parent.mkdir(exist_ok=True)
    saved = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    runs = saved.get("runs") or ({str(saved["copies"] * 24): saved} if saved else {})  # one entry per case count
    before = runs.get(str(24 * args.copies), {}).get("rows", {})
    result["rows"] = {**before, **rows}  # a run of some modes keeps the other modes' rows
    if not rows.get("disk (cold)") and "cache_mb" in runs.get(str(24 * args.copies), {}):
        result["cache_mb"] = runs[str(24 * args.copies)]["cache_mb"]
    runs[str(24 * args.copies)] = result
    RESULT.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"cache on disk: {result['cache_mb']} MB; written {RESULT}")


def load_results() -> dict:
    return json.loads(RESULT.read_text()) if RESULT.is_file() else {}


def section(saved: dict) -> str:
    """RESULTS.md section: peak memory against the number of cases, in memory and memory-mapped from disk."""
    runs = saved.get("runs") or {}
    if not runs:
        return ""
    body = []
    for cases, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
        for mode, m in r["rows"].items():
            body.append(f"| {cases} | {mode} | {m['build_s']:.1f} | {m['step_s'] * 1000:.0f} | {m['peak_rss_mb']} | "
                        f"{m['peak_anon_mb']} | {r['cache_mb'] if mode.startswith('disk') else ''} |")
    what = next(iter(runs.values()))["what"]
    return ("## Memory: cases larger than RAM (disk cache)\n\n"
            f"`OMP_NUM_THREADS=1 python benchmarks/memory_cache.py --copies N` ({what}; N × 24 cases). Peak RSS "
            "counts the memory-mapped pages of the disk cache, page cache the kernel can drop; peak anonymous memory "
            "is what cannot be evicted. The disk cache re-maps a case at every access, so a sample's pages are unmapped once it is used.\n\n"
            "| cases | mode | build s | step ms | peak RSS MB | peak anonymous MB | cache on disk MB |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(body) + "\n")


if __name__ == "__main__":
    main()
