"""Backbone registry and embeddings, checked against a plain timm VisionTransformer with the same weights."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from models.backbones import ARCHS, arch_config, create_backbone, embed
from utils.errors import ConfigError


def _tiny(img_size: int = 32, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return create_backbone("vit_debug_patch8", in_chans=5, img_size=img_size, depth=3, **kw)


def _reference(model: VisionTransformer, img_size: int) -> VisionTransformer:
    """A timm ViT built independently (no dynamic size) that holds the same weights."""
    ref = VisionTransformer(img_size=img_size, patch_size=8, in_chans=5, num_classes=0, embed_dim=32, depth=3,
                            num_heads=2, qkv_bias=True)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def _block_outputs(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, o: outs.append(o)) for blk in model.blocks]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    return outs


def test_registry_has_the_papers_names_and_sizes():
    for name in ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_small_patch16", "vit_small_patch16_224",
                 "vit_base_patch16", "vit_base_patch16_224", "vit_large_patch16", "vit_xbase", "vit_slarge",
                 "mae_vit_small", "mae_vit_base_patch16", "mae_vit_large_patch16"]:
        assert name in ARCHS
    for name in ["vit_tiny", "vit_small", "vit_base", "vit_large"]:
        assert ARCHS[f"{name}_patch8"]["patch_size"] == 8 and ARCHS[name]["patch_size"] == 16
    assert {k: ARCHS["vit_xbase"][k] for k in ("embed_dim", "depth", "num_heads")} == {
        "embed_dim": 384, "depth": 12, "num_heads": 12}
    assert {k: ARCHS["vit_slarge"][k] for k in ("embed_dim", "depth", "num_heads")} == {
        "embed_dim": 384, "depth": 24, "num_heads": 16}
    assert arch_config("vit_small", patch_size=8)["patch_size"] == 8
    with pytest.raises(ConfigError, match="patch size 8"):
        arch_config("vit_small_patch16", patch_size=8)
    with pytest.raises(ConfigError, match="unknown architecture"):
        arch_config("resnet50")


def test_vit_small_keys_match_timm_create_model():
    import timm

    with torch.device("meta"):
        ours = create_backbone("vit_small", in_chans=5).state_dict()
        theirs = timm.create_model("vit_small_patch16_224", pretrained=False, in_chans=5, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_backbone_settings_and_dynamic_size():
    model = _tiny()
    assert model.blocks[0].attn.qkv.bias is not None
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    for size in (16, 32, 48):
        assert embed(model.eval(), torch.randn(2, 5, size, size)).shape == (2, 32)


@pytest.mark.parametrize("size", [32, 48])
def test_embeddings_equal_direct_timm_forward(size):
    model = _tiny(img_size=size).eval()
    ref = _reference(model, size)
    x = torch.randn(3, 5, size, size)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        blocks = _block_outputs(ref, x)
        torch.testing.assert_close(embed(model, x, "cls"), tokens[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(embed(model, x, "mean"), tokens[:, 1:].mean(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(embed(model, x, "mean_prenorm"), blocks[-1][:, 1:].mean(1), rtol=0, atol=1e-6)
        want = torch.cat([ref.norm(blocks[1])[:, 0], ref.norm(blocks[0])[:, 0]], dim=1)
        torch.testing.assert_close(embed(model, x, "cls", layers=[-2, 0]), want, rtol=0, atol=1e-6)
        want = torch.cat([blocks[0][:, 1:].mean(1), blocks[2][:, 1:].mean(1)], dim=1)
        torch.testing.assert_close(embed(model, x, "mean_prenorm", layers=[0, 2]), want, rtol=0, atol=1e-6)


def test_embed_rejects_bad_pool_and_layer():
    model = _tiny().eval()
    x = torch.randn(1, 5, 32, 32)
    with pytest.raises(ConfigError, match="pooling"):
        embed(model, x, "max")
    with pytest.raises(ConfigError, match="layer 3"):
        embed(model, x, "cls", layers=[3])
