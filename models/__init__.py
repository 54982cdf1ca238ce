"""ViT backbones, the three self-supervised methods, and checkpoint import/export."""
