"""CPF-CTE: the ViT's outputs, the row and column context fusion, class token enhancement, top-k pooling,
the loss, and the map as a CAM source."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cldf.config import CpfCteConfig
from cldf.cpf_cte import ContextFusion, CpfCte, cpf_cte_loss, local_attention_mask, top_k_pool
from cldf.maps import CpfCteMap, build_cam, normalise_per_slice

SMALL = CpfCteConfig(patch=8, width=16, depth=1, heads=2, top_k=3)


@pytest.fixture(scope="module")
def net() -> CpfCte:
    torch.manual_seed(0)
    return CpfCte(SMALL, in_channels=2, resolution=32).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_network_gives_two_class_logits_per_patch_and_pooled_scores_per_slice(net, x):
    out = net(x)
    assert out.grid == (4, 4)
    assert out.patch_logits.shape == (3, 16, 2) and out.patch_probs.shape == (3, 16, 2)
    torch.testing.assert_close(out.patch_probs.sum(dim=-1), torch.ones(3, 16))
    assert out.scores.shape == (3, 2) and torch.all((out.scores > 0) & (out.scores < 1))
    torch.testing.assert_close(out.target_map().flatten(1), out.patch_probs[..., 1])


def test_the_map_is_the_upsampled_target_patch_map_in_unit_range_per_slice_with_a_presence(net, x):
    cam = build_cam("cpf-cte", None, [0], 0, cpf_cte=net)
    assert isinstance(cam, CpfCteMap)
    maps, presence = cam(x)
    assert maps.shape == (3, 32, 32) and presence.shape == (3,)
    torch.testing.assert_close(maps.flatten(1).amin(1), torch.zeros(3))
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3))
    with torch.no_grad():
        out = net(x)
    expected = normalise_per_slice(F.interpolate(out.target_map()[:, None], size=(32, 32), mode="bilinear",
                                                 align_corners=False)[:, 0])
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(presence, out.scores[:, 1])


def test_the_context_fusion_carries_a_patch_along_its_row_and_its_column_only():
    torch.manual_seed(0)
    fusion = ContextFusion(8).eval()
    tokens = torch.randn(1, 4 * 5, 8)  # a 4 x 5 grid in raster order
    changed = tokens.clone()
    changed[0, 1 * 5 + 2] += 1.0  # row 1, column 2
    with torch.no_grad():
        moved = (fusion(changed, (4, 5)) - fusion(tokens, (4, 5))).abs().sum(-1).view(4, 5)
    reached = moved > 1e-6
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1, :] = expected[:, 2] = True
    assert torch.equal(reached, expected), reached


def _reach(net: CpfCte, x: torch.Tensor) -> torch.Tensor:
    """``(4, 4)``: which patch tokens move when the top-left patch of the first slice changes."""
    changed = x.clone()
    changed[0, :, :8, :8] = 1.0
    with torch.no_grad():
        return ((net.tokens(changed) - net.tokens(x))[0].abs().sum(-1) > 1e-6).view(4, 4)


def test_local_attention_keeps_a_patch_in_its_neighbourhood_row_and_column(net, x):
    reached = _reach(net, x)  # one block of radius 1, then the row and column BiLSTMs
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :] = expected[:, :2] = True
    assert torch.equal(reached, expected), reached


def test_global_attention_carries_a_patch_everywhere_as_in_the_paper(x):
    torch.manual_seed(0)
    net = CpfCte(CpfCteConfig(**{**SMALL.__dict__, "attention_radius": 0}), 2, 32).eval()
    assert net.attention_mask is None and torch.all(_reach(net, x))


def test_the_attention_mask_lets_each_patch_see_its_neighbours_only():
    mask = local_attention_mask((3, 3), 1)
    assert mask.shape == (9, 9) and not mask[4].any()  # the centre's neighbourhood is the whole 3 x 3 grid
    assert mask[0].view(3, 3).tolist() == [[False, False, True], [False, False, True], [True, True, True]]
    assert local_attention_mask((3, 3), 2).sum() == 0 and local_attention_mask((3, 3), 0) is None


def test_class_token_enhancement_gives_each_class_its_own_embedding(x):
    torch.manual_seed(0)
    net = CpfCte(SMALL, 2, 32).eval()
    with torch.no_grad():
        before = net(x).patch_logits
        net.class_tokens[1] += 0.5  # the target's class token only
        after = net(x).patch_logits
    torch.testing.assert_close(after[..., 0], before[..., 0])
    assert not torch.allclose(after[..., 1], before[..., 1])


def test_top_k_pooling_is_the_mean_of_the_k_most_confident_patches_per_class():
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]])  # 4 patches, 2 classes
    torch.testing.assert_close(top_k_pool(probs, 1), torch.tensor([[0.9, 0.8]]))
    torch.testing.assert_close(top_k_pool(probs, 2), torch.tensor([[0.75, 0.75]]))
    torch.testing.assert_close(top_k_pool(probs, 4), probs.mean(dim=1))


def test_the_loss_scores_the_background_as_present_on_every_slice_and_the_target_as_labelled():
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.3]])
    labels = torch.tensor([1, 0])
    expected = F.binary_cross_entropy(scores, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(cpf_cte_loss(scores, labels), expected)
    confident_negative = torch.tensor([[0.9, 0.05]])
    assert cpf_cte_loss(confident_negative, torch.tensor([0])) < cpf_cte_loss(confident_negative, torch.tensor([1]))
    all_target = torch.tensor([[0.05, 0.95]])  # a positive slice with no clear background patch
    assert cpf_cte_loss(all_target, torch.tensor([1])) > cpf_cte_loss(torch.tensor([[0.9, 0.95]]), torch.tensor([1]))


@pytest.mark.parametrize("radius", [0, 1])
def test_a_training_step_reaches_every_part_of_the_network(x, radius):
    torch.manual_seed(0)
    net = CpfCte(CpfCteConfig(**{**SMALL.__dict__, "attention_radius": radius}), 2, 32)
    assert net.cls_token.shape[1] == (1 if radius == 0 else 0)  # the paper's class token with global attention
    cpf_cte_loss(net(x).scores, torch.tensor([1, 0, 1])).backward()
    silent = [name for name, p in net.named_parameters() if p.numel() and not p.grad.abs().sum() > 0]
    assert not silent, silent


@pytest.mark.parametrize("field,value,message", [("patch", 5, "cpf_cte.patch must divide the slice size 32"),
                                                 ("width", 15, "cpf_cte.width must be an even number"),
                                                 ("heads", 3, "cpf_cte.heads must divide cpf_cte.width 16"),
                                                 ("depth", 0, "cpf_cte.depth and cpf_cte.mlp_ratio"),
                                                 ("attention_radius", -1, "cpf_cte.attention_radius must be 0"),
                                                 ("top_k", 17, "cpf_cte.top_k must be between 1 and the 16 patches")])
def test_unbuildable_settings_are_refused_by_name(field, value, message):
    cfg = CpfCteConfig(**{**SMALL.__dict__, field: value})
    with pytest.raises(ValueError, match=message):
        CpfCte(cfg, 2, 32)


def test_slices_of_another_size_are_refused(net):
    with pytest.raises(ValueError, match="built for 32 x 32 slices, not 64 x 64"):
        net(torch.zeros(1, 2, 64, 64))


def test_build_cam_refuses_cpf_cte_without_its_network():
    with pytest.raises(ValueError, match=r"no cpf_cte.safetensors\); add one with `cldf cpf-cte"):
        build_cam("cpf-cte", None, [0], 0)
