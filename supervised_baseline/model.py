"""The paper's FNN (hti-cnn's KlammbauerNetRelu) and its masked binary cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FNN(nn.Module):
    """Input dropout, then [Linear -> ReLU -> Dropout] per hidden width, then one logit per assay.

    Xavier-normal weights and zero biases, as the paper initialised them.
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (2048, 2048, 2048), dropout: float = 0.5,
                 input_dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(input_dropout)]
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(h)
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) standardised profiles -> (B, assays) logits."""
        return self.net(x)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled entries only (NaN labels are unknown and ignored).

    Why a mask: the paper's label matrix marks unknowns as 0, and filling them with any value would teach the model
    labels nobody measured. With no labelled entry in the batch the loss is 0 (and carries no gradient signal).
    """
    known = ~torch.isnan(labels)
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], labels[known], reduction="mean")
