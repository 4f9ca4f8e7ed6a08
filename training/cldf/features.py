"""Diffusion features of the frozen CDM (CLDF, Sec. 2.4).

Outputs of the UNet's decoder blocks (``up_blocks[i]``) for the noised slice at
several timesteps, one seeded noise shared across timesteps, class label 1,
averaged over timesteps. They stay at each block's native resolution: the pixel
decoder's first layer is linear, so it is applied before upsampling (see
`decoder.PixelDecoder.embed`), and training gathers them at seed pixels only.
`literal_feature_stack` builds the paper's full ``D x H x W`` stack for reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, get_timestep_embedding

from .config import FeatureConfig
from .maps.base import ActivationRecorder
from .models import NoiseSchedule


class DiffusionFeatures:
    """Timestep-averaged decoder-block features of a frozen CDM."""

    blocks_name = "the CDM has decoder blocks"

    def __init__(self, unet: DiffusionModelUNet, schedule: NoiseSchedule, cfg: FeatureConfig):
        n = len(self._blocks(unet))
        bad = [b for b in cfg.blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"feature blocks {bad} do not exist; {self.blocks_name} 0..{n - 1}")
        schedule.check(cfg.timesteps, "feature timesteps")
        self.unet = unet.eval()
        self.schedule = schedule
        self.cfg = cfg

    @staticmethod
    def _blocks(net: torch.nn.Module) -> torch.nn.ModuleList:
        return net.up_blocks

    @property
    def block_channels(self) -> list[int]:
        """Channels of each selected block; D is their sum."""
        return [self._blocks(self.unet)[b].resnets[-1].out_channels for b in self.cfg.blocks]

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps batched into the batch dimension: ``(T*B, C, H, W)`` inputs, timesteps, labels."""
        b, n_t = len(x0), len(self.cfg.timesteps)
        g = torch.Generator().manual_seed(self.cfg.noise_seed)
        noise = torch.randn(x0.shape[1:], generator=g).to(x0.device, x0.dtype)
        t = torch.tensor(self.cfg.timesteps, device=x0.device).repeat_interleave(b)
        xt = self.schedule.add_noise(x0.repeat(n_t, 1, 1, 1), noise.expand(n_t * b, *x0.shape[1:]), t)
        labels = torch.full((n_t * b,), self.cfg.class_label, device=x0.device, dtype=torch.long)
        return xt, t, labels

    @torch.inference_mode()
    def __call__(self, x0: torch.Tensor, project: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``(B, C, H, W)`` slices -> per block ``(B, C_i, h_i, w_i)`` features averaged over t.

        Timesteps go into the batch dimension, at most ``max_batch`` noised images
        per forward pass; the average over t is accumulated chunk by chunk. With
        ``project`` (per block ``(K, C_i)``, the decoder's first layer), each block
        is projected to K channels before accumulating, so only ``(B, K, h_i, w_i)``
        is ever kept: projection and the average over t commute.
        """
        xt, t, labels = self.noised(x0)
        b = len(x0)
        slice_of = torch.arange(len(xt), device=x0.device) % b  # xt is timestep-major
        sums: list[torch.Tensor] | None = None
        for start in range(0, len(xt), max(1, self.cfg.max_batch)):
            part = slice(start, start + max(1, self.cfg.max_batch))
            outs = self._block_outputs(xt[part], t[part], labels[part])
            if project is not None:
                outs = [torch.einsum("kc,nchw->nkhw", w.to(o), o) for w, o in zip(project, outs)]
            if sums is None:
                sums = [torch.zeros((b, *o.shape[1:]), device=o.device) for o in outs]
            for acc, o in zip(sums, outs):
                acc.index_add_(0, slice_of[part], o.float())
        return [acc / len(self.cfg.timesteps) for acc in sums]

    def _block_outputs(self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        outs = _up_block_outputs(self.unet, xt, t, labels, max(self.cfg.blocks))
        return [outs[i].float() for i in self.cfg.blocks]


class EncoderFeatures(DiffusionFeatures):
    """The noisy classifier's encoder-block features instead of the CDM's (the CLDF paper's Table 2 comparison).

    Same noise, timesteps and averaging as `DiffusionFeatures`; ``cfg.blocks`` index
    the encoder's ``down_blocks``. The classifier is not class-conditioned.
    """

    blocks_name = "the classifier has encoder blocks"

    @staticmethod
    def _blocks(net: torch.nn.Module) -> torch.nn.ModuleList:
        return net.down_blocks

    def _block_outputs(self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        net = self.unet
        emb = net.time_embed(get_timestep_embedding(t, net.block_out_channels[0]).to(xt.dtype))
        h = net.conv_in(xt)
        outs = []
        for block in net.down_blocks[: max(self.cfg.blocks) + 1]:
            h, _ = block(hidden_states=h, temb=emb, context=None)
            outs.append(h)
        return [outs[i].float() for i in self.cfg.blocks]


def _up_block_outputs(
    unet: DiffusionModelUNet, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, last: int
) -> list[torch.Tensor]:
    """MONAI's forward pass, stopped after ``up_blocks[last]``: the rest is never needed."""
    emb = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0]).to(x.dtype))
    emb = emb + unet.class_embedding(labels).to(x.dtype)
    h = unet.conv_in(x)
    residuals = [h]
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb, context=None)
        residuals.extend(res)
    h = unet.middle_block(hidden_states=h, temb=emb, context=None)
    outs = []
    for block in unet.up_blocks[: last + 1]:
        n = len(block.resnets)
        h = block(hidden_states=h, res_hidden_states_list=residuals[-n:], temb=emb, context=None)
        residuals = residuals[:-n]
        outs.append(h)
    return outs


def gather_at_pixels(features: list[torch.Tensor], pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Values of the upsampled features at some pixels, without upsampling anything.

    Bilinear upsampling (``align_corners=False``) to ``size`` evaluated at a pixel
    equals ``grid_sample`` at that pixel's centre with border padding.

    Args:
        features: per block ``(1, C_i, h_i, w_i)`` features of one slice.
        pixels: ``(P,)`` flat indices into an ``H x W`` slice.
        size: ``(H, W)``.

    Returns:
        ``(P, D)`` features.
    """
    h, w = size
    y = (pixels // w).float()
    x = (pixels % w).float()
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1).view(1, 1, -1, 2)
    cols = [F.grid_sample(f.float(), grid.to(f.device), mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0] for f in features]
    return torch.cat(cols).T


@torch.inference_mode()
def literal_feature_stack(unet: DiffusionModelUNet, schedule: NoiseSchedule, cfg: FeatureConfig, x0: torch.Tensor) -> torch.Tensor:
    """The paper's way: per timestep, a full forward pass, every block upsampled and concatenated.

    Reference for tests and the benchmark only.

    Returns:
        ``(B, D, H, W)`` stack averaged over timesteps.
    """
    g = torch.Generator().manual_seed(cfg.noise_seed)
    noise = torch.randn(x0.shape[1:], generator=g).to(x0.device, x0.dtype)
    labels = torch.full((len(x0),), cfg.class_label, device=x0.device, dtype=torch.long)
    stacks = []
    with ActivationRecorder([unet.up_blocks[b] for b in cfg.blocks]) as rec:
        for step in cfg.timesteps:
            t = torch.full((len(x0),), step, device=x0.device, dtype=torch.long)
            unet(schedule.add_noise(x0, noise.expand_as(x0), t), t, class_labels=labels)
            ups = [F.interpolate(o.float(), size=x0.shape[-2:], mode="bilinear", align_corners=False) for o in rec.outputs]
            stacks.append(torch.cat(ups, dim=1))
    return torch.stack(stacks).mean(dim=0)
