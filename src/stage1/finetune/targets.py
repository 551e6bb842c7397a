"""Find, in any transformers ViT, the encoder blocks and the Linear projections PEFT should wrap.

Nothing here names one architecture: the block list is the longest ``nn.ModuleList`` of identical
blocks holding Linear layers (``encoder.layer`` in Dinov2, ``model.layer`` in DINOv3), and the
projections are the ``nn.Linear`` modules inside the chosen blocks, so new ViTs work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from stage1._core.errors import ConfigError, UnknownNameError

#: Which Linear layers of a block to wrap: every projection, the attention ones, or Q and V only.
TARGET_KINDS = ("all", "attention", "qv")

# Last name component of query / value projections across transformers ViTs (and timm's fused qkv).
_QUERY_VALUE_NAMES = {"q_proj", "query", "q", "v_proj", "value", "v", "qkv"}


@dataclass(frozen=True)
class BlockList:
    """The encoder's block list: its dotted module path and the blocks in order."""

    prefix: str
    blocks: tuple[nn.Module, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        """Dotted path of block ``index`` (negative indices count from the end)."""
        return f"{self.prefix}.{index % len(self.blocks)}"


def find_blocks(model: nn.Module) -> BlockList:
    """The transformer block list of ``model``; raises ValueError when none is found."""
    n_expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(sub, nn.Linear) for sub in module[0].modules()):
            continue
        found.append((name, module))
    if n_expected is not None:
        exact = [item for item in found if len(item[1]) == n_expected]
        found = exact or found
    if not found:
        raise ConfigError(
            f"{type(model).__name__}: no encoder block list found (expected an nn.ModuleList of "
            "identical blocks with Linear layers); is this a ViT backbone?"
        )
    name, blocks = max(found, key=lambda item: len(item[1]))  # max keeps the first (outermost) tie
    return BlockList(prefix=name, blocks=tuple(blocks))


def block_indices(n_blocks: int, last: int) -> list[int]:
    """Indices of the last ``last`` blocks; a clear error when ``last`` is out of range."""
    if not 0 <= last <= n_blocks:
        raise ConfigError(f"blocks must be between 0 and {n_blocks} for this backbone, got {last}")
    return list(range(n_blocks - last, n_blocks))


def _is_attention(path_in_block: str) -> bool:
    return any(part.startswith("att") or part == "self_attn" for part in path_in_block.split("."))


def linear_targets(model: nn.Module, indices: list[int], kind: str = "all") -> list[str]:
    """Full module names of the Linear layers of blocks ``indices`` selected by ``kind``.

    ``all``: attention and MLP projections; ``attention``: attention projections; ``qv``: query
    and value projections (ExPLoRA's LoRA placement), falling back to all attention projections
    when the model has no separately named Q and V.
    """
    if kind not in TARGET_KINDS:
        raise UnknownNameError(f"unknown target kind {kind!r}; choose one of: {', '.join(TARGET_KINDS)}")
    blocks = find_blocks(model)
    names: list[str] = []
    for index in indices:
        prefix = blocks.block_prefix(index)
        block_linears = [
            (sub_name, f"{prefix}.{sub_name}")
            for sub_name, sub in blocks.blocks[index].named_modules()
            if isinstance(sub, nn.Linear)
        ]
        chosen = block_linears
        if kind in ("attention", "qv"):
            chosen = [item for item in block_linears if _is_attention(item[0])]
        if kind == "qv":
            qv = [item for item in chosen if item[0].rsplit(".", 1)[-1] in _QUERY_VALUE_NAMES]
            chosen = qv or chosen
        names.extend(full for _, full in chosen)
    return names


def block_parameter_names(model: nn.Module, indices: list[int]) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every parameter inside blocks ``indices``."""
    blocks = find_blocks(model)
    prefixes = tuple(blocks.block_prefix(i) + "." for i in indices)
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Names of every LayerNorm / RMSNorm-style parameter (ExPLoRA trains all norm layers)."""
    names: list[str] = []
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        if not is_norm:
            continue
        for p_name, _ in module.named_parameters(recurse=False):
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names
