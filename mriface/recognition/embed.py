"""FaceNet embeddings: standardised 160x160 crops -> L2-normalised 512-d vectors."""

from __future__ import annotations

import os

import torch

from .._device import resolve_device
from ..errors import MRIFaceError
from .align import Alignment
from .weights import build_network

__all__ = ["FaceNetEmbedder"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FaceNetEmbedder:
    """facenet-pytorch's ``InceptionResnetV1`` in eval mode, batched, on any device.

    Parameters
    ----------
    weights : path-like, optional
        State dict or frozen ``.pb`` graph; default: ``$MRIFACE_FACENET_WEIGHTS``,
        else the cached CASIA-WebFace conversion (see :mod:`mriface.recognition.weights`).
    device : str or torch.device
        ``"auto"`` = CUDA when present.
    dtype : torch.dtype
        Precision of the network: ``torch.float32`` (default), or
        ``torch.float16`` / ``torch.bfloat16`` (meant for CUDA; bfloat16 also
        runs on the CPU). Embeddings are always returned as float32 and
        re-normalised in float32.
    batch_size : int
        Crops per forward pass.
    random_weights : bool
        Skip loading weights (timing runs where the weights file is absent).

    Examples
    --------
    >>> from mriface import datasets
    >>> from mriface.recognition import FaceAligner
    >>> photos = [datasets.fetch(k) for k in ("obama", "obama2", "biden")]
    >>> e = FaceNetEmbedder(device="cpu").embed(FaceAligner(device="cpu").align(photos))
    >>> e.shape
    torch.Size([3, 512])
    >>> bool(e[0] @ e[1] > e[0] @ e[2])  # two photographs of one person are the closer pair
    True
    """

    def __init__(self, weights: "str | os.PathLike[str] | None" = None, *,
                 device: "str | torch.device" = "auto", dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, random_weights: bool = False) -> None:
        if dtype not in _DTYPES:
            raise MRIFaceError(f"dtype={dtype}: use torch.float32, torch.float16 or torch.bfloat16")
        if batch_size < 1:
            raise MRIFaceError(f"batch_size={batch_size} must be >= 1")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.model = build_network(weights, random=random_weights).to(self.device, dtype)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, device: "str | torch.device" = "auto",
                   dtype: torch.dtype = torch.float32, batch_size: int = 64) -> "FaceNetEmbedder":
        """Wrap an existing ``InceptionResnetV1`` (copied, so the original keeps its device and dtype)."""
        import copy

        self = cls.__new__(cls)
        if dtype not in _DTYPES:
            raise MRIFaceError(f"dtype={dtype}: use torch.float32, torch.float16 or torch.bfloat16")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.model = copy.deepcopy(model).eval().to(self.device, dtype)
        return self

    def precision(self):
        """Context in which the network runs at this embedder's precision.

        On CUDA, cuDNN convolutions default to TF32 (10-bit mantissa), which
        moves a float32 embedding by about 1e-3 relative. ``dtype=float32``
        means IEEE float32 here: TF32 is switched off inside this context
        only (no global setting is changed). Use float16 or bfloat16 for speed.
        """
        import contextlib

        if self.device.type != "cuda" or self.dtype != torch.float32:
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                           deterministic=cudnn.deterministic, allow_tf32=False)

    @torch.no_grad()
    def embed(self, crops: "torch.Tensor | Alignment") -> torch.Tensor:
        """Embed standardised face crops.

        Parameters
        ----------
        crops : torch.Tensor or Alignment
            (N, 3, 160, 160) float, ``(rgb - 127.5) / 128`` (what
            :class:`~mriface.recognition.FaceAligner` returns). Given an
            :class:`Alignment`, only images with a face are embedded and rows
            without one are NaN.

        Returns
        -------
        torch.Tensor
            (N, 512) float32 on the CPU, unit L2 norm per row.
        """
        if isinstance(crops, Alignment):
            out = torch.full((len(crops), 512), float("nan"), dtype=torch.float32)
            rows = torch.nonzero(crops.found).flatten()
            if len(rows):
                out[rows] = self.embed(crops.crops[rows])
            return out
        if not isinstance(crops, torch.Tensor) or crops.ndim != 4 or crops.shape[1] != 3:
            shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
            raise MRIFaceError(f"crops {shape}: give a (N, 3, 160, 160) tensor or an Alignment")
        parts = []
        with self.precision():
            for i in range(0, crops.shape[0], self.batch_size):
                x = crops[i:i + self.batch_size].to(self.device, self.dtype, non_blocking=True)
                e = self.model(x).float()
                parts.append(torch.nn.functional.normalize(e, dim=1).cpu())
        if not parts:
            return torch.zeros((0, 512), dtype=torch.float32)
        return torch.cat(parts)

    __call__ = embed
