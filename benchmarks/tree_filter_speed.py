"""Throughput of the DSAIF tree filter (label_efficient.transforms.tree_filter).

Prints filtered images/s for 2D 128x128 images and 3D 96x96x64 volumes (D=64),
for the Max-tree and the Min-tree, single-threaded.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/tree_filter_speed.py --repeats 20
    OMP_NUM_THREADS=1 python benchmarks/tree_filter_speed.py --data-root /work/shared/data/acdc

Inputs: without ``--data-root``, Gaussian-smoothed uniform noise quantised to
256 levels. With ``--data-root``, real PNG slices from ``<root>/images/*.png``:
2D inputs are 128x128 centre crops (zero-padded if smaller) of the slices; 3D
inputs are stacks of 64 consecutive 96x96 centre crops of the sorted slices
(ACDC volumes have <= 18 slices, so a stack spans several volumes: realistic
intensities, not a real anatomy in depth).

It needs the installed ``label_efficient`` package (``pip install -e .``) and no
other benchmark script; it prints its numbers and writes no rows.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TBB_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from label_efficient.transforms.tree_filter import tree_filter  # noqa: E402

SHAPE_2D = (128, 128)
SHAPE_3D = (64, 96, 96)  # (D, H, W): a 96x96x64 volume


def synthetic(shape: tuple[int, ...], n: int, seed: int = 0) -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = gaussian_filter(rng.random(shape), sigma=2.0)
        x = (x - x.min()) / (x.max() - x.min())
        out.append(np.rint(x * 255).astype(np.uint8))
    return out


def centre_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    pad = [(max(0, (h - img.shape[0] + 1) // 2),) * 2, (max(0, (w - img.shape[1] + 1) // 2),) * 2]
    img = np.pad(img, pad)
    y0 = (img.shape[0] - h) // 2
    x0 = (img.shape[1] - w) // 2
    return img[y0 : y0 + h, x0 : x0 + w]


def acdc(root: Path, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted((root / "images").glob("*.png"))
    if not files:
        raise SystemExit(f"no PNG files in {root / 'images'}")
    hw = shape[-2:]
    depth = shape[0] if len(shape) == 3 else 1
    if len(files) < depth:
        raise SystemExit(f"need at least {depth} PNG files, found {len(files)}")
    # n stacks of `depth` consecutive slices, start indices spread evenly over the data set
    starts = np.linspace(0, len(files) - depth, n).astype(int)
    stacks = [
        np.stack([centre_crop(np.asarray(Image.open(f).convert("L")), hw) for f in files[s : s + depth]])
        for s in starts
    ]
    return [st[0] for st in stacks] if len(shape) == 2 else stacks


def bench(images: list[np.ndarray], tree: str, repeats: int, area_threshold: int) -> tuple[float, float]:
    tree_filter(images[0], tree, area_threshold)  # warm-up (graph cache, imports)
    flat = 0
    t0 = time.perf_counter()
    for i in range(repeats):
        out = tree_filter(images[i % len(images)], tree, area_threshold)
        flat += int(out.min() == out.max())
    dt = time.perf_counter() - t0
    return repeats / dt, flat / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed filter calls per configuration (default 20)")
    ap.add_argument("--data-root", type=Path, default=None, help="ACDC-style root with images/*.png")
    ap.add_argument("--area-threshold", type=int, default=50)
    ap.add_argument("--skip-3d", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    n_pool = min(args.repeats, 8)
    shapes = [("2D 128x128", SHAPE_2D)] + ([] if args.skip_3d else [("3D 96x96x64", SHAPE_3D)])
    src = "ACDC " + str(args.data_root) if args.data_root else "synthetic smooth noise"
    print(f"source: {src}; area_threshold={args.area_threshold}; repeats={args.repeats}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for name, shape in shapes:
        images = acdc(args.data_root, shape, n_pool) if args.data_root else synthetic(shape, n_pool)
        for tree in ("max", "min"):
            ips, flat = bench(images, tree, args.repeats, args.area_threshold)
            print(f"{name:12s} {tree}-tree: {ips:8.2f} images/s  ({1e3 / ips:8.2f} ms/image; "
                  f"{100 * flat:.0f}% outputs constant)")


if __name__ == "__main__":
    main()
