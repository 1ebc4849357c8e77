"""On-device batch augmentation (kornia): the *strong view* of weak/strong consistency training.

Per-sample random brightness shift, contrast scaling, Gaussian blur and Gaussian noise, applied to a batch
already on the training device. Geometry is untouched, so a pixel-wise target computed on the weak view
(a teacher's prediction) stays aligned with the strong view. Works for any intensity scale (no clipping),
so z-scored and [0, 1] images alike.
"""
from __future__ import annotations

import torch
from torch import nn


class StrongIntensity(nn.Module):
    """Photometric strong view of a 2D batch ``(N, C, H, W)``; each sample draws its own parameters."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 1.0),
                 noise_std: float = 0.05, p: float = 0.8):
        super().__init__()
        import kornia.augmentation as K

        self.augment = K.AugmentationSequential(
            K.RandomBrightness((1 - brightness, 1 + brightness), clip_output=False, p=p),
            K.RandomContrast((1 - contrast, 1 + contrast), clip_output=False, p=p),
            K.RandomGaussianBlur((5, 5), blur_sigma, p=p / 2),
            K.RandomGaussianNoise(std=noise_std, p=p / 2),
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"StrongIntensity takes 2D batches (N, C, H, W); got shape {tuple(x.shape)}. "
                             "For 3D data leave the strong view off.")
        return self.augment(x.float()).to(x.dtype)
