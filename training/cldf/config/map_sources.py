"""Settings of the CAM sources CLDF is compared with and may take its seeds from: AME-CAM and CPF-CTE (`CLDFConfig` groups them with the others in `sections`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AmeCamConfig:
    """AME-CAM (Chen et al., MICCAI 2023): a multi-exit classifier and an attention aggregation of its exit maps.

    Trained by `cldf train` when ``enabled`` or when ``maps.cam_method`` is ``"ame-cam"``;
    its weights go into ``ame_cam.safetensors``.

    Attributes:
        enabled: train the AME-CAM networks even when another CAM method is selected.
        widths: channels of the four ResNet-18 stages (each stage: two basic blocks, instance norm).
        stem_stride: downsampling before the first stage: 1, 2, or 4 (ResNet-18's stride-2 stem + max pool).
        exit_weights: w_k of the exits' BCE losses, shallow to deep.
        top_fraction: an exit's logit is the mean of the highest this fraction of its map's pixels
            (1.0: the global average, as in the paper; smaller: multiple-instance pooling, which
            asks for local evidence that negative slices never show).
        steps: optimisation steps of the multi-exit classifier (balanced batches, `batches.augment` with the
            CAM classifier's intensity range).
        batch_size: slices per step of the classifier (half positive, half negative).
        hard_negatives: share of a batch's negatives drawn near the patient's positive slices (weight
            ``exp(-d / 5)`` at ``d`` slices from the nearest one) instead of uniformly (0: the paper). Their
            anatomy matches the positives' except for the target, so the target itself must be the evidence.
        lr: AdamW learning rate of the classifier.
        eval_every: steps between AUCs on the validation patients' slice labels; the best is kept.
        aggregator_steps: steps of the attention aggregation net (classifier frozen), positive slices only.
        aggregator_batch_size: positive slices per aggregator step (the contrastive loss compares them).
        aggregator_lr: AdamW learning rate of the aggregation net.
        rank_alpha: decay of the rank weights in the region-contrastive pull terms.
        resolution: slice size the AME-CAM networks see (0: the bundle's ``data.resolution``); maps are
            returned at the bundle's resolution.
        map_exits: exits (0 = shallowest) whose maps are averaged with the fused map into the inference
            map (all four in the paper); inference only, no retraining.
    """

    enabled: bool = False
    widths: tuple[int, ...] = (32, 64, 128, 256)
    stem_stride: int = 2
    exit_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    top_fraction: float = 1.0
    steps: int = 1000
    batch_size: int = 32
    hard_negatives: float = 0.0
    lr: float = 2e-4
    eval_every: int = 100
    aggregator_steps: int = 300
    aggregator_batch_size: int = 16
    aggregator_lr: float = 1e-3
    rank_alpha: float = 0.25
    resolution: int = 0
    map_exits: tuple[int, ...] = (0, 1, 2, 3)


@dataclass
class CpfCteConfig:
    """CPF-CTE (Context Patch Fusion with Class Token Enhancement): a small ViT whose patch classifier gives a map.

    Trained by `cldf train` when ``enabled`` or when ``maps.cam_method`` is ``"cpf-cte"``, or added to a
    finished bundle by `cldf cpf-cte`; its weights go into ``cpf_cte.safetensors`` (`cldf.cpf_cte`).

    Attributes:
        enabled: train the CPF-CTE network even when another CAM method is selected.
        patch: side of the non-overlapping square patches (the bundle's resolution must be a multiple of it);
            the map has one value per patch before it is upsampled to the slice.
        width: embedding width of the tokens (even: the BiLSTMs' two directions share it).
        depth: transformer blocks of the encoder.
        heads: attention heads (``width`` must divide by it).
        mlp_ratio: hidden width of each block's MLP, in multiples of ``width``.
        attention_radius: each patch token attends to the patches at most this many grid steps away (1: its 8
            neighbours; the encoder then has no class token); 0: global attention and the ViT's class token, as
            in the paper. Trained from scratch on a few hundred slices, global attention lets patches far from
            the target carry the slice's evidence (on the brain bundle's validation patients its map never
            pointed at the tumour); local attention keeps the evidence where the target is.
        top_k: a slice's class score is the mean of its ``top_k`` most confident patches.
        steps: AdamW steps on balanced batches (half positive, half negative slices).
        batch_size: slices per step.
        lr: AdamW learning rate.
        augment: `batches.augment` with the CAM classifier's intensity range and flips (False: its flips only).
    """

    enabled: bool = False
    patch: int = 8
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    attention_radius: int = 1
    top_k: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-4
    augment: bool = True
