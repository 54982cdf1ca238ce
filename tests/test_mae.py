"""MAE: masking, sin-cos tables, encoder equivalence with timm, loss from its definition, paper key layout."""

from __future__ import annotations

import math

import pytest
import torch

from models.mae import DECODERS, MaskedAutoencoder, random_masking, sincos_2d
from utils.errors import CheckpointError

ARGS = {"model": "vit_debug_patch8", "input_size": 32, "norm_pix_loss": True, "mask_ratio": 0.75}


def _model(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder.build({**ARGS, **kw}, in_chans=5)


def test_decoder_sizes_follow_the_paper():
    assert DECODERS[384] == (256, 8, 8)
    assert DECODERS[768] == (512, 8, 16)
    with torch.device("meta"):
        small = MaskedAutoencoder.build({"model": "mae_vit_small"}, in_chans=5)
    assert small.decoder_embed.out_features == 256 and len(small.decoder_blocks) == 8
    assert small.decoder_blocks[0].attn.num_heads == 8
    assert small.decoder_pred.out_features == 16 * 16 * 5
    assert small.backbone.blocks[0].attn.qkv.bias is not None


def test_sincos_table_matches_formula():
    dim, grid = 8, 3
    table = sincos_2d(dim, grid)
    assert table.shape == (grid * grid + 1, dim) and not table[0].any()
    for r in range(grid):
        for c in range(grid):
            row = table[1 + r * grid + c]
            for half, coord in ((0, c), (1, r)):
                for i in range(dim // 4):
                    freq = 1.0 / 10000 ** (i / (dim / 4))
                    assert row[half * dim // 2 + i] == pytest.approx(math.sin(coord * freq))
                    assert row[half * dim // 2 + dim // 4 + i] == pytest.approx(math.cos(coord * freq))


def test_random_masking_is_per_sample_and_reproducible():
    gen = torch.Generator().manual_seed(3)
    keep, mask, restore = random_masking(4, 16, 0.75, gen, torch.device("cpu"))
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12.0] * 4
    for b in range(4):
        assert mask[b, keep[b]].sum() == 0
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 1
    keep2, mask2, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(keep, keep2) and torch.equal(mask, mask2)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(keep, torch.argsort(noise, dim=1)[:, :4])
    assert torch.equal(torch.gather(torch.argsort(noise, dim=1), 1, restore), torch.arange(16).expand(4, 16))


def test_unmasked_encoder_equals_timm_forward():
    model = _model().eval()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        latent, mask, restore = model.forward_encoder(x, 0.0, torch.Generator().manual_seed(0))
        ref = model.backbone.forward_features(x)
    assert mask.sum() == 0
    torch.testing.assert_close(latent[:, 0], ref[:, 0], rtol=0, atol=1e-5)
    unshuffled = torch.gather(latent[:, 1:], 1, restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    torch.testing.assert_close(unshuffled, ref[:, 1:], rtol=0, atol=1e-5)


def _patches_by_loop(imgs: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = imgs.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_direct_recomputation(norm_pix):
    model = _model(norm_pix_loss=norm_pix)
    x = torch.randn(3, 5, 32, 32)
    state = {"epoch": 1, "step": 5}
    loss, _ = model([x], state)
    gen = model.step_generator(x.device, state)
    latent, mask, restore = model.forward_encoder(x, 0.75, gen)
    pred = model.forward_decoder(latent, restore, (4, 4)).detach()
    target = _patches_by_loop(x, 8)
    total, count = 0.0, 0
    for b in range(3):
        for k in range(16):
            if mask[b, k] == 0:
                continue
            t = target[b, k]
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(float(t.var(unbiased=True)) + 1e-6)
            total += float(((pred[b, k] - t) ** 2).mean())
            count += 1
    assert count == 3 * 12
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert model.backbone.pos_embed.grad is None and not model.decoder_pos_embed.requires_grad
    assert model.backbone.cls_token.grad is not None and model.mask_token.grad is not None
    again, _ = _model(norm_pix_loss=norm_pix)([x], state)
    assert again.item() == loss.item()


def _paper_keys(depth: int, dec_depth: int) -> list[str]:
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    keys += ["norm.weight", "norm.bias", "mask_token", "decoder_pos_embed"]
    keys += ["decoder_embed.weight", "decoder_embed.bias"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(dec_depth) for k in block]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def test_paper_state_dict_loads_strictly_with_qkv_biases():
    model = _model()
    shapes = {k: v.shape for k, v in model.paper_state_dict().items()}
    assert sorted(shapes) == sorted(_paper_keys(2, 1))
    torch.manual_seed(5)
    paper = {k: torch.randn(shapes[k]) for k in _paper_keys(2, 1)}
    model.load_paper_state_dict(paper)
    torch.testing.assert_close(model.backbone.blocks[1].attn.qkv.bias, paper["blocks.1.attn.qkv.bias"])
    torch.testing.assert_close(model.decoder_blocks[0].attn.qkv.bias, paper["decoder_blocks.0.attn.qkv.bias"])
    assert model.backbone.state_dict().keys() == {k for k in paper if not k.startswith(("decoder", "mask_"))}
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.bias"):
        model.load_paper_state_dict({k: v for k, v in paper.items() if k != "blocks.0.attn.qkv.bias"})
