"""The one replay pool of the GAN strategies: CycleGAN's rule, its RNG order, and resume from the state dict."""
from __future__ import annotations

import torch

from label_efficient.backbones import build_backbone
from label_efficient.strategies import build_strategy
from label_efficient.strategies.replay import ImagePool


def test_pool_fills_then_swaps_with_probability_half_in_rng_order():
    pool = ImagePool(2)
    a, b, c = torch.full((1, 2), 1.0), torch.full((1, 2), 2.0), torch.full((1, 2), 3.0)
    assert torch.equal(pool(torch.cat([a, b])), torch.cat([a, b])) and len(pool.items) == 2  # filling: new ones back
    torch.manual_seed(0)
    draws = torch.rand(()), torch.randint(2, ())
    torch.manual_seed(0)
    out = pool(c)
    if draws[0] < 0.5:  # swapped: the stored sample drawn by the same randint comes back, c takes its place
        assert torch.equal(out[0], torch.cat([a, b])[int(draws[1])]) and any(torch.equal(i, c[0]) for i in pool.items)
    else:
        assert torch.equal(out, c)
    assert torch.equal(ImagePool(0)(c), c)


def test_pool_resumes_from_the_state_dict():
    pool = ImagePool(3)
    pool(torch.rand(2, 1, 4, 4))
    fresh = ImagePool(3)
    fresh.load_state_dict(pool.state_dict())
    assert len(fresh.items) == 2 and all(torch.equal(x, y) for x, y in zip(fresh.items, pool.items))
    torch.manual_seed(1)
    x = torch.rand(4, 1, 4, 4)
    torch.manual_seed(2)
    y1 = pool(x)
    torch.manual_seed(2)
    assert torch.equal(fresh(x), y1)


def test_sdc_uda_slab_pools_are_checkpointed_and_older_checkpoints_still_load():
    def make():
        torch.manual_seed(0)
        return build_strategy("sdc_uda_translate", build_backbone("unet", 2, 1, 2, channels=[8, 16]), 2,
                              {"width": 4, "dim": 8, "heads": 2, "disc_width": 4, "pool_size": 2})

    s = make()
    s.pool_a(torch.rand(1, 3, 1, 32, 32))  # one slab (3 slices) = one sample
    restored = make()
    restored.load_state_dict(s.state_dict())
    assert len(restored.pool_a.items) == 1 and torch.equal(restored.pool_a.items[0], s.pool_a.items[0])
    old = {k: v for k, v in s.state_dict().items() if not k.startswith("pool_")}  # written before the pools were kept
    older = make()
    older.load_state_dict(old)
    assert older.pool_a.items == [] and older.pool_b.items == []
