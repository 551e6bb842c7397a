"""Self-distillation pieces of ``adapt``: a simplified DINO objective, plus two optional DINO / iBOT terms.

What ``adapt`` runs by default is a *simplified* DINO objective (Caron et al. 2021): CLS-token
self-distillation only. A projection head maps the CLS feature to ``out_dim`` prototype scores; the
teacher (an EMA of the student) is centred and sharpened with a low temperature, and the student on
one view learns the teacher's distribution on the *other* view. Two global views per image, no
multi-crop; no iBOT masked-patch loss and no KoLeo (DINOv2's other terms): the goal is adapting
the CLS features the store caches, and a short CPU-sized run cannot afford more.

Two options add the missing pieces, both off by default (experimental: not shown to help in our
measurement, ``benchmarks/finetune_bench.py --ablate-adapt``):

* multi-crop (DINO): ``n_local`` small local crops per image that only the student sees; the
  student on every crop learns the teacher on each global view (``DinoLoss`` takes any number of
  student crops);
* iBOT masked-patch self-distillation (Zhou et al. 2022, as DINOv2 uses it): the student sees its
  global views with a fraction of the patch tokens replaced by the backbone's mask token
  (``bool_masked_pos``), and at those positions learns, through a patch head, the teacher's
  centred, sharpened patch-token distribution of the unmasked view (``IBotPatchLoss``,
  ``random_patch_masks``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from stage1._core.errors import ConfigError

#: global views per image: the student on each view learns the teacher on the other
N_VIEWS = 2
#: iBOT / DINOv2 masking: this share of the global views is masked, each at a ratio drawn from MASK_RATIO
MASK_PROBABILITY = 0.5
MASK_RATIO = (0.1, 0.5)


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


class _Distillation(nn.Module):
    """What DINO's and iBOT's terms share: temperatures and the teacher's EMA centre (a buffer),
    which with sharpening keeps the teacher from collapsing to one prototype or to uniform."""

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

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DinoLoss(_Distillation):
    """Cross-entropy between the centred, sharpened teacher and the student over swapped views.

    ``center`` is an EMA of the teacher's mean output (a buffer), which with sharpening avoids
    collapse to one prototype or to the uniform distribution. With multi-crop the student has more
    crops than the teacher: the teacher's two global views come first in the student's output, and
    every student crop learns every teacher view except its own (DINO's loss).
    """

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """``teacher_out``: [N_VIEWS * B, out_dim]; ``student_out``: [(N_VIEWS + n_local) * B, out_dim],
        the global views first; both view-major. Updates the centre."""
        n_crops = student_out.shape[0] * N_VIEWS // teacher_out.shape[0]
        student_chunks = (student_out.float() / self.student_temp).chunk(n_crops)
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


class IBotPatchLoss(_Distillation):
    """iBOT's masked-patch term: at each masked position, the student's patch-token scores learn the
    teacher's centred, sharpened scores of the same position in the unmasked view.

    Per image, the cross-entropy is averaged over its masked patches; images are then averaged over
    *all* images of the batch (unmasked ones add zero), as DINOv2's ``iBOTPatchLoss`` weighs it.
    ``center`` is its own EMA of the teacher's mean patch output (a buffer), apart from DINO's.
    """

    def forward(self, student_masked: torch.Tensor, teacher_masked: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``student_masked`` / ``teacher_masked``: [M, out_dim] scores at the masked positions, in
        ``masks[masks]`` order; ``masks``: [n_images, n_patches] bool with M True. Updates the centre."""
        if not bool(masks.any()):
            return student_masked.new_zeros((), dtype=torch.float32)
        teacher_probs = F.softmax((teacher_masked.float().detach() - self.center) / self.teacher_temp, dim=-1)
        ce = torch.sum(-teacher_probs * F.log_softmax(student_masked.float() / self.student_temp, dim=-1), dim=-1)
        per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).expand_as(masks)[masks].to(ce.dtype)
        self.update_center(teacher_masked)
        return (ce / per_image).sum() / masks.shape[0]


def random_patch_masks(
    n_images: int,
    n_patches: int,
    generator: torch.Generator,
    probability: float = MASK_PROBABILITY,
    ratio: tuple[float, float] = MASK_RATIO,
) -> torch.Tensor:
    """[n_images, n_patches] bool: each image is masked with ``probability``, then at a ratio drawn
    uniformly from ``ratio`` (at least one patch), at uniformly random positions.

    iBOT and DINOv2 mask blocks of patches; at the few patches of small CPU inputs (8 x 8 at 112 px)
    blocks and random positions differ little, and random positions need no shape search.
    """
    if not 0.0 <= probability <= 1.0 or not 0.0 < ratio[0] <= ratio[1] <= 1.0:
        raise ConfigError(f"mask probability must be in [0, 1] and ratios in (0, 1], got {probability}, {ratio}")
    masked = torch.rand(n_images, generator=generator) < probability
    ratios = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n_images, generator=generator)
    counts = torch.clamp(torch.round(ratios * n_patches), min=1).long() * masked
    order = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1)
    ranks = order.argsort(dim=1)  # each patch's position in a random order
    return ranks < counts[:, None]


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
