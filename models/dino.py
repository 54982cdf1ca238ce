"""DINO self-distillation: projection head, centred loss with a teacher-temperature schedule, and an EMA teacher.

State-dict keys mirror the paper's release: the student head is ``head.mlp.{0,2,4}.*`` and
``head.last_layer.weight_g`` / ``head.last_layer.weight_v`` (the classic ``torch.nn.utils.weight_norm`` names, here
implemented directly so no deprecated hook or parametrization renames them); the teacher is ``teacher.backbone.*`` and
``teacher.head.*`` (the paper's ``teacher`` dict is the same without the ``teacher.`` prefix); the centre is
``dino_loss.center``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.base import SSLMethod
from models.collapse import dino_stats
from utils.errors import ConfigError

if TYPE_CHECKING:  # timm is imported only when a model is built, so DINOLoss users (and spawned tests) start fast
    from timm.models.vision_transformer import VisionTransformer


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row (keys ``weight_g``, ``weight_v``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=False)
        self.weight_v = nn.Parameter(base.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def weight(self) -> torch.Tensor:
        """The effective weight, recomputed from g and v so gradients flow to both."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project with the normalised weight."""
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototypes, as in DINO (keys ``mlp.*``, ``last_layer.*``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the prototypes."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def teacher_temp_schedule(warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up (inclusive ends), then constant; any epochs/warm-up ratio."""
    epochs = max(int(epochs), 1)
    out = np.full(epochs, final_temp, dtype=np.float64)
    if warmup_epochs > 0:
        ramp = np.linspace(warmup_temp, final_temp, warmup_epochs)
        n = min(warmup_epochs, epochs)
        out[:n] = ramp[:n]
    return out


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs over all cross-view pairs."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float, n_global: int
    ) -> torch.Tensor:
        """Mean over (teacher view q, student view v != q) of -sum softmax(teacher_q) * log_softmax(student_v)."""
        batch = teacher_output.shape[0] // n_global
        n_crops = student_output.shape[0] // batch
        with torch.autocast(student_output.device.type, enabled=False):
            log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1).view(n_crops, batch, -1)
            centred = (teacher_output.detach().float() - self.center) / teacher_temp
            q = F.softmax(centred, dim=-1).view(n_global, batch, -1)
            cross = -torch.einsum("gbk,vbk->gv", q, log_p) / batch
        if n_global * n_crops == min(n_global, n_crops):
            raise ConfigError("DINO needs at least two views (global or local) to form a cross-view pair")
        same = torch.eye(n_global, n_crops, dtype=torch.bool, device=cross.device)
        loss = cross.masked_fill(same, 0.0).sum() / (n_global * n_crops - min(n_global, n_crops))
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of teacher outputs, summed over every rank so all ranks keep one centre."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (teacher_output.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): -mean log distance of each L2-normalised row to its
    nearest other row, which pushes a batch's features apart and so counters their drift towards one point."""
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
        dist = (x - x[nearest]).norm(dim=-1)
        return -torch.log(dist + eps).mean()


class _Teacher(nn.Module):
    """Backbone + head under the paper's teacher key names (``backbone.*``, ``head.*``)."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head


def _resolution_groups(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive views of the same size, so each resolution needs one backbone pass."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[-2:] == v.shape[-2:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [g[0] if len(g) == 1 else torch.cat(g) for g in groups]


class DINO(SSLMethod):
    """Student (``backbone`` + ``head``) trained to match an EMA ``teacher`` that sees only the global views."""

    def __init__(
        self,
        backbone: VisionTransformer,
        teacher_backbone: VisionTransformer,
        head: DINOHead,
        out_dim: int,
        temp_schedule: np.ndarray,
        n_global_crops: int = 2,
        freeze_last_layer: int = 1,
        koleo_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        teacher_backbone.load_state_dict(backbone.state_dict())
        self.teacher = _Teacher(teacher_backbone, copy.deepcopy(head))
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss = DINOLoss(out_dim)
        self.temp_schedule = np.asarray(temp_schedule, dtype=np.float64)
        self.n_global_crops = n_global_crops
        self.freeze_last_layer = freeze_last_layer
        self.koleo_weight = float(koleo_weight)

    @classmethod
    def build(cls, args: dict[str, Any], in_chans: int) -> DINO:
        """Student and teacher from the paper's train_dino.py flags (drop-path on the student only)."""
        from models.backbones import create_backbone  # lazy: timm (~1.4 s) loads only when a model is built

        arch = args.get("arch", "vit_small")
        patch = args.get("patch_size")
        img_size = int(args.get("global_crops_size") or 224)
        student = create_backbone(
            arch, in_chans, img_size=img_size, patch_size=patch, drop_path_rate=args.get("drop_path_rate", 0.1)
        )
        teacher = create_backbone(arch, in_chans, img_size=img_size, patch_size=patch, drop_path_rate=0.0)
        out_dim = int(args.get("out_dim", 20000))
        head = DINOHead(
            student.embed_dim,
            out_dim,
            use_bn=bool(args.get("use_bn_in_head", False)),
            norm_last_layer=bool(args.get("norm_last_layer", True)),
            hidden_dim=int(args.get("head_hidden_dim", 2048)),
            bottleneck_dim=int(args.get("head_bottleneck_dim", 256)),
        )
        schedule = teacher_temp_schedule(
            args.get("warmup_teacher_temp", 0.02),
            args.get("teacher_temp", 0.04),
            int(args.get("warmup_teacher_temp_epochs", 20)),
            int(args.get("epochs", 200)),
        )
        model = cls(
            student,
            teacher,
            head,
            out_dim,
            schedule,
            n_global_crops=int(args.get("global_crops_number", 2)),
            freeze_last_layer=int(args.get("freeze_last_layer", 3)),
            koleo_weight=float(args.get("koleo_weight") or 0.0),
        )
        if args.get("use_bn_in_head") and dist.is_available() and dist.is_initialized():
            model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)  # same keys; stats over all ranks
            model.teacher.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.teacher.head)
        return model

    def teacher_temp(self, state: dict[str, Any]) -> float:
        """``state["teacher_temp"]`` when the loop sets it, else this run's per-epoch schedule."""
        if state.get("teacher_temp") is not None:
            return float(state["teacher_temp"])
        epoch = min(int(state.get("epoch", 0)), len(self.temp_schedule) - 1)
        return float(self.temp_schedule[epoch])

    def _student(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits of every view, and the backbone features of the first resolution group (the globals)."""
        feats = [self.backbone(group) for group in _resolution_groups(views)]
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0]), feats[0]

    def forward(self, views: list[torch.Tensor], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """views[0] holds the global crops (teacher and student); later specs are student-only local crops."""
        views = [views[0], *(v for v in views[1:] if v.shape[0] > 0)]  # e.g. --local_crops_number 0
        if views[0].shape[0] % self.n_global_crops:
            raise ConfigError(
                f"the first view tensor has {views[0].shape[0]} rows, not a multiple of {self.n_global_crops} "
                "global crops"
            )
        batch = views[0].shape[0] // self.n_global_crops
        for v in views[1:]:
            if v.shape[0] % batch:
                raise ConfigError(f"a view tensor has {v.shape[0]} rows, not a multiple of the batch size {batch}")
        temp = self.teacher_temp(state)
        with torch.no_grad():
            teacher_feat = self.teacher.backbone(views[0])
            teacher_out = self.teacher.head(teacher_feat)
        center = self.dino_loss.center.detach().clone()  # the loss updates it in place
        student_out, student_feat = self._student(views)
        loss = self.dino_loss(student_out, teacher_out, temp, self.n_global_crops)
        self.record_embedding(teacher_feat, **dino_stats(teacher_out, center, temp, loss))
        logs: dict[str, Any] = {"teacher_temp": temp}
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(chunk) for chunk in student_feat[: batch * self.n_global_crops].chunk(
                self.n_global_crops)) / self.n_global_crops
            loss = loss + self.koleo_weight * koleo
            logs["koleo"] = koleo.detach()
        return loss, logs

    def inference_backbone(self) -> nn.Module:
        """Inference embeds with the teacher (the paper's and DINO's choice)."""
        return self.teacher.backbone

    @torch.no_grad()
    def after_step(self, state: dict[str, Any]) -> None:
        """teacher = m * teacher + (1 - m) * student, with m = ``state["momentum"]``."""
        m = float(state["momentum"])
        student = [*self.backbone.parameters(), *self.head.parameters()]
        teacher = [*self.teacher.backbone.parameters(), *self.teacher.head.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1 - m)

    def before_optimizer_step(self, state: dict[str, Any]) -> None:
        """Drop the last layer's gradients while ``epoch < freeze_last_layer`` (stabilises early training)."""
        if int(state.get("epoch", 0)) < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None
