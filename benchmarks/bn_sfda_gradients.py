"""Does BN-SFDA's entropy term move anything? Gradient of L_SE vs L_HBS on the BN scales γ of a source model.

    python benchmarks/bn_sfda_gradients.py [--model benchmarks/runs/sfda_shift/source_s1337/model.pt]

The default model is ``benchmarks/sfda_shift.py``'s source model (seed 1337; run that benchmark first); the batch is 16
unlabelled target slices of its ``no_inversion`` scanner. γ is moved off the source by N(0, 1e-4) first, as after one
adaptation step (at γ^T = γ^S exactly, |·|'s subgradient is 0). Prints the median |∂L/∂γ| of each term over all BN
channels and the share of channels where the entropy gradient is the larger one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    from label_efficient.backbones.taps import batchnorm_layers
    from label_efficient.data import CaseStore, build_dataset
    from label_efficient.runner import load_bundle
    from label_efficient.strategies import build_strategy
    from label_efficient.strategies.bn_sfda import mean_entropy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "runs" / "sfda_shift" / "source_s1337" / "model.pt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_bundle(args.model)[0]
    spec = build_dataset("simulated_shift", base="acdc", invert=False)
    store = CaseStore(spec, (64, 64))
    x = torch.stack([torch.from_numpy(store.get(c, False).image) for c in spec.select("train", "target")[:400:25]])
    s = build_strategy("bn_sfda", model, spec.num_classes).train()
    bns = batchnorm_layers(s.model)
    with torch.no_grad():
        for _, bn in bns:
            bn.weight.add_(1e-4 * torch.randn_like(bn.weight))
    gammas = [bn.weight for _, bn in bns]
    l_se = mean_entropy(s.model(x).float().softmax(1))
    g_se = torch.cat([g.abs().flatten() for g in torch.autograd.grad(l_se, gammas)])
    g_hbs = torch.cat([g.abs().flatten() for g in torch.autograd.grad(s.high_order_loss(), gammas)])
    print(f"L_SE {float(l_se):.4f}; median |dL_SE/dγ| {float(g_se.median()):.3g}, median |dL_HBS/dγ| "
          f"{float(g_hbs.median()):.3g} (ratio {float(g_se.median() / g_hbs.median()):.2g}); channels where the "
          f"entropy gradient is larger: {float((g_se > g_hbs).float().mean()):.1%} of {len(g_se)}")


if __name__ == "__main__":
    main()
