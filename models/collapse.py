"""Collapse diagnostics: is a self-supervised run still learning, or have its outputs stopped depending on the input?

Two families of indicators, computed from tensors the training step already has:
- Embedding spread (every method): the per-dimension standard deviation of the L2-normalised backbone embedding
  across the batch (SimSiam, Chen & He 2021). Spread-out unit vectors in d dimensions have a std near 1/sqrt(d); a
  collapsed backbone, which maps every input to the same vector, has 0. The effective rank (Roy & Vetterli 2007,
  exp of the entropy of the normalised singular values) says how many directions the batch really uses.
- DINO's own study (Caron et al. 2021, section 5.3): the entropy of the centred, sharpened teacher distribution and
  KL(teacher || student). Uniform collapse has entropy ln(K) and KL 0; collapse onto one dominant prototype has
  entropy near 0 and KL 0. The centre's norm shows whether centring is doing all the work.

``CollapseMonitor`` turns the epoch means into a plain-words verdict with what to try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EMBED_STD_FLOOR = 0.1  # collapsed when std * sqrt(d) stays below this (a tenth of the spread of random directions)
ENTROPY_CEILING = 0.99  # uniform collapse when the teacher entropy stays within 1 % of ln(K)
PATIENCE = 2  # epochs in a row before the monitor calls it


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean per-dimension std of the L2-normalised rows of ``z`` (B, d), and that std times sqrt(d) (1 = healthy)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_spread needs a (batch >= 2, dim) matrix, got {tuple(z.shape)}")
    unit = F.normalize(z.detach().float(), dim=1)
    std = unit.std(dim=0).mean()
    return {"embed_std": std, "embed_std_ratio": std * math.sqrt(z.shape[1])}


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) with p the singular values of the centred, L2-normalised batch over their sum (1 .. min(B, d))."""
    unit = F.normalize(z.detach().float(), dim=1)
    s = torch.linalg.svdvals((unit - unit.mean(dim=0, keepdim=True)).cpu())
    total = s.sum()
    if total <= 0:
        return torch.ones(())
    p = s / total
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean entropy (nats) of softmax((teacher - centre) / temperature) over the rows: ln(K) means uniform."""
    logp = F.log_softmax((teacher_logits.detach().float() - center.float()) / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def dino_stats(
    teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float, loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Teacher entropy, its ceiling ln(K), KL(teacher || student) and the centre norm for one DINO step.

    The DINO loss is the mean cross-entropy H(q, p) over (teacher view, other view) pairs, and every teacher view is
    in the same number of pairs, so the mean KL is exactly the loss minus the mean teacher entropy.
    """
    k = teacher_logits.shape[-1]
    entropy = teacher_entropy(teacher_logits, center, temperature)
    return {
        "teacher_entropy": entropy,
        "teacher_entropy_max": torch.tensor(math.log(k), device=entropy.device),
        "kl_teacher_student": (loss.detach().float() - entropy).clamp_min(0.0),
        "center_norm": center.detach().float().norm(),
    }


@dataclass
class CollapseMonitor:
    """Watches the epoch means and says, in plain words, when a run has stayed collapsed for ``patience`` epochs."""

    method: str
    patience: int = PATIENCE
    streak: dict[str, int] = field(default_factory=dict)

    def signs(self, record: dict[str, float]) -> dict[str, str]:
        """The collapse signs present in one epoch record (``train_*`` means), keyed by kind."""
        found = {}
        ratio = record.get("train_embed_std_ratio")
        if ratio is not None and ratio < EMBED_STD_FLOOR:
            found["embedding"] = (f"the backbone embedding has collapsed (per-dimension std x sqrt(d) = {ratio:.3f}, "
                                  f"healthy is about 1, threshold {EMBED_STD_FLOOR})")
        entropy, ceiling = record.get("train_teacher_entropy"), record.get("train_teacher_entropy_max")
        if entropy is not None and ceiling and entropy >= ENTROPY_CEILING * ceiling:
            found["uniform"] = (f"the teacher's output is uniform (entropy {entropy:.4f} of ln(K) = {ceiling:.4f}): "
                                "DINO's uniform collapse")
        kl = record.get("train_kl_teacher_student")
        if entropy is not None and ceiling and kl is not None and entropy < 0.05 * ceiling and kl < 1e-3:
            found["dominant"] = (f"the teacher puts all mass on one prototype (entropy {entropy:.4f}, KL {kl:.2e}): "
                                 "DINO's dominant-dimension collapse")
        return found

    def update(self, record: dict[str, float]) -> str | None:
        """Feed one epoch record; returns the warning once some sign has lasted ``patience`` epochs, else None."""
        found = self.signs(record)
        self.streak = {k: self.streak.get(k, 0) + 1 for k in found}
        lasting = [found[k] for k, n in self.streak.items() if n >= self.patience]
        if not lasting:
            return None
        return f"{self.method} looks collapsed for {self.patience}+ epochs: " + "; ".join(lasting) + ". " + ADVICE[
            self.method]

    def state(self) -> dict[str, int]:
        """The streaks, so a resumed run keeps counting."""
        return dict(self.streak)


ADVICE = {
    "dino": ("Try: the relative colour augmentation (the default; --color_aug paper is far too strong on dark "
             "images), a lower --momentum_teacher for short runs, a smaller --out_dim, a longer "
             "--warmup_teacher_temp_epochs, or a lower --lr (docs/LEARNING.md)."),
    "simclr": ("Try: the relative colour augmentation (the default), a lower --lr, a higher --temperature, or a "
               "larger --batch_size (docs/LEARNING.md)."),
    "mae": "Try: a lower --blr or --lr, or --norm_pix_loss (docs/LEARNING.md).",
}
