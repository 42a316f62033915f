"""One base for per-image parameter batches (cameras, lights, material).

A :class:`TensorBatch` is a frozen dataclass whose tensor fields all have the
batch size N as their first dimension; its other fields (plain numbers such as
a camera's clip depths) are shared by the whole batch. The base gives every
such class ``len``, ``.to``, indexing and :meth:`TensorBatch.cat`, so a new
parameter class is only its field list.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import torch

from ..errors import MRIFaceError

__all__ = ["TensorBatch"]

B = TypeVar("B", bound="TensorBatch")


class TensorBatch:
    """Mixin for ``@dataclass(frozen=True, eq=False)`` classes of batched tensors.

    Tensor fields share the leading batch dimension N; every other field is
    batch-wide and must agree when batches are joined.
    """

    def _tensor_fields(self) -> "list[str]":
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def __len__(self) -> int:
        return int(getattr(self, self._tensor_fields()[0]).shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the (first) tensor field."""
        return getattr(self, self._tensor_fields()[0]).device

    def to(self: B, device=None, dtype: "torch.dtype | None" = None) -> B:
        """The same batch on ``device``; ``dtype`` (optional) applies to floating-point fields only."""
        out = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            out[name] = t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return dataclasses.replace(self, **out)

    def __getitem__(self: B, idx) -> B:
        """A sub-batch: ``idx`` an int (kept as a batch of one), slice, index tensor or list."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return dataclasses.replace(self, **{name: getattr(self, name)[idx] for name in self._tensor_fields()})

    @classmethod
    def cat(cls: "type[B]", batches: "Sequence[B]") -> B:
        """One batch of all ``batches`` in order (tensor fields concatenated along N).

        Raises
        ------
        MRIFaceError
            For no batches, or batches whose batch-wide fields differ.
        """
        batches = list(batches)
        if not batches:
            raise MRIFaceError(f"{cls.__name__}.cat: got no batches to join: give at least one")
        first = batches[0]
        tensors = first._tensor_fields()
        for b in batches[1:]:
            for f in dataclasses.fields(first):
                if f.name not in tensors and getattr(b, f.name) != getattr(first, f.name):
                    raise MRIFaceError(
                        f"{cls.__name__}.cat: batches differ in {f.name} ({getattr(first, f.name)!r} vs "
                        f"{getattr(b, f.name)!r}): only batches with equal {f.name} can be joined"
                    )
        return dataclasses.replace(first, **{n: torch.cat([getattr(b, n) for b in batches]) for n in tensors})
