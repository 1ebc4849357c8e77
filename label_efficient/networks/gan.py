"""The networks of CycleGAN pseudo labels (Wang et al., IEEE TMI 2021; spec ``cyclegan_pseudo_labels.md``): the
image discriminator D_x (PatchGAN), the VAE mask discriminator D_m and the DGCC mask generator G_s. Used by
``strategies.cyclegan_pl``; the state-dict keys are those of the modules defined there before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn

from ..losses import dice_loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (CycleGAN's 70×70 design at ``layers`` stride-2 convolutions): a map of real/fake scores.

    Not MONAI's ``PatchDiscriminator``, which is close but not the same network: it returns every layer's features (a
    list, for pix2pixHD feature matching), re-initialises every conv N(0, 0.02), does not cap the width at 8× (the
    official ``NLayerDiscriminator``'s ``min(2**n, 8)``, kept here) and names its layers ``initial_conv``, ``0``…,
    ``final_conv``: with it the results of the recorded runs would move and their checkpoints (``net.*``) not load."""

    def __init__(self, in_channels: int, width: int = 32, layers: int = 3):
        super().__init__()
        mods, c = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)], width
        for i in range(1, layers + 1):
            nxt = width * 2 ** min(i, 3)
            mods += [nn.Conv2d(c, nxt, 4, 2 if i < layers else 1, 1), nn.InstanceNorm2d(nxt, affine=True),
                     nn.LeakyReLU(0.2, True)]
            c = nxt
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VAEDiscriminator(nn.Module):
    """D_m: encoder → (μ, log σ²); decoder z → mask logits; real/fake head on μ."""

    def __init__(self, num_classes: int, width: int = 32, latent: int = 128):
        super().__init__()
        enc, c = [], num_classes
        for i in range(3):
            enc += [nn.Conv2d(c, width * 2 ** i, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            c = width * 2 ** i
        self.encoder = nn.Sequential(*enc, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, 2 * latent))
        self.decoder_in = nn.Linear(latent, c * 16)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.LeakyReLU(0.2, True),
                                     nn.ConvTranspose2d(c // 2, c // 4, 4, 2, 1), nn.LeakyReLU(0.2, True),
                                     nn.Conv2d(c // 4, num_classes, 3, 1, 1))
        self.head = nn.Sequential(nn.Linear(latent, latent), nn.LeakyReLU(0.2, True), nn.Linear(latent, 1))
        self.channels = c

    def encode(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(m).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)

    def score(self, m: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(m)[0])

    def decode(self, z: torch.Tensor, size) -> torch.Tensor:
        h = self.decoder(self.decoder_in(z).view(len(z), self.channels, 4, 4))
        return F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=False)

    def vae_loss(self, m: torch.Tensor, beta: float, recon: str = "dice") -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, KL) of real one-hot masks ``m``; the loss is recon + β·KL (KL averaged over units)."""
        mu, logvar = self.encode(m)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decode(z, m.shape[2:])
        if recon == "dice":
            rec = dice_loss(logits.softmax(1), m, smooth=1e-5, joint_sum=True)
        else:
            rec = F.binary_cross_entropy_with_logits(logits, m)
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).mean()
        return rec, kl


class MaskGenerator(nn.Module):
    """G_s: a MONAI BasicUNet whose last decoder features are recalibrated by DGCC from D_m's latent code."""

    def __init__(self, in_channels: int, num_classes: int, features, latent: int, temperature: float, dgcc: bool):
        super().__init__()
        self.unet = BasicUNet(2, in_channels, num_classes, features=tuple(features))
        f = features[-1]
        self.dgcc = nn.Sequential(nn.Linear(latent, f), nn.ReLU(True), nn.Linear(f, f)) if dgcc else None
        self.temperature = temperature

    def features(self, x: torch.Tensor) -> torch.Tensor:
        found = {}
        hook = self.unet.final_conv.register_forward_pre_hook(lambda _m, args: found.__setitem__("f", args[0]))
        try:
            self.unet(x)
        finally:
            hook.remove()
        return found["f"]

    def forward(self, x: torch.Tensor, d_m: VAEDiscriminator) -> tuple[torch.Tensor, torch.Tensor]:
        """(m̂ before DGCC, m̂ after DGCC), softmax(logits / T); the same map twice without DGCC."""
        f = self.features(x)
        first = (self.unet.final_conv(f) / self.temperature).softmax(1)
        if self.dgcc is None:
            return first, first
        c = torch.sigmoid(self.dgcc(d_m.encode(first)[0]))
        return first, (self.unet.final_conv(f * c[:, :, None, None]) / self.temperature).softmax(1)
