"""Step overhead: a strategy in our Lightning module and in a plain loop, against a raw PyTorch loop doing the
same forward/backward passes on the same pre-built batches (ACDC slices at the ACDC-CPU protocol's size; DeSCO:
synthetic 3D crops, see ``desco_batches``).

    python benchmarks/speed.py [--steps 100] [--threads 2] [--repeats 5] [--strategies mean_teacher ...]
    # the official BCP configuration (its U-Net, batch 12 + 12, SGD), for the side-by-side with its script:
    python benchmarks/speed.py --backbone basic_unet --batch 12 --optimizer sgd --strategies bcp --out speed_bcp.json

Every strategy in ``RAW`` (one per registered name) runs its default config; each raw loop's docstring says which
passes it makes and what it leaves out (stored in the row as ``raw_passes``). Run it alone on the machine: another
busy process changes the numbers by 20–40× on 2 cores. It imports only ``benchmarks/common.py`` (and torch inside
the measuring functions); ``section(rows)`` is its part of RESULTS.md, from every ``results/speed*.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from common import RESULTS_DIR, ROOT, load_rows, md_table, write_json


def batches(n: int, size: int, nl: int, nu: int, streams=("labeled", "unlabeled"), options: dict | None = None,
            image_transform=None):
    """``n`` ACDC steps at ``size``² of ``streams`` (labelled: the ``labeled_7`` cases, ``nl`` a step; unlabelled: 200
    others, ``nu``); ``options``: per-stream ``Stream`` options (``partitions``, ``slab``)."""
    from label_efficient.data import CaseStore, LabelBudget, StepBatches, Stream, build_dataset, split_labeled

    spec = build_dataset("acdc")
    lab, unl = split_labeled(spec.select("train"), LabelBudget(flag="labeled_7"))
    args = {"labeled": (lab, nl, True), "unlabeled": (unl[:200], nu, False)}
    chosen = {k: Stream(*args[k], **(options or {}).get(k, {})) for k in streams}
    sb = StepBatches(CaseStore(spec, (size, size)), chosen, n, image_transform=image_transform)
    return [sb[(0, i)] for i in range(n)]


def desco_batches(n: int, size: int, batch: int):
    """Synthetic LA-like steps for DeSCO (3D, 2 classes; the LA registration targets take minutes per case):
    ``batch`` (rounded up to even) labelled + unlabelled (size/2)³ crops, each labelled crop with one annotated slice
    on each of the default axes [2, 1] (``label_mask``), its propagated labels ``label_k`` and distance maps
    ``dist_k``. Four distinct steps, reused in turn (memory)."""
    import torch

    g, s, nb = torch.Generator().manual_seed(0), size // 2, batch + batch % 2
    ramp = (torch.arange(s) - s // 2).abs().float()
    dist = {1: ramp.view(1, 1, s).expand(s, s, s), 2: ramp.view(1, s, 1).expand(s, s, s)}  # axis 2 (Net1), axis 1
    mask = ((dist[1] == 0) | (dist[2] == 0)).float()

    def step():
        label = (torch.rand(nb, s, s, s, generator=g) > 0.7).long()
        lab = {"image": torch.rand(nb, 1, s, s, s, generator=g), "label": label, "label_mask": mask.expand(nb, s, s, s)}
        for k in (1, 2):
            lab[f"label_{k}"], lab[f"dist_{k}"] = label.float(), dist[k].expand(nb, s, s, s)
        return {"labeled": lab, "unlabeled": {"image": torch.rand(nb, 1, s, s, s, generator=g)}}

    pool = [step() for _ in range(4)]
    return [pool[i % 4] for i in range(n)]


def data_for(name: str, n: int, size: int, batch: int) -> tuple[list, str]:
    """(the strategy's ``n`` pre-built steps, how a step is made up), as its ``requires`` and ``stream_options``
    ask: default streams labelled + unlabelled, ``batch`` each."""
    from label_efficient.strategies import STRATEGIES
    from label_efficient.transforms.tree_filter import TreeViews

    unl = ("unlabeled",)
    if name == "desco":
        return desco_batches(n, size, batch), f"{batch + batch % 2} + {batch + batch % 2} synthetic {size // 2}³"
    if name == "dsaif":  # [raw, max-tree, min-tree] channels, as its image_transform gives the pipeline
        views = TreeViews(STRATEGIES.get("dsaif").Config().area_threshold)
        return batches(n, size, batch, batch, image_transform=views), f"{batch} + {batch}"
    if name == "sdc_uda_translate":  # one 3-slice slab a stream (its stream_options; the generator's batch axis)
        k = STRATEGIES.get(name).Config().slab
        return batches(n, size, 1, 1, options={s: {"slab": k} for s in ("labeled", "unlabeled")}), f"1 + 1 slabs of {k}"
    if name == "contrastive_global":  # 2·m·S slices by volume partition, m = batch // 2S (at least 1)
        parts = STRATEGIES.get(name).Config().partitions
        m = max(1, batch // (2 * parts))
        return (batches(n, size, 0, 0, unl, {"unlabeled": {"partitions": parts, "volumes": m}}),
                f"{2 * m * parts} (m = {m}, S = {parts})")
    if name == "cyclegan_pseudo_labels":  # unlabelled images and unpaired masks (other cases' labels)
        steps = batches(n, size, batch, batch)
        return [{"unlabeled": b["unlabeled"], "aux_masks": {"label": b["labeled"]["label"]}} for b in steps], \
            f"{batch} + {batch} masks"
    if "labeled" not in STRATEGIES.get(name).requires.streams:
        return batches(n, size, batch, batch, unl), f"{batch} unlabelled"
    return batches(n, size, batch, batch), f"{batch} + {batch}"


BACKBONE, OPTIMIZER = "unet", "adamw"  # set in main()
OPTIMIZERS = {"adamw": dict(name="adamw", lr=3e-3, weight_decay=0.01),
              "sgd": dict(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)}


#: the backbone a strategy needs where the ``--backbone`` one cannot serve it (the contrastive stages read
#: basic_unet's numbered encoder/decoder blocks)
NEEDS_BACKBONE = {"contrastive_global": "basic_unet", "contrastive_local": "basic_unet"}
#: (spatial dims, classes) of a strategy's network where it is not 2D ACDC's (DeSCO: 3D LA)
SHAPE = {"desco": (3, 2)}
#: adversarial strategies stepped with their shipped recipe's optimizers (Adam, GAN betas) instead of
#: ``--optimizer``: under one SGD 0.01 for all networks CycleGAN's generator loss goes NaN
OWN_RECIPE = {"cyclegan_pseudo_labels": "polyp_cyclegan_pl.yaml", "sdc_uda_translate": "polyp_sdc_uda.yaml"}


def own_optimizers(name: str) -> dict:
    """``{optimizer name: OptimizerConfig}`` of strategy ``name``'s stage in its ``OWN_RECIPE`` (schedule constant,
    as every timed loop), or ``{}``."""
    from label_efficient.recipe import load_recipe

    if name not in OWN_RECIPE:
        return {}
    recipe = load_recipe(ROOT / "recipes" / OWN_RECIPE[name])
    i = next(i for i, st in enumerate(recipe.stages) if st.strategy == name)
    return {k: c.model_copy(update={"schedule": "constant"}) for k, c in recipe.stage_optimizers(i).items()}


def model(dims: int = 2, classes: int = 4, backbone: str | None = None):
    from label_efficient.backbones import build_backbone
    from label_efficient.utils import use_channels_last

    name = backbone or BACKBONE
    if name == "unet":
        return build_backbone("unet", dims, 1, classes, channels=[16, 32, 64, 128, 256], num_res_units=0)
    net = build_backbone(name, dims, 1, classes)
    return use_channels_last(net) if dims == 2 else net  # as the runner builds it (trainer.channels_last)


def backbone_of(name: str) -> str:
    return NEEDS_BACKBONE.get(name, BACKBONE)


def build(name: str, steps: int):
    """The strategy as ``stage.build_stage`` builds it, at its default config (CycleGAN: ``gan_steps`` = the timed
    steps, so every timed step is its Stage A GAN step), and the optimizer config(s) ``planning.plan_stage`` gives
    the Lightning module (one per name for a strategy that steps several)."""
    from label_efficient.recipe import OptimizerConfig
    from label_efficient.strategies import STRATEGIES

    cls, (dims, classes) = STRATEGIES.get(name), SHAPE.get(name, (2, 4))
    config = {"gan_steps": steps} if name == "cyclegan_pseudo_labels" else {}
    strategy = cls(model(dims, classes, backbone_of(name)), classes, config, in_channels=1, spatial_dims=dims)
    cfg = OptimizerConfig(**OPTIMIZERS[OPTIMIZER], schedule="constant")
    return strategy, (own_optimizers(name) or {n: cfg for n in cls.requires.optimizers} or cfg)


def _optimizer(params, cfg=None):
    """The torch optimizer of ``cfg`` (an ``OptimizerConfig``; default: ``--optimizer``'s), built by hand."""
    import torch

    kw = dict(OPTIMIZERS[OPTIMIZER]) if cfg is None else cfg.model_dump(include={"name", "lr", "momentum",
                                                                                  "weight_decay", "betas"})
    name = kw.pop("name")
    if name == "sgd":
        kw.pop("betas", None)
        return torch.optim.SGD(params, **kw)
    kw.pop("momentum", None)
    return (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(params, **kw)


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
    """The student on labelled ‖ unlabelled images (one pass), the teacher (train mode) on the noisy unlabelled images
    without gradient, ½(CE+Dice) + 0.1·MSE of the softmaxes; backward; step; EMA of the parameters (the strategy's
    default, SSL4MIS). Leaves out: the consistency ramp-up (fixed weight 0.1)."""
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
        _update(opt, loss)
        _ema(teacher, net, 0.99, buffers=False)

    return _timed(data, steps, step)


def raw_bcp_passes(data, steps):
    """The network passes of a BCP self-training step at its defaults: the teacher (train mode, as the official
    code) on u and on v without gradient, the student on each of the two mixed halves (two passes, as the official
    code), ½(CE+Dice) on each, backward, step, EMA of parameters and BN statistics (``ema_buffers``, ACDC code).
    Leaves out: the box mask, the mixing of images and labels, the region weights and the component cleaning."""
    import torch

    net, teacher, loss_fn, opt = _student_teacher()
    teacher.train()

    def step(i, b):
        xl, yl, xu = b["labeled"]["image"], b["labeled"]["label"], b["unlabeled"]["image"]
        h = len(xu) // 2
        with _autocast():
            with torch.no_grad():
                teacher(xu[:h]), teacher(xu[h:])
            loss = loss_fn(net(xu[:h]), yl[:h, None]) + loss_fn(net(xl[h:]), yl[h:, None])
        _update(opt, loss)
        _ema(teacher, net, 0.99, buffers=True)

    return _timed(data, steps, step)


def _update(opt, loss) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def _ema(teacher, student, decay: float, buffers: bool = True) -> None:
    """θ_T ← α θ_T + (1 − α) θ_S over the parameters (and floating buffers; integer buffers copied)."""
    import torch

    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.lerp_(ps, 1 - decay)
        for bt, bs in zip(teacher.buffers(), student.buffers()) if buffers else ():
            bt.copy_(bs) if not bt.dtype.is_floating_point else bt.lerp_(bs, 1 - decay)


def _default(name: str):
    """The strategy's default config (network sizes, pass counts), read so the raw loop builds the same networks."""
    from label_efficient.strategies import STRATEGIES

    return STRATEGIES.get(name).Config()


def raw_dsaif(data, steps):
    """Two independently initialised networks, each one pass on the labelled and one on the unlabelled images (4
    forwards); ½(CE+Dice) on each network's labelled output + CE of each network's unlabelled output to the other's
    argmax; one backward, one optimizer over both. Leaves out: the views (tree-filtered channel pairs, gamma: both
    networks see the raw channel), view B's quarter turns and their undoing, the λ ramp-up (λ = 1)."""
    import torch.nn.functional as F

    nets = [model().train(), model().train()]
    loss_fn, opt = _loss_fn(), _optimizer([p for n in nets for p in n.parameters()])

    def step(i, b):
        xl, yl, xu = b["labeled"]["image"][:, :1], b["labeled"]["label"], b["unlabeled"]["image"][:, :1]
        with _autocast():
            out = [(n(xl), n(xu)) for n in nets]
            y1, y2 = (ou.detach().argmax(1) for _, ou in out)
            loss = sum(loss_fn(ol, yl[:, None]) for ol, _ in out)
            loss = loss + F.cross_entropy(out[0][1], y2) + F.cross_entropy(out[1][1], y1)
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_desco(data, steps):
    """Two independently initialised 3D networks, each with its optimizer; for k = 1, 2 on its half of the batch:
    Net_k on labelled ‖ unlabelled (grad); the other network without grad on u and on T = 8 noisy copies of u
    (train mode); ½(CE+Dice) to the propagated label L_k + CE to the other's argmax masked by the entropy of its
    noisy mean < τ; backward; step of optimizer k (Net2's teacher is the just-updated Net1). Leaves out: the
    schedules (s, λ, τ fixed), the s^d weights of the dense–sparse loss (plain ½(CE+Dice))."""
    import math

    import torch
    import torch.nn.functional as F

    c, (dims, classes) = _default("desco"), SHAPE["desco"]
    nets = [model(dims, classes).train(), model(dims, classes).train()]
    pairs = [(nets[0], nets[1], _optimizer(nets[0].parameters())), (nets[1], nets[0], _optimizer(nets[1].parameters()))]
    loss_fn = _loss_fn()

    def step(i, b):
        lab, u_all = b["labeled"], b["unlabeled"]["image"]
        nl, nu = len(lab["image"]) // 2, len(u_all) // 2
        for k, (net, other, opt) in enumerate(pairs):
            xl, yl, u = lab["image"][k * nl:(k + 1) * nl], lab[f"label_{k + 1}"][k * nl:(k + 1) * nl].long(), \
                u_all[k * nu:(k + 1) * nu]
            with _autocast():
                logits = net(torch.cat([xl, u]))
                with torch.no_grad():
                    pseudo = other(u).argmax(1)
                    noisy = u.repeat(c.mc_passes, 1, 1, 1, 1)
                    noisy = noisy + (torch.randn_like(noisy) * c.noise_std).clamp(-c.noise_clip, c.noise_clip)
                    p = other(noisy).softmax(1).unflatten(0, (c.mc_passes, len(u))).mean(0)
                    keep = (-(p * torch.log(p + 1e-6)).sum(1) < 0.75 * math.log(2)).float()
                loss = 0.9 * loss_fn(logits[:nl], yl[:, None]) \
                    + 0.1 * (F.cross_entropy(logits[nl:], pseudo, reduction="none") * keep).mean()
            _update(opt, loss)

    return _timed(data, steps, step)


def raw_cyclegan(data, steps):
    """Stage A (every timed step) with the default config's networks — G_s (BasicUNet 16…128 + DGCC MLP), G_i
    (BasicUNet), D_x (PatchGAN), D_m (VAE discriminator): generators step, G_s(x) (with D_m's encoder for DGCC),
    G_i(m), G_s(G_i(m)), G_i(G_s(x)), D_x(x̂), D_m(m̂), LSGAN + λ_cyc·L1 cycles, backward, step; discriminators step,
    D_x(x), D_x(x̂), D_m(m), D_m(m̂) on detached fakes + D_m's VAE loss on m, backward, step. Leaves out: the image
    pools, the linear LR decay, the idle segmenter optimizer step."""
    import torch.nn.functional as F
    from monai.networks.nets import BasicUNet

    from label_efficient.networks.gan import MaskGenerator, PatchDiscriminator, VAEDiscriminator

    c, k = _default("cyclegan_pseudo_labels"), 4
    g_s = MaskGenerator(1, k, c.generator_features, c.latent, c.temperature, c.dgcc).train()
    g_i = BasicUNet(2, k, 1, features=tuple(c.generator_features)).train()
    d_x, d_m = PatchDiscriminator(1, c.discriminator_width, c.patch_layers), VAEDiscriminator(k, c.discriminator_width,
                                                                                             c.latent)
    own = own_optimizers("cyclegan_pseudo_labels")
    opt_g = _optimizer([*g_s.parameters(), *g_i.parameters()], own["generators"])
    opt_d = _optimizer([*d_x.parameters(), *d_m.parameters()], own["discriminators"])

    def step(i, b):
        x = b["unlabeled"]["image"]
        m = F.one_hot(b["aux_masks"]["label"], k).movedim(-1, 1).to(x.dtype)
        with _autocast():
            m_fake, x_fake = g_s(x, d_m)[1], g_i(m)
            adv = ((d_x(x_fake) - 1) ** 2).mean() + ((d_m.score(m_fake) - 1) ** 2).mean()
            loss_g = adv + c.lambda_cyc * (F.l1_loss(g_i(m_fake), x) + F.l1_loss(g_s(x_fake, d_m)[1], m))
        _update(opt_g, loss_g)
        with _autocast():
            fx, fm = x_fake.detach(), m_fake.detach()
            rec, kl = d_m.vae_loss(m, c.vae_beta, c.vae_recon)
            loss_d = ((d_x(x) - 1) ** 2).mean() + (d_x(fx) ** 2).mean() + ((d_m.score(m) - 1) ** 2).mean() \
                + (d_m.score(fm) ** 2).mean() + rec + c.vae_beta * kl
        _update(opt_d, loss_d)

    return _timed(data, steps, step)


def raw_augpaint(data, steps):
    """The default config's denoiser (diffusers ``UNet2DModel``, blocks (32, 64, 128, 128), 2 layers each, attention
    at the lowest resolution): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε at t ~ U{0…999} (``DDPMScheduler.add_noise``), ε-MSE,
    backward, step, EMA of the denoiser's parameters. Leaves out: the [−1, 1] intensity map, the random flips, the
    EMA decay schedule (fixed 0.99)."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    c = _default("augpaint")
    plain = len(c.block_out_channels) - c.attention_levels
    net = UNet2DModel(in_channels=1, out_channels=1, block_out_channels=c.block_out_channels,
                      layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
                      down_block_types=("DownBlock2D",) * plain + ("AttnDownBlock2D",) * c.attention_levels,
                      up_block_types=("AttnUpBlock2D",) * c.attention_levels + ("UpBlock2D",) * plain).train()
    ema, opt = copy.deepcopy(net).requires_grad_(False), _optimizer(net.parameters())
    sched = DDPMScheduler(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule)

    def step(i, b):
        x0 = b["unlabeled"]["image"]
        eps, t = torch.randn_like(x0), torch.randint(0, c.train_timesteps, (len(x0),))
        with _autocast():
            loss = F.mse_loss(net(sched.add_noise(x0, eps, t), t).sample, eps)
        _update(opt, loss)
        _ema(ema, net, 0.99, buffers=False)

    return _timed(data, steps, step)


def _info_nce(z, partner, temperature: float):
    """Cosine InfoNCE of rows ``z`` (…, R, d): positive ``partner[r]``, negatives every other row."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(z.float(), dim=-1)
    sim = (z @ z.transpose(-1, -2) / temperature).masked_fill(torch.eye(z.shape[-2], dtype=torch.bool), -1e9)
    return F.cross_entropy(sim.flatten(0, -2), partner.repeat(sim[..., 0, 0].numel()))


def _basic_unet_encoder(net, x) -> list:
    """basic_unet's five encoder blocks (conv_0, down_1…down_4) on ``x``: their outputs, shallow → deep."""
    body, out = net.body, [net.body.conv_0(x)]
    for block in (body.down_1, body.down_2, body.down_3, body.down_4):
        out.append(block(out[-1]))
    return out


def raw_contrastive_global(data, steps):
    """basic_unet's encoder (its 5 blocks) and g1 (4×4 average pool, bias-free FC 1024 + ReLU, FC 128) on
    [set 1 | set 1′ | set 2 | set 2′] (twice the 2·m·S slices), cosine InfoNCE of each image with its copy,
    τ = 0.1; backward; step. Leaves out: the crop-resize and intensity augmentation (the copies are the
    originals), G^D's partition pairs and negative masks."""
    import torch
    from torch import nn

    c = _default("contrastive_global")
    net = model(backbone="basic_unet").train()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(c.grid), nn.Flatten(), nn.Linear(256 * c.grid ** 2, c.hidden, bias=False),
                         nn.ReLU(inplace=True), nn.Linear(c.hidden, c.dim, bias=False))
    opt = _optimizer([*net.parameters(), *head.parameters()])

    def step(i, b):
        x = b["unlabeled"]["image"]
        n = 2 * len(x)
        with _autocast():
            z = head(_basic_unet_encoder(net, torch.cat([x, x]))[-1])
            loss = _info_nce(z, (torch.arange(n) + n // 2) % n, c.temperature)
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_contrastive_local(data, steps):
    """basic_unet's frozen encoder (batch statistics on) and its first l = 3 decoder blocks (upcat_4…upcat_2, ½
    resolution), then g2 (bias-free 1×1 conv-BN-ReLU-1×1 conv) and a shared bias-free dense layer on 13 3×3 regions,
    on two views of each slice; cosine InfoNCE of each region with the same region of the other view, τ = 0.1;
    backward; step. Leaves out: the brightness/contrast jitter of the views (both are the slice)."""
    import torch
    from torch import nn

    c = _default("contrastive_local")
    net = model(backbone="basic_unet").train()
    body = net.body
    for block in (body.conv_0, body.down_1, body.down_2, body.down_3, body.down_4):
        block.requires_grad_(False)
    ch, r = 32, c.region  # upcat_2's channels
    g2 = nn.Sequential(nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                       nn.Conv2d(ch, ch, 1, bias=False))
    dense = nn.Linear(ch * r * r, c.dim, bias=False)
    opt = _optimizer([p for p in [*net.parameters(), *g2.parameters(), *dense.parameters()] if p.requires_grad])

    def step(i, b):
        x = b["unlabeled"]["image"]
        with _autocast():
            e = _basic_unet_encoder(net, torch.cat([x, x]))
            f = g2(body.upcat_2(body.upcat_3(body.upcat_4(e[4], e[3]), e[2]), e[1]))
            grid = torch.linspace(0, f.shape[-1] - r, 5).long().tolist()
            regions = [f[:, :, y:y + r, x0:x0 + r].flatten(1) for y in grid for x0 in grid][::2]  # 13 of 25
            v1, v2 = dense(torch.stack(regions, 1)).chunk(2)
            loss = _info_nce(torch.cat([v1, v2], 1), (torch.arange(26) + 13) % 26, c.temperature)
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_cuts(data, steps):
    """The network's full-resolution embedding (body, and the unused head as the strategy's forward) on x·2 − 1; S = 8
    anchors per image at random pixels, positives their diagonal neighbours; NT-Xent over [z_a; z_p] per image
    (τ = 0.1) + MSE of the reconstruction MLP (L → C·P² → LeakyReLU → C·P²) on z_a to the anchors' 5×5 patches,
    λ = 0.001; backward; step. Leaves out: the SSIM positive search (20 candidate patches per anchor)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    c = _default("cuts")
    net, p = model().train(), c.patch
    latent = net.head.in_channels
    recon = nn.Sequential(nn.Linear(latent, p * p), nn.LeakyReLU(), nn.Linear(p * p, p * p))
    opt = _optimizer([*net.parameters(), *recon.parameters()])

    def step(i, b):
        x = b["unlabeled"]["image"] * 2 - 1
        n, _, h, w = x.shape
        a = torch.randint(p // 2, h - p // 2 - 1, (n, c.anchors, 2))
        idx = a[..., 0] * w + a[..., 1]
        with _autocast():
            z = net.body(x)
            net.head(z)
            flat = z.flatten(2).transpose(1, 2)  # (N, H·W, L)
            za, zp = (flat.gather(1, j[..., None].expand(-1, -1, latent)) for j in (idx, idx + w + 1))
            target = F.unfold(x, p, padding=p // 2).transpose(1, 2).gather(1, idx[..., None].expand(-1, -1, p * p))
            nce = _info_nce(torch.cat([za, zp], 1), (torch.arange(2 * c.anchors) + c.anchors) % (2 * c.anchors),
                            c.temperature)
            loss = c.lambda_contrastive * nce + (1 - c.lambda_contrastive) * F.mse_loss(recon(za), target)
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_upl_sfda(data, steps):
    """A fresh network standing in for the source model (timing only): its body and K = 4 copies of its 1×1 head,
    head k on the input turned by r_k·90° (r = 1, 2, 3, 0) and its softmax turned back; the 4 passes once without
    gradient (pseudo labels: head mean > τ = 0.95) and once with; masked Dice of each head to them + entropy of the
    head mean; backward; step (the heads' parameter group with Adam betas (0.5, 0.999)). Leaves out: the
    largest-component cleaning of the pseudo labels."""
    import copy

    import torch

    c = _default("upl_sfda")
    net = model().train()
    body, heads = net.body, [copy.deepcopy(net.head) for _ in range(c.num_heads)]
    turns = [(k + 1) % 4 for k in range(c.num_heads)]
    opt = _optimizer([{"params": list(body.parameters())},
                      {"params": [p for h in heads for p in h.parameters()], "betas": c.head_betas}])

    def probs(x):
        return [torch.rot90(h(body(torch.rot90(x, r, (2, 3)))).float().softmax(1), -r, (2, 3))
                for h, r in zip(heads, turns)]

    def step(i, b):
        x = b["unlabeled"]["image"]
        with _autocast():
            with torch.no_grad():
                pseudo = (torch.stack(probs(x)).mean(0) > c.tau).float()
            ps = probs(x)
            dims = (0, *range(2, x.ndim))
            dice = [1 - (2 * (q * pseudo).sum(dims) + 1e-4) / (pseudo.sum(dims) + (q * pseudo).pow(2).sum(dims) + 1e-4)
                    for q in (p * pseudo for p in ps)]
            mean = torch.stack(ps).mean(0)
            loss = torch.stack(dice).mean() - (mean * torch.log2(mean + 1e-10)).sum() / mean.numel()
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_bn_sfda(data, steps):
    """A fresh network standing in for the source model (timing only): one forward in train mode (BN running
    statistics update), mean pixel entropy of the softmax + the L1 anchor of every BN γ/β to its source value;
    backward; step of the BN affine parameters only (``train_params: bn_affine``). Leaves out: the decaying BN
    momentum and the transferability weights α_lc of the anchor."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    net = model().train()
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    source = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for bn in bns]
    net.requires_grad_(False)
    affine = [p for bn in bns for p in (bn.weight, bn.bias)]
    for p in affine:
        p.requires_grad_(True)
    opt = _optimizer(affine)

    def step(i, b):
        with _autocast():
            p = net(b["unlabeled"]["image"]).float().softmax(1)
            anchor = sum(((bn.weight - w).abs() + (bn.bias - s).abs()).sum() for bn, (w, s) in zip(bns, source))
            loss = anchor - (p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
        _update(opt, loss)

    return _timed(data, steps, step)


def raw_sdc_uda_translate(data, steps):
    """The default config's translators G_AB, G_BA (``SliceGenerator``) and discriminators D_A, D_B
    (``SliceDiscriminator``) on one 3-slice slab a stream, min–max scaled to [−1, 1]: generator step (D frozen) —
    G_AB(a), G_BA(b), D_B, D_A on them, the cycles G_BA(G_AB(a)), G_AB(G_BA(b)), the identities G_AB(b), G_BA(a),
    softplus adversarial + 3·L1 + 1·L1, backward, step, EMA of both generators — then discriminator step — D(real),
    D(fake) per domain on detached fakes, every 12th step the R1 penalty (∇D(real) with create_graph), backward,
    step. Leaves out: the history pools."""
    import copy

    import torch
    import torch.nn.functional as F

    from label_efficient.networks.slice_transformer import SliceDiscriminator, SliceGenerator

    c = _default("sdc_uda_translate")
    make = lambda: SliceGenerator(1, c.width, c.dim, c.blocks, c.heads, c.mlp_ratio, c.reduction, c.inter_slice)
    g_ab, g_ba, d_a, d_b = make(), make(), SliceDiscriminator(1, c.disc_width), SliceDiscriminator(1, c.disc_width)
    emas = [(copy.deepcopy(g).requires_grad_(False), g) for g in (g_ab, g_ba)]
    own = own_optimizers("sdc_uda_translate")
    opt_g = _optimizer([*g_ab.parameters(), *g_ba.parameters()], own["generator"])
    opt_d = _optimizer([*d_a.parameters(), *d_b.parameters()], own["discriminator"])
    slab = lambda x: (lambda s: (s - s.min()) / (s.max() - s.min()).clamp_min(1e-8) * 2 - 1)(x[0][:, None])

    def disc(d, real, fake, r1):
        real = real.detach().requires_grad_(r1)
        out = d(real)
        loss = F.softplus(-out).mean() + F.softplus(d(fake)).mean()
        if r1:
            grad, = torch.autograd.grad(out.sum(), real, create_graph=True)
            loss = loss + c.r1_gamma / 2 * c.r1_every * grad.pow(2).sum()
        return loss

    def step(i, b):
        a, bb = slab(b["labeled"]["image"]), slab(b["unlabeled"]["image"])
        d_a.requires_grad_(False), d_b.requires_grad_(False)
        with _autocast():
            fake_b, fake_a = g_ab(a), g_ba(bb)
            loss_g = F.softplus(-d_b(fake_b)).mean() + F.softplus(-d_a(fake_a)).mean() \
                + c.cycle_weight * (F.l1_loss(g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), bb)) \
                + c.identity_weight * (F.l1_loss(g_ab(bb), bb) + F.l1_loss(g_ba(a), a))
        _update(opt_g, loss_g)
        for ema, g in emas:
            _ema(ema, g, c.ema_decay, buffers=False)
        d_a.requires_grad_(True), d_b.requires_grad_(True)
        r1 = c.r1_every > 0 and i % c.r1_every == 0
        with _autocast():
            loss_d = disc(d_a, a, fake_a.detach(), r1) + disc(d_b, bb, fake_b.detach(), r1)
        _update(opt_d, loss_d)

    return _timed(data, steps, step)


def raw_sdc_uda_self_train(data, steps):
    """The frozen teacher (eval mode) on the target images without gradient, pseudo labels = its argmax; the student
    on source ‖ target images; ½(CE+Dice) on the source part + ½(CE+Dice) to the pseudo labels; backward; step.
    Leaves out: the uncertainty filtering and intensity refinement of the pseudo labels (per class and image
    quantiles), their voxel weights, the round hand-over (student → teacher)."""
    import torch

    net, teacher, loss_fn, opt = _student_teacher()

    def step(i, b):
        xl, yl, xu = b["labeled"]["image"], b["labeled"]["label"], b["unlabeled"]["image"]
        with _autocast():
            with torch.no_grad():
                pseudo = teacher(xu).argmax(1)
            out = net(torch.cat([xl, xu]))
            loss = loss_fn(out[: len(xl)], yl[:, None]) + loss_fn(out[len(xl):], pseudo[:, None])
        _update(opt, loss)

    return _timed(data, steps, step)


def strategy_loop(name, data, steps):
    """The strategy object in a plain loop (``base.py``'s contract): one optimizer stepped by the loop, or the
    strategy's named optimizers bound and stepped inside ``training_step``."""
    s, cfgs = build(name, steps)
    s.setup(steps + 1)  # one more than timed: CycleGAN needs steps after its Stage A
    s.train()
    params = s.trainable_parameters()
    opt = None if isinstance(params, dict) else _optimizer(params)
    if opt is None:
        s.bind_optimizers({k: _optimizer(list(p), cfgs[k] if isinstance(cfgs, dict) else None)
                           for k, p in params.items()})

    def step(i, b):
        with _autocast():
            out = s.training_step(b, i)
        if opt is not None:
            _update(opt, out.loss)
        s.after_optimizer_step(i)

    return _timed(data, steps, step)


class _Timer:
    """Times training steps 5… (``global_step`` counts optimizer steps: ``per_step`` a training step)."""

    def __init__(self, per_step: int = 1):
        import pytorch_lightning as pl

        class T(pl.Callback):
            def __init__(self):
                self.t0, self.n = None, 0

            def on_train_batch_start(self, trainer, *a):
                if trainer.global_step == 5 * per_step:
                    self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, *a):
                self.t1 = time.perf_counter()
                self.n = trainer.global_step // per_step

        self.cb = T()


def lightning_loop(name, data, steps):
    import pytorch_lightning as pl
    import torch

    from label_efficient.lightning import StrategyModule

    s, optimizer = build(name, steps)
    module = StrategyModule(s, optimizer, steps + 1)  # one more than timed, as strategy_loop
    per = module.optimizer_steps_per_step
    timer = _Timer(per).cb
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps * per, precision=PRECISION, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data[:steps], batch_size=None))
    return (timer.n - 5) / (timer.t1 - timer.t0)


RAW = {"supervised": raw_supervised, "mean_teacher": raw_mean_teacher, "bcp": raw_bcp_passes, "dsaif": raw_dsaif,
       "desco": raw_desco, "cyclegan_pseudo_labels": raw_cyclegan, "augpaint": raw_augpaint,
       "contrastive_global": raw_contrastive_global, "contrastive_local": raw_contrastive_local, "cuts": raw_cuts,
       "upl_sfda": raw_upl_sfda, "bn_sfda": raw_bn_sfda, "sdc_uda_translate": raw_sdc_uda_translate,
       "sdc_uda_self_train": raw_sdc_uda_self_train}


def load_results() -> dict:
    """Every ``results/speed*.json``, by file name."""
    return {f.name: load_rows(f) for f in sorted(RESULTS_DIR.glob("speed*.json"))}


def _commit_cell(row: dict) -> str:
    """The commit a row was measured at, and whether the working tree had edits not in it."""
    return row.get("commit", "—")[:7] + (" + uncommitted edits" if row.get("dirty") else "")


def section(rows: dict) -> str:
    speed = [(name, r) for name, f in rows.items() for r in f]
    if not speed:
        return ""
    spread = max(abs(x / statistics.median(v) - 1) for _, r in speed for v in r["repeats"].values() for x in v)
    table = md_table(["rows file", "commit", "strategy", "backbone", "batch", "precision", "threads", "raw it/s",
                      "Lightning it/s", "Lightning s/it", "overhead", "paired overhead (Lightning / plain loop)",
                      "plain-loop it/s", "peak RSS MB"],
                     [[f"`{name}`", _commit_cell(r), r["strategy"], r.get("backbone", "unet"), _batch_cell(r),
                       r.get("precision", "bf16-mixed"), r["threads"], f"{r['raw_its']:.2f}", f"{r['lightning_its']:.2f}",
                       f"{1 / r['lightning_its']:.2f}", f"{r['overhead_pct']:+.1f} %", _paired_cell(r), f"{r['strategy_loop_its']:.2f}",
                       f"{r['peak_rss_mb']:.0f}"] for name, r in speed])
    return "\n".join([
        "## Step time against a raw PyTorch loop", "",
        "`python benchmarks/speed.py [--backbone basic_unet --batch 12 --optimizer sgd --strategies bcp --out "
        "speed_bcp_official_config.json]`: the same pre-built ACDC batches (128²), run alone; median of interleaved "
        f"repeats (raw, Lightning, plain loop, raw, …; in these rows one repeat lies up to {100 * spread:.0f} % from "
        "its median); overhead = raw median / Lightning median − 1; paired overhead = the median over repeats of "
        "each repeat's raw / Lightning − 1 and raw / plain loop − 1 (rows from 2026-12-04 on), which a slow phase of "
        "the VM shifts less. The raw loop is hand-written PyTorch doing the same network passes (for BCP: only the teacher "
        "and student passes, so the overhead includes box masks, mixing and connected-component cleaning). Lightning = "
        "our `StrategyModule` in a `Trainer`; plain loop = the strategy object in a 10-line loop. A row without a "
        "commit was measured before rows recorded theirs, on older code.", "", table, "",
        *_passes([r for _, r in speed])])


def _paired_cell(r: dict) -> str:
    if "paired_overhead_pct" not in r:
        return "—"
    return f"{r['paired_overhead_pct']:+.1f} % / {r['paired_loop_overhead_pct']:+.1f} %"


def _batch_cell(r: dict) -> str:
    """What a step holds (rows before ``batch_desc``: labelled + unlabelled ACDC images)."""
    return r.get("batch_desc", f"{r.get('batch', 8)} + {r.get('batch', 8)}")


def _passes(speed: list[dict]) -> list[str]:
    """What each row's raw loop does and leaves out (rows that record it)."""
    latest = {r["strategy"]: r["raw_passes"] for r in speed if r.get("raw_passes")}  # one line a strategy
    notes = [f"- `{name}`: {passes}" for name, passes in latest.items()]
    return ["Raw loops (each row's `raw_passes`):", "", *notes, ""] if notes else []


def measure(name: str, args) -> dict:
    """The row of strategy ``name``: its batches built once, then interleaved repeats of the three loops."""
    data, desc = data_for(name, args.steps, args.size, args.batch)
    # Interleaved repeats (raw, Lightning, plain loop, raw, ...): a slow drift of the machine hits all three alike.
    its: dict[str, list[float]] = {"raw": [], "lightning": [], "loop": []}
    for _ in range(args.repeats):
        its["raw"].append(RAW[name](data, args.steps))
        its["lightning"].append(lightning_loop(name, data, args.steps))
        its["loop"].append(strategy_loop(name, data, args.steps))
    # Medians: on this 2-core VM one 100-step measurement moves by up to ±20 %, and a best-of picks outliers.
    r, lt, sl = (statistics.median(its[k]) for k in ("raw", "lightning", "loop"))
    # and the median of each repeat's own ratio: a repeat's three loops run back to back, so a slow phase of the
    # VM (one 60-step block moves by ±15 % on these hosts) changes both sides of its ratio alike
    paired = {k: statistics.median(100 * (a / b - 1) for a, b in zip(its["raw"], its[k])) for k in ("lightning", "loop")}
    from label_efficient.provenance import cpu_info, git_state

    cpu = cpu_info()
    flags = sorted(f for f, on in cpu["flags"].items() if on)
    return {"strategy": name, "raw_its": r, "lightning_its": lt, "strategy_loop_its": sl,
            "overhead_pct": 100 * (r / lt - 1), "loop_overhead_pct": 100 * (r / sl - 1),
            "paired_overhead_pct": paired["lightning"], "paired_loop_overhead_pct": paired["loop"],
            "threads": args.threads, "steps": args.steps, "statistic": "median", "precision": PRECISION,
            "backbone": backbone_of(name), "batch": args.batch, "batch_desc": desc, "size": args.size,
            "optimizer": OPTIMIZER, "raw_passes": " ".join(RAW[name].__doc__.split()),
            "repeats": {k: [round(x, 3) for x in v] for k, v in its.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **(git_state() or {}), "cpu_model": cpu["model"], "cpu_flags": flags}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    ap.add_argument("--strategies", nargs="*", default=list(RAW), choices=list(RAW))
    ap.add_argument("--backbone", default="unet", help="zoo name; `unet` is the MONAI U-Net 16…256 of the old table")
    ap.add_argument("--batch", type=int, default=8, help="labelled and unlabelled images per step, each")
    ap.add_argument("--size", type=int, default=128, help="2D image side (DeSCO's synthetic 3D crops: size/2)")
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
    rows = {r["strategy"]: r for r in load_rows(results)}
    for name in args.strategies:  # saved after each strategy: an interrupted run keeps what it measured
        rows[name] = measure(name, args)
        print(json.dumps(rows[name]), flush=True)
        write_json(results, [rows[k] for k in RAW if k in rows])


if __name__ == "__main__":
    main()
