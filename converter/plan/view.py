"""The source as canonical (Hugging Face) tensor names, after the name mapping.

Planning and numerics only ever see canonical names; a canonical tensor may be a renamed,
split or fused source tensor, materialized on demand from exactly the source bytes it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.sources.checkpoint import SourceCheckpoint
from converter.sources.safetensors import ITEMSIZE


@dataclass(frozen=True)
class CanonicalTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    file: Path  # the first source file, for error messages and read ordering
    offset: int  # byte offset of the first source tensor in `file`, for read ordering

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class CanonicalView:
    """Canonical names -> tensors of one source checkpoint. `derivations` None means the source
    already uses canonical names."""

    def __init__(self, ckpt: SourceCheckpoint, derivations: dict | None = None):
        self.ckpt = ckpt
        self.derivations = derivations
        self.tensors: dict[str, CanonicalTensor] = {}
        if derivations is None:
            for name, info in ckpt.tensors.items():
                self.tensors[name] = CanonicalTensor(name, info.dtype, info.shape, (name,), info.file, info.start)
        else:
            from converter.mapping.names import derived_shape

            shapes = {n: i.shape for n, i in ckpt.tensors.items()}
            for target, d in derivations.items():
                first = ckpt.tensors[d.sources[0]]
                self.tensors[target] = CanonicalTensor(target, first.dtype, tuple(derived_shape(d, shapes)),
                                                       tuple(d.sources), first.file, first.start)

    def source_files(self, name: str) -> list[Path]:
        """Every source file canonical tensor `name` is read from (a DCP tensor's chunks may lie
        in several rank files), in a stable order."""
        return sorted({f for s in self.tensors[name].sources for f in self.ckpt.tensors[s].files})

    def load(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if self.derivations is None:
            return self.ckpt.load(name, device)
        from converter.mapping.names import materialize

        return materialize(self.derivations[name], lambda src: self.ckpt.load(src, device))
