"""Face detection and alignment: MTCNN boxes -> 160x160 crops standardised for FaceNet.

Photographs and renders go through the same code: facenet-pytorch's MTCNN
(its bundled P-, R- and O-net weights) finds faces, one face per image is
kept by a fixed policy, and that box (plus a margin) is resampled to a square
crop with ``torchvision.ops.roi_align``. Crops are standardised the way the
FaceNet weights expect: ``(x - 127.5) / 128`` on 0..255 RGB.

Policy, per image
-----------------
* A detection counts as a face when MTCNN's three-stage cascade accepts it
  *and* its final probability is at least ``min_prob`` (default 0.90).
  ``n_faces`` is the number of such faces.
* With several faces, ``select="largest"`` (default) keeps the one with the
  largest box area: the subject of a portrait or a render is the largest
  face, while small faces in the background are the usual extra detections.
  ``select="probable"`` keeps the most probable one instead.
* No face: ``found`` is False, ``prob`` and ``boxes`` are NaN, the crop is
  all zeros, and the image keeps its place in every output (never dropped).
* The margin follows facenet-pytorch's convention: ``margin`` pixels of the
  *output* crop are added around the box (half on each side). Parts of the
  crop that fall outside the image are zero before standardisation (black).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._device import resolve_device
from ..errors import InputFileError, MRIFaceError

__all__ = ["Alignment", "FaceAligner", "load_image", "DEFAULT_MARGIN", "DEFAULT_MIN_PROB"]

#: pixels of the 160-pixel crop added around MTCNN's box (see docs/recognition.md)
DEFAULT_MARGIN = 32
#: minimum MTCNN probability for a detection to count as a face
DEFAULT_MIN_PROB = 0.90


@dataclass(frozen=True)
class Alignment:
    """Result of :meth:`FaceAligner.align` for N images (all CPU tensors).

    Attributes
    ----------
    crops : torch.Tensor
        (N, 3, S, S) float32, ``(rgb - 127.5) / 128``; zeros where no face.
    found : torch.Tensor
        (N,) bool, a face was kept.
    prob : torch.Tensor
        (N,) float32 MTCNN probability of the kept face, NaN if none.
    boxes : torch.Tensor
        (N, 4) float32 ``x1, y1, x2, y2`` in input pixels (before the
        margin), NaN if none.
    n_faces : torch.Tensor
        (N,) int64 number of faces with probability >= ``min_prob``.
    """

    crops: torch.Tensor
    found: torch.Tensor
    prob: torch.Tensor
    boxes: torch.Tensor
    n_faces: torch.Tensor

    def __len__(self) -> int:
        return int(self.found.shape[0])


def load_image(item: object, index: int = 0) -> np.ndarray:
    """One image as an (H, W, 3) uint8 RGB array.

    Parameters
    ----------
    item : path-like, PIL.Image or numpy array
        A path to any image file PIL reads (turned upright by its EXIF
        orientation tag); a PIL image (any mode); an array
        (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 or float in [0, 1].
    index : int
        Position in the caller's list, for error messages.

    Raises
    ------
    InputFileError
        The file is missing or not an image.
    MRIFaceError
        The object is not an image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            with Image.open(path) as im:
                # phone photographs are often stored sideways with an EXIF orientation tag
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise InputFileError(
                f"cannot read image {path}: {exc}. Give a JPEG/PNG (anything Pillow opens)"
            ) from exc
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"), dtype=np.uint8).copy()
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MRIFaceError(
            f"image {index} has shape {arr.shape}: give (H, W, 3) RGB, a PIL image or a file path"
        )
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise MRIFaceError(f"image {index} has dtype {arr.dtype}: give uint8 or float in [0, 1]")
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class FaceAligner:
    """Detect one face per image with MTCNN and cut the crop FaceNet expects.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` = CUDA when present.
    image_size : int
        Side of the square crop in pixels (FaceNet: 160).
    margin : int
        Pixels of the crop added around the detected box (facenet-pytorch's
        convention), default :data:`DEFAULT_MARGIN`.
    min_prob : float
        Minimum detection probability for a face (after MTCNN's own
        thresholds 0.6, 0.7, 0.7).
    select : {"largest", "probable"}
        Which face to keep when there are several (see module docstring).
    min_face_size : int
        Smallest face MTCNN looks for, pixels.
    batch_size : int
        Most images of equal size detected together; fewer when they are
        large, so that a batch holds at most ``batch_pixels`` pixels (MTCNN's
        first stage allocates a few floats per pixel and pyramid level).
    batch_pixels : int
        Pixel budget of one detection batch (default 16 images of 512x512).

    Examples
    --------
    >>> from mriface import datasets
    >>> aligner = FaceAligner(device="cpu")
    >>> a = aligner.align([datasets.fetch("obama"), datasets.fetch("biden")])
    >>> a.crops.shape, a.found.tolist()
    (torch.Size([2, 3, 160, 160]), [True, True])
    """

    def __init__(self, *, device: "str | torch.device" = "auto", image_size: int = 160,
                 margin: int = DEFAULT_MARGIN, min_prob: float = DEFAULT_MIN_PROB,
                 select: str = "largest", min_face_size: int = 20, batch_size: int = 16,
                 batch_pixels: int = 16 * 512 * 512) -> None:
        from facenet_pytorch import MTCNN

        if select not in ("largest", "probable"):
            raise MRIFaceError(f"select={select!r}: use 'largest' or 'probable'")
        if not 0 <= margin < image_size:
            raise MRIFaceError(f"margin={margin} must be in [0, image_size={image_size})")
        if batch_size < 1:
            raise MRIFaceError(f"batch_size={batch_size} must be >= 1")
        self.device = resolve_device(device)
        self.image_size = int(image_size)
        self.margin = int(margin)
        self.min_prob = float(min_prob)
        self.select = select
        self.batch_size = int(batch_size)
        self.batch_pixels = int(batch_pixels)
        self._mtcnn = MTCNN(image_size=image_size, margin=margin, min_face_size=min_face_size,
                            select_largest=False, keep_all=True, device=self.device)
        self._mtcnn.eval()

    # ------------------------------------------------------------------ inputs
    def _per_batch(self, h: int, w: int) -> int:
        return max(1, min(self.batch_size, self.batch_pixels // max(1, h * w)))

    def _batches(self, images: object) -> "list[tuple[list[int], torch.Tensor]]":
        """Group the inputs into (indices, (B, H, W, 3) float 0..255 tensor) of equal size."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[-1] != 3:
                raise MRIFaceError(
                    f"image tensor has shape {tuple(images.shape)}: give (N, H, W, 3) in [0, 1]"
                )
            x = images.detach()
            x = x.float() if x.dtype == torch.uint8 else x.float().clamp(0, 1) * 255.0
            n, step = x.shape[0], self._per_batch(x.shape[1], x.shape[2])
            return [(list(range(i, min(i + step, n))), x[i:i + step]) for i in range(0, n, step)]
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for i, item in enumerate(images):
            arr = load_image(item, i)
            groups.setdefault(arr.shape[:2], []).append((i, arr))
        out = []
        for (h, w), members in groups.items():
            step = self._per_batch(h, w)
            for j in range(0, len(members), step):
                chunk = members[j:j + step]
                x = torch.from_numpy(np.stack([a for _, a in chunk])).float()
                out.append(([i for i, _ in chunk], x))
        return out

    # ------------------------------------------------------------------ core
    def _select(self, boxes: object, probs: object) -> "tuple[np.ndarray | None, float, int]":
        """Apply the face policy to one image's detections -> (box, prob, n_faces)."""
        if boxes is None:
            return None, float("nan"), 0
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        keep = p >= self.min_prob
        b, p = b[keep], p[keep]
        if len(p) == 0:
            return None, float("nan"), 0
        if self.select == "largest":
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            best = int(np.argmax(area))
        else:
            best = int(np.argmax(p))
        return b[best], float(p[best]), int(len(p))

    def _crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Resample margin-expanded boxes of (B, H, W, 3) 0..255 images to standardised crops.

        ``boxes`` is (B, 4) pixels; returns (B, 3, S, S) float32.
        """
        from torchvision.ops import roi_align

        s = self.image_size
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        # facenet-pytorch: margin pixels of the output crop, scaled back to the input
        mx = self.margin * w / (s - self.margin) / 2
        my = self.margin * h / (s - self.margin) / 2
        rois = torch.stack([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device),
                            boxes[:, 0] - mx, boxes[:, 1] - my, boxes[:, 2] + mx, boxes[:, 3] + my], 1)
        img = x.permute(0, 3, 1, 2).contiguous()
        crops = roi_align(img, rois, output_size=(s, s), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return (crops - 127.5) / 128.0

    @torch.no_grad()
    def align(self, images: object) -> Alignment:
        """Detect, select and crop one face per image.

        Parameters
        ----------
        images : list or torch.Tensor
            A list (or one) of file paths, PIL images or (H, W, 3) uint8
            arrays (sizes may differ); or a float tensor (N, H, W, 3) in
            [0, 1] such as ``RenderBatch.images``.

        Returns
        -------
        Alignment
            One row per input image, in input order.

        Raises
        ------
        InputFileError
            An image file cannot be read (the message names it).
        """
        batches = self._batches(images)
        n = sum(len(idx) for idx, _ in batches)
        s = self.image_size
        crops = torch.zeros((n, 3, s, s), dtype=torch.float32)
        found = torch.zeros(n, dtype=torch.bool)
        prob = torch.full((n,), float("nan"), dtype=torch.float32)
        boxes = torch.full((n, 4), float("nan"), dtype=torch.float32)
        n_faces = torch.zeros(n, dtype=torch.int64)
        for idx, x in batches:
            x = x.to(self.device)
            det_boxes, det_probs = self._mtcnn.detect(x)
            keep_rows, keep_boxes = [], []
            for row, (b, p) in enumerate(zip(det_boxes, det_probs)):
                box, pr, count = self._select(b, p)
                n_faces[idx[row]] = count
                if box is not None:
                    keep_rows.append(row)
                    keep_boxes.append(box)
                    found[idx[row]] = True
                    prob[idx[row]] = pr
                    boxes[idx[row]] = torch.as_tensor(box, dtype=torch.float32)
            if keep_rows:
                sel = torch.as_tensor(keep_rows, device=self.device)
                kb = torch.as_tensor(np.stack(keep_boxes), dtype=torch.float32, device=self.device)
                c = self._crop(x[sel], kb).float().cpu()
                crops[torch.as_tensor([idx[r] for r in keep_rows])] = c
        return Alignment(crops=crops, found=found, prob=prob, boxes=boxes, n_faces=n_faces)

    __call__ = align
