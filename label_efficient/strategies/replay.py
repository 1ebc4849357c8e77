"""CycleGAN's replay pool of generated samples (Shrivastava et al. 2017; Zhu et al. 2017, §4), shared by the GAN
strategies (``cyclegan_pl``: images and masks, ``sdc_uda``: slabs)."""
from __future__ import annotations

import torch
from torch import nn


class ImagePool(nn.Module):
    """The discriminator sees a mix of new and past fakes: until ``size`` samples are stored each new one is stored
    and returned; then, per sample, with p = ½ a random stored one is returned and replaced by the new one, else the
    new one is returned (one ``torch.rand`` per sample, one ``torch.randint`` per swap, in batch order). ``size`` 0:
    no pool. Kept in the state dict (extra state), so a resumed run continues with the same pool.

    A sample is one entry of the batch axis; a strategy whose unit is a whole tensor (SDC-UDA's slab, whose batch
    axis is its slices) passes ``fake[None]`` and takes ``[0]``."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.items = size, []

    def forward(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for f in fakes.detach():
            if len(self.items) < self.size:
                self.items.append(f.clone())
                out.append(f)
            elif torch.rand(()) < 0.5:
                k = int(torch.randint(len(self.items), ()))
                out.append(self.items[k])
                self.items[k] = f.clone()
            else:
                out.append(f)
        return torch.stack(out)

    def get_extra_state(self):
        return {"items": torch.stack(self.items) if self.items else torch.zeros(0)}

    def set_extra_state(self, state) -> None:
        items = state["items"]
        self.items = list(items.unbind(0)) if items.numel() else []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a checkpoint written before this pool was kept (SDC-UDA): it starts empty, as then
            missing_keys.remove(key)
