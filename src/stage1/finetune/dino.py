"""DINO self-distillation pieces (Caron et al. 2021), the objective ExPLoRA continues on new images.

A projection head maps CLS features to ``out_dim`` prototype scores; the teacher (an EMA of the
student) is centred and sharpened with a low temperature, and the student is trained to match the
teacher's distribution on the *other* view. Only the CLS (DINO) term is used here, not the iBOT
patch term or KoLeo of DINOv2: the goal is adapting the CLS features the store caches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from stage1._core.errors import ConfigError

#: views per image: the student on each view learns the teacher on the other
N_VIEWS = 2


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine scores against L2-normalised prototypes.

    The normalised last layer equals DINO's weight-normed layer with its norm frozen at 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over swapped views.

    ``center`` is an EMA of the teacher's mean output (a buffer), which with sharpening avoids
    collapse to one prototype or to the uniform distribution.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        if not (student_temp > 0 and teacher_temp > 0):
            raise ConfigError("temperatures must be > 0")
        if not 0.0 <= center_momentum < 1.0:
            raise ConfigError("center momentum must be in [0, 1)")
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """``student_out`` / ``teacher_out``: [N_VIEWS * B, out_dim], view-major. Updates the centre."""
        student_chunks = (student_out.float() / self.student_temp).chunk(N_VIEWS)
        teacher_probs = F.softmax((teacher_out.float().detach() - self.center) / self.teacher_temp, dim=-1)
        teacher_chunks = teacher_probs.chunk(N_VIEWS)
        total, terms = student_out.new_zeros((), dtype=torch.float32), 0
        for t_index, t in enumerate(teacher_chunks):
            for s_index, s in enumerate(student_chunks):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / max(terms, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """DINO's cosine schedule of the teacher momentum from ``base`` up to 1 over training."""
    if total_steps <= 1:
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / (total_steps - 1)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for the named tensors given."""
    for name, t in teacher.items():
        t.mul_(momentum).add_(student[name].detach(), alpha=1.0 - momentum)
