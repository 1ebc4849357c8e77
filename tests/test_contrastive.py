"""Global + local contrastive pre-training: partition positives/negatives, aligned local pairs, frozen encoder,
hand-over of the trained parts to the fine-tune stage, and their bad inputs."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import requires_shared

from label_efficient.backbones import blocks, build_backbone, part_modules
from label_efficient.data import CaseStore, DataError, StepBatches, Stream, build_dataset
from label_efficient.lightning import CheckpointMismatchError
from label_efficient.strategies import build_strategy
from label_efficient.strategies.contrastive import (global_loss, global_pairs, intensity_jitter, local_loss,
                                                    region_corners)

TINY = dict(features=(4, 8, 8, 16, 16, 4))


def tiny_unet(**kw):
    torch.manual_seed(0)
    return build_backbone("basic_unet", 2, 1, 4, **{**TINY, **kw})


def official_global_pairs(m=2, s=4):
    """Directed positive pairs of the official G^D loop (models.py, global_loss_exp_no=2), re-written from reading it,
    mapped to our layout. Official layout: per volume slot g a block of 4s rows [set 1 | aug 1 | set 2 | aug 2]
    (``stitch_batch_global_loss_gd``, here with every slot filled); the loop anchors every row with
    pos % (2s) < s (the set-1 *and* set-2 originals) at i1 = pos, i2 = pos + s, i3 = pos + 2s, i4 = pos + 3s (mod
    the batch) and adds (i1,i2), (i2,i1), (i1,i3), (i3,i1), (i3,i4), (i4,i3), (i2,i4), (i4,i2). Ours: the four
    blocks of n = m·s rows each, volume-major."""
    bs, n = 4 * s * m, s * m
    ours = lambda o: (o % (4 * s)) // s * n + o // (4 * s) * s + o % s
    pairs = []
    for pos in range(bs):
        if pos % (2 * s) < s:
            i1, i2, i3, i4 = pos, (pos + s) % bs, (pos + 2 * s) % bs, (pos + 3 * s) % bs
            pairs += [(i1, i2), (i2, i1), (i1, i3), (i3, i1), (i3, i4), (i4, i3), (i2, i4), (i4, i2)]
    return [(ours(a), ours(p)) for a, p in pairs]


def reference_global_loss(z, partition, tau, m=2, s=4):
    """G^D by explicit loops: each positive pair of the official loop, negatives = the other partitions."""
    z = torch.nn.functional.normalize(z, dim=1)
    terms = []
    for a, p in official_global_pairs(m, s):
        pos = torch.exp(z[a] @ z[p] / tau)
        neg = sum(torch.exp(z[a] @ z[j] / tau) for j in range(len(z)) if partition[j] != partition[a])
        terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


def layout_partitions(m=2, s=4):
    """Partition index of every row of [set 1 | aug 1 | set 2 | aug 2] (each set: m volumes × s chunks)."""
    p = torch.arange(s).repeat(m)
    return torch.cat([p, p, p, p])


def test_global_loss_equals_the_explicit_formula():
    torch.manual_seed(0)
    part = layout_partitions()
    z = torch.randn(len(part), 16)
    assert torch.allclose(global_loss(z, part, 0.1), reference_global_loss(z, part, 0.1), atol=1e-5)


def test_global_positives_share_the_partition_and_negatives_are_the_other_partitions():
    part = layout_partitions()
    anchors, positives = global_pairs(len(part) // 4, 4)
    # 8 pair kinds × n, both directions, as the official loop (was 2 * len(part): set-1 anchors only)
    assert len(anchors) == 4 * len(part)
    assert torch.equal(part[anchors], part[positives])
    torch.manual_seed(1)
    z = torch.randn(len(part), 16)
    base = global_loss(z, part, 0.1)
    # a same-partition row that is no positive of anchor 0 (another volume of set 1) leaves every denominator of
    # anchor 0's pairs: moving it changes only the terms where it is itself an anchor or positive
    n = len(part) // 4
    other = next(j for j in range(n) if j != 0 and part[j] == part[0])
    z2 = z.clone()
    z2[other] = torch.randn(16)
    sim = lambda zz: torch.nn.functional.normalize(zz, dim=1)
    from label_efficient.strategies.contrastive import contrastive_terms
    neg = part[:, None] != part[None, :]
    terms = lambda zz: contrastive_terms(sim(zz) @ sim(zz).t() / 0.1, anchors, positives, neg)
    untouched = (anchors != other) & (positives != other) & (part[anchors] == part[0])
    assert torch.allclose(terms(z)[untouched], terms(z2)[untouched], atol=1e-6)
    # a row of another partition is a negative of anchor 0: moving it changes anchor 0's terms
    z3 = z.clone()
    z3[next(j for j in range(n) if part[j] != part[0])] = z[0]
    assert not torch.allclose(terms(z)[anchors == 0], terms(z3)[anchors == 0])
    assert base > 0


@pytest.mark.parametrize("m,s", [(1, 4), (2, 4), (5, 4), (3, 2)])
def test_global_pairs_are_the_official_loops_pairs(m, s):
    anchors, positives = global_pairs(m * s, s)
    ours = sorted(zip(anchors.tolist(), positives.tolist()))
    official = sorted(official_global_pairs(m, s))
    assert len(ours) == len(official) == 16 * m * s  # per batch of 4·m·s rows (set-1 anchors alone gave 8·m·s)
    assert ours == official
    part = layout_partitions(m, s)
    assert torch.equal(part[anchors], part[positives])


def test_local_head_convolutions_are_bias_free():
    from label_efficient.strategies.contrastive import LocalHead

    head = LocalHead(8)
    convs = [m for m in head.g2 if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(c.bias is None for c in convs) and head.dense.bias is None


@requires_shared("acdc")
def test_partition_batches_take_one_slice_per_chunk_of_each_volume():
    spec = build_dataset("acdc")
    train = [c for c in spec.select("train") if c.volume in sorted({c.volume for c in spec.select("train")})[:6]]
    stream = Stream(train, 0, with_label=False, partitions=4, volumes=2)
    assert stream.batch_size == 16
    batches = StepBatches(CaseStore(spec, (32, 32)), {"unlabeled": stream}, 5, augment=False)
    vols = stream.volume_slices()
    for step in range(3):
        index, part = batches._partition_draw(0, "unlabeled", step)
        assert part[:8] == part[8:] == [0, 1, 2, 3] * 2
        for i, p in zip(index, part):
            volume = next(v for v in vols if i in v)
            chunks = np.array_split(np.asarray(volume), 4)
            assert i in chunks[p]
        out = batches[(0, step)]["unlabeled"]
        assert out["image"].shape == (16, 1, 32, 32) and out["partition"].tolist() == part and "label" not in out


@requires_shared("acdc")
def test_more_partitions_than_slices_is_a_clear_error():
    spec = build_dataset("acdc")
    with pytest.raises(DataError, match="20 partitions needs at least that many slices"):
        StepBatches(CaseStore(spec, (32, 32)), {"unlabeled": Stream(spec.select("train")[:40], 0, False,
                                                                   partitions=20)}, 5)


def test_local_views_differ_only_in_intensity():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16) * 0.5 + 0.25
    y = intensity_jitter(x, 0.3, (0.7, 1.3), clip=10.0)
    for a, b in zip(x, y):  # per image an increasing affine map of the same pixels: no geometric change
        corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert corr > 0.9999
    assert intensity_jitter(x * 3, 0.3, (0.7, 1.3), clip=1.5).max() <= 1.5


def test_local_loss_pairs_the_same_region_of_the_two_views():
    corners = region_corners(16, 16)
    assert len(set(corners)) == 13 and all(0 <= y <= 13 and 0 <= x <= 13 for y, x in corners)
    torch.manual_seed(0)
    r = torch.randn(2, 13, 32)
    aligned = local_loss(r, r + 0.01 * torch.randn_like(r), 0.1)
    shuffled = local_loss(r, r[:, torch.roll(torch.arange(13), 1)], 0.1)
    assert aligned < 0.05 < shuffled
    with pytest.raises(ValueError, match="too small"):
        region_corners(5, 5)


def test_global_stage_loss_decreases_and_reads_no_label():
    net = tiny_unet()
    s = build_strategy("contrastive_global", net, 4, {"volumes": 2, "crop_side": 1.0, "crop_offset": (0.0, 0.0),
                                                       "brightness": 0.0, "contrast": (1.0, 1.0)})
    assert s.requires.label_free and "labeled" not in s.requires.streams and s.handover_parts() == ["encoder"]
    assert s.stream_options() == {"unlabeled": {"partitions": 4, "volumes": 2}}
    torch.manual_seed(0)
    batch = {"unlabeled": {"image": torch.rand(16, 1, 32, 32), "partition": torch.arange(4).repeat(4)}}
    opt = torch.optim.Adam(s.trainable_parameters(), 1e-3)
    s.setup(10)
    s.train()
    losses = []
    for i in range(10):
        out = s.training_step(batch, i)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
    with pytest.raises(KeyError, match="partition"):
        s.training_step({"unlabeled": {"image": torch.rand(16, 1, 32, 32)}}, 0)


def test_local_stage_freezes_the_encoder_and_trains_the_first_l_decoder_blocks():
    net = tiny_unet()
    s = build_strategy("contrastive_local", net, 4, {"decoder_blocks": 3})
    assert s.handover_parts() == ["encoder", "decoder:3"]
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.Adam(s.trainable_parameters(), 1e-2)
    s.setup(3)
    s.train()
    torch.manual_seed(0)
    for i in range(3):
        out = s.training_step({"unlabeled": {"image": torch.rand(4, 1, 32, 32)}}, i)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = net.state_dict()
    changed = lambda prefix: any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix + "."))
    encoder, decoder = blocks(net, "encoder"), blocks(net, "decoder")
    # frozen weights; BN normalises with batch statistics and updates its running ones, as the official stage 2
    # (train_phase True) — was: BN statistics of stage 1 kept too (encoder in eval mode)
    weights = [k for k, v in net.named_parameters() if any(k.startswith(n + ".") for n in encoder)]
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
    assert all(changed(n) for n in encoder)
    assert all(m.training for n in encoder for m in net.get_submodule(n).modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert all(changed(n) for n in decoder[:3])
    assert not changed(decoder[3]) and not changed("head")


def test_fine_tune_takes_exactly_the_handed_over_parts(caplog):
    from label_efficient.checkpoints import init_weights as _init_weights

    trained = tiny_unet()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    fresh = tiny_unet()
    fresh_state = copy.deepcopy(fresh.state_dict())
    previous = {"best": trained.state_dict(), "last": trained.state_dict(), "parts": ["encoder", "decoder:3"]}
    with caplog.at_level(logging.INFO, "label_efficient"):
        _init_weights(fresh, "previous_last", previous, {}, "finetune")
    handed = tuple(f"{n}." for n in part_modules(fresh, ["encoder", "decoder:3"]))
    for k, v in fresh.state_dict().items():
        expected = trained.state_dict()[k] if k.startswith(handed) else fresh_state[k]
        assert torch.equal(v, expected), k
    assert "starts from parts ['encoder', 'decoder:3']" in caplog.text


def test_fine_tune_on_another_backbone_names_the_layers():
    from label_efficient.checkpoints import init_weights as _init_weights

    previous = {"best": tiny_unet().state_dict(), "last": tiny_unet().state_dict(), "parts": ["encoder"]}
    with pytest.raises(CheckpointMismatchError, match=r"layers \['body\.conv_0"):
        _init_weights(tiny_unet(features=(8, 8, 8, 16, 16, 4)), "previous_last", previous, {}, "finetune")


@requires_shared("acdc")
def test_label_free_stage_ignores_the_budget_and_says_so(caplog):
    from label_efficient.recipe import DataConfig
    from label_efficient.runner import DataContext

    cfg = DataConfig.model_validate({"dataset": "acdc", "image_size": [32, 32], "budget": {"count": 2}})
    with caplog.at_level(logging.INFO, "label_efficient"):
        ctx = DataContext.build(cfg, 0, label_free=True)
    assert ctx.labeled == [] and len(ctx.unlabeled) == 1312
    assert caplog.text.count("label budget is ignored") == 1
