"""AugPaint: foreground-conditioned diffusion inpainting (Hu & Shi, arXiv 2506.23038, 2025).

A data-producing, label-free stage (spec ``shared/strategies/augpaint.md``):

Training (every step; all train images, labelled and unlabelled, no mask is read):
  1. x₀ = the store's normalised image mapped affinely to [−1, 1] (random horizontal flip, p = ``flip``)
  2. t ~ U{0 … T−1}, ε ~ N(0, I), x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε (``DDPMScheduler.add_noise``)
  3. L_denoise = ‖ε − ε_θ(x_t, t)‖² (ε-prediction, ``UNet2DModel``); EMA of θ after every step
Generation (after training, per labelled case with a non-empty mask, ``variants`` images in one batch):
  4. known mask m = (y > 0) (union of the foreground classes), dilated by ``dilate`` px; 1 = keep
  5. x_T ~ N(0, I); every reverse step t → t−1: unknown = sampler step from x_t with the EMA ε_θ,
     known = √ᾱ_{t−1} x₀ + √(1−ᾱ_{t−1}) ε, x_{t−1} = m⊙known + (1−m)⊙unknown, i.e. the foreground is re-imposed at
     every noise level: ``RePaintScheduler`` with its resampling jumps (``undo_step``), or the cheaper DDIM route
  6. paste-back in the store's intensities x̃ ← m⊙x + (1−m)⊙x̃: the known pixels are the source's, bit for bit,
     and the label is the source mask, unchanged

Departures, each for a reason:
  * pixel space, no latent autoencoder: no pretrained autoencoder can be downloaded here, and a from-scratch VAE on
    tens to a thousand slices adds blur and boundary artefacts (the spec's own advice for tiny L: pixel DDPM)
  * a CPU-sized denoiser (default blocks (32, 64, 128, 128), attention at the lowest resolution only, against the
    spec's (64, 128, 256, 256) with attention at the 2 lowest) and thousands, not 30–100k, steps: a 2-core CPU
  * EMA decay: the spec's 0.9999 suits 30–100k steps; by default (``ema_decay: null``) the decay is
    min(0.9999, 1 − 10 / steps), an averaging horizon of a tenth of the run, with the usual (1+k)/(10+k) warm-up
  * the affine map to [−1, 1] is fitted on the first training batch (min/max, kept in the checkpoint) unless
    ``intensity_range`` is given; the segmenter keeps the store's normalisation (the paste-back is in store space)
The network of the recipe's backbone is not trained here: the stage hands no weights to the next stage
(:meth:`handover_parts` is ``[]``), and it is no segmenter (``segments = False``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .ema import ema_update, make_teacher
from .requirements import Requirements


@register_strategy("augpaint")
class AugPaint(Strategy):
    """Pixel-space DDPM on all train images; RePaint-style foreground-kept generation of labelled pairs."""

    # spatial_dims: 2D networks and 2D pairs
    requires = Requirements(streams=('unlabeled',), labels='none', role='generator', spatial_dims=(2,))

    class Config(StrategyConfig):
        block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  #: R, CPU-sized (spec: (64, 128, 256, 256))
        layers_per_block: int = Field(2, ge=1)  #: R (spec: 2 layers per block)
        attention_levels: int = Field(1, ge=0)  #: attention at the N lowest resolutions (R; spec: 2)
        norm_num_groups: int = Field(8, ge=1)
        train_timesteps: int = Field(1000, ge=2)  #: R
        beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"  #: R
        ema_decay: float | None = Field(None, gt=0, lt=1)  #: spec 0.9999 at 30–100k steps; None: scaled (module doc)
        flip: float = Field(0.5, ge=0, le=1)  #: random horizontal flips of training images (R)
        sampler: Literal["repaint", "ddim"] = "repaint"
        repaint_steps: int = Field(250, ge=1)  #: R/D
        jump_length: int = Field(10, ge=1)  #: R/D
        jump_n_sample: int = Field(10, ge=1)  #: R/D (1: no resampling jumps)
        #: noise of each RePaint reverse step: 0 = deterministic DDIM-like step (diffusers' RePaint default, used by
        #: the rows in benchmarks/RESULTS.md), 1 = the RePaint paper's ancestral DDPM step
        eta: float = Field(0.0, ge=0, le=1)
        ddim_steps: int = Field(100, ge=1)  #: R
        dilate: int = Field(0, ge=0)  #: grow the known region by this many pixels (spec pitfall: cover the foreground)
        variants: int = Field(5, ge=1)  #: generated images per labelled pair (R)
        intensity_range: tuple[float, float] | None = None  #: store intensities mapped to [−1, 1]; None: first batch

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        from diffusers import UNet2DModel

        c = self.config
        levels = len(c.block_out_channels)
        if not 0 <= c.attention_levels <= levels:
            raise ValueError(f"attention_levels={c.attention_levels}: the denoiser has {levels} resolutions")
        if any(ch % c.norm_num_groups for ch in c.block_out_channels):
            raise ValueError(f"block_out_channels {c.block_out_channels} must be multiples of norm_num_groups="
                             f"{c.norm_num_groups}")
        plain = levels - c.attention_levels
        in_ch = self.in_channels
        self.denoiser = UNet2DModel(
            in_channels=in_ch, out_channels=in_ch, block_out_channels=c.block_out_channels,
            layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
            down_block_types=("DownBlock2D",) * plain + ("AttnDownBlock2D",) * c.attention_levels,
            up_block_types=("AttnUpBlock2D",) * c.attention_levels + ("UpBlock2D",) * plain)
        self.ema = make_teacher(self.denoiser)
        lo, hi = c.intensity_range if c.intensity_range else (math.nan, math.nan)
        if c.intensity_range and not hi > lo:
            raise ValueError(f"intensity_range {c.intensity_range}: the upper bound must exceed the lower")
        self.register_buffer("intensity", torch.tensor([lo, hi]))

    # -- training --------------------------------------------------------------------------------
    def _noise_schedule(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.config.train_timesteps, beta_schedule=self.config.beta_schedule)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        self.scheduler = self._noise_schedule()

    def trainable_parameters(self):
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.intensity.tolist()
        return (x - lo) / (hi - lo) * 2 - 1

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.intensity.tolist()
        return (x + 1) / 2 * (hi - lo) + lo

    def training_step(self, batch, step):
        x = batch["unlabeled"]["image"]
        if x.ndim != 4:
            raise ValueError(f"augpaint generates 2D images (N, C, H, W); got a batch of shape {tuple(x.shape)}")
        if torch.isnan(self.intensity).any():
            if not x.max() > x.min():
                raise ValueError("augpaint fits its [−1, 1] intensity map on the first training batch, which is "
                                 f"constant ({x.min().item():g}); set config.intensity_range")
            self.intensity.copy_(torch.stack([x.min(), x.max()]).detach().to(self.intensity))
        x0 = self.to_unit(x)
        flip = torch.rand(len(x0), device=x0.device) < self.config.flip
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        eps = torch.randn_like(x0)
        t = torch.randint(0, self.config.train_timesteps, (len(x0),), device=x0.device)
        loss = F.mse_loss(self.denoiser(self.scheduler.add_noise(x0, eps, t), t).sample, eps)
        return StepOutput(loss, {"loss_denoise": loss.detach()})

    def ema_decay_at(self, step: int) -> float:
        base = self.config.ema_decay or min(0.9999, 1 - 10 / max(self.total_steps, 20))
        return min(base, (1 + step) / (10 + step))

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.ema, self.denoiser, self.ema_decay_at(step), buffers=False, lerp=True)

    # -- generation ------------------------------------------------------------------------------
    def known_mask(self, label: torch.Tensor) -> torch.Tensor:
        """(*S) label → (1, 1, *S) float mask of the kept region: foreground union, dilated by ``dilate`` px."""
        m = (label > 0).float()[None, None]
        k = self.config.dilate
        return F.max_pool2d(m, 2 * k + 1, stride=1, padding=k) if k else m

    @torch.no_grad()
    def generate(self, image: torch.Tensor, label: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """``n`` images (n, C, *S) with the source's known pixels and a new background around them."""
        if image.ndim != 3 or label.shape != image.shape[1:]:
            raise ValueError(f"augpaint generates 2D pairs: image (C, H, W) and label (H, W); got "
                             f"{tuple(image.shape)} and {tuple(label.shape)}")
        if torch.isnan(self.intensity).any():
            raise RuntimeError("augpaint generator is untrained (no intensity range): train the stage first")
        dev = next(self.ema.parameters()).device
        image, g = image.to(dev), torch.Generator(device=dev).manual_seed(seed)
        mask = self.known_mask(label.to(dev))
        x0 = self.to_unit(image)[None].expand(n, *image.shape)
        sample = self._repaint if self.config.sampler == "repaint" else self._ddim
        out = self.from_unit(sample(x0, mask, g))
        return torch.where(mask.bool(), image[None], out)

    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.ema(x, t).sample

    def _repaint(self, x0, mask, g):
        from diffusers import RePaintScheduler

        c = self.config
        sch = RePaintScheduler(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule, eta=c.eta)
        sch.set_timesteps(c.repaint_steps, c.jump_length, c.jump_n_sample, device=x0.device)
        x = torch.randn(x0.shape, generator=g, device=x0.device)
        t_last = sch.timesteps[0] + 1
        for t in sch.timesteps:
            if t < t_last:  # denoise t → t−1, the known part re-noised to t−1
                x = sch.step(self._eps(x, t), t, x, x0, mask, generator=g).prev_sample
            else:  # resampling jump: diffuse forward again one step
                x = sch.undo_step(x, t_last, g)
            t_last = t
        return x

    def _ddim(self, x0, mask, g):
        from diffusers import DDIMScheduler

        c = self.config
        # x̂₀ clipped to [−1, 1] (the scheduler's default), as RePaintScheduler does
        sch = DDIMScheduler(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule)
        sch.set_timesteps(c.ddim_steps, device=x0.device)
        x = torch.randn(x0.shape, generator=g, device=x0.device)
        steps = sch.timesteps.tolist()
        for k, t in enumerate(steps):
            unknown = sch.step(self._eps(x, torch.tensor(t, device=x.device)), t, x).prev_sample
            if k + 1 < len(steps):
                noise = torch.randn(x0.shape, generator=g, device=x0.device)
                known = sch.add_noise(x0, noise, torch.tensor([steps[k + 1]], device=x0.device))
            else:
                known = x0
            x = mask * known + (1 - mask) * unknown
        return x

    # -- what the stage passes on ----------------------------------------------------------------
    def handover_parts(self) -> list[str]:
        """Nothing: the recipe's backbone is not trained by this stage (the generator is its own network)."""
        return []

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("augpaint is a generating stage, not a segmenter: follow it with a segmenting stage "
                           "that reads its pairs (data.synthetic: {from_stage: <this stage>})")
