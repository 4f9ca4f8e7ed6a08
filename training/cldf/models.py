"""The networks: the class-conditional diffusion UNet, the slice classifiers, the noise schedule."""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder, DiffusionModelUNet, get_timestep_embedding
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from .config import ClassifierConfig, DiffusionConfig, StudentConfig


def build_cdm(cfg: DiffusionConfig, in_channels: int) -> DiffusionModelUNet:
    """Class-conditional DDPM UNet: epsilon prediction, classes 0 (absent) and 1 (present)."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        num_class_embeds=2,
    )


class SliceClassifier(DiffusionModelEncoder):
    """The diffusion UNet encoder, conditioned on t, with global average pooling.

    MONAI's encoder flattens into a Linear sized for one input shape; pooling
    makes any slice size work. Forward returns 2 logits (absent, present).
    """

    def __init__(self, cfg: ClassifierConfig, in_channels: int):
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=2,
            input_shape=(1, 1),
            channels=tuple(cfg.channels),
            attention_levels=tuple(cfg.attention_levels),
            num_res_blocks=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
        )
        self.out = nn.Linear(cfg.channels[-1], 2)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_: object) -> torch.Tensor:  # type: ignore[override]
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb, context=None)
        return self.out(h.mean(dim=(2, 3)))


class NoiseSchedule:
    """``alpha_bar_t`` of the bundle's DDPM schedule, and ``q(x_t | x_0)`` sampling."""

    def __init__(self, cfg: DiffusionConfig):
        sched = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            schedule=cfg.schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
        )
        self.num_train_timesteps = cfg.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (Ho et al. 2020, Eq. 4)."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def check(self, timesteps: tuple[int, ...] | list[int], what: str) -> None:
        bad = [t for t in timesteps if not 0 <= t < self.num_train_timesteps]
        if bad:
            raise ValueError(f"{what}: timesteps {bad} are outside the schedule's 0..{self.num_train_timesteps - 1}")


def build_student(cfg: StudentConfig, n_channels: int) -> torch.nn.Module:
    """The student (`cldf.student`), MONAI's residual U-Net: ``(B, C * (2 context + 1), R, R)`` slices ->
    ``(B, 1, R, R)`` logits."""
    from monai.networks.nets import UNet

    if cfg.resolution % 2 ** (len(cfg.channels) - 1):
        raise ValueError(f"student.resolution {cfg.resolution} must be divisible by {2 ** (len(cfg.channels) - 1)} "
                         f"for a U-Net of {len(cfg.channels)} levels")
    return UNet(spatial_dims=2, in_channels=n_channels * (2 * cfg.context + 1), out_channels=1,
                channels=tuple(cfg.channels), strides=(2,) * (len(cfg.channels) - 1), num_res_units=1, norm="batch")
