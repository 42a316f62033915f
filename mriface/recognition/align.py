"""Face detection and alignment: one MTCNN detection -> the crop each face model asks for.

Photographs and renders go through the same code: facenet-pytorch's MTCNN
(its bundled P-, R- and O-net weights) finds faces and their five landmarks,
one face per image is kept by a fixed policy, and from that one detection the
aligner cuts a crop for every :class:`~mriface.recognition.CropSpec` it was
built with:

* ``"box"`` (FaceNet): the box plus a margin, resampled to a square with
  ``torchvision.ops.roi_align`` (bilinear, area-averaged);
* ``"arcface"`` (ArcFace-style 112-px models): the least-squares similarity
  transform (rotation, uniform scale, shift) that takes the five landmarks
  onto insightface's five-point template, warped with ``grid_sample``
  (bilinear), batched on the aligner's device.

Each crop is then normalised as its spec says (FaceNet: ``(x - 127.5) / 128``
on 0..255 RGB).

Policy, per image
-----------------
* A detection counts as a face when MTCNN's three-stage cascade accepts it
  *and* its final probability is at least ``min_prob`` (default 0.90).
  ``n_faces`` is the number of such faces.
* With several faces, ``select="largest"`` (default) keeps the one with the
  largest box area: the subject of a portrait or a render is the largest
  face, while small faces in the background are the usual extra detections.
  ``select="probable"`` keeps the most probable one instead.
* No face: ``found`` is False, ``prob``, ``boxes`` and ``landmarks`` are NaN,
  the crops are all zeros, and the image keeps its place in every output
  (never dropped).
* The margin follows facenet-pytorch's convention: ``margin`` pixels of the
  *output* crop are added around the box (half on each side). Parts of a
  crop that fall outside the image are zero before normalisation (black).

Large photographs
-----------------
A photograph file whose long side exceeds ``decode_side`` (default 1600) is
decoded reduced by an integer factor (JPEG: Pillow's ``draft``, which decodes
at 1/2, 1/4 or 1/8 in the DCT domain; other formats: ``Image.reduce``),
keeping its long side at least ``decode_side``: a portrait's face stays far
larger than any crop. MTCNN then searches a pyramid whose first level is the
image scaled by ``12 / min_face_size``; when that level's long side would
exceed ``detect_side`` (default 384), detection starts at the first level of
the same pyramid that fits (``min_face_size`` raised by whole pyramid steps),
so the boxes are those of the full-size path whenever the face is large
enough to be found there (a resampled copy moved boxes by up to 25 px on the
sample photographs). The smallest face found in a large image is then about
``12 * long side / detect_side`` pixels of the decoded image (up to 1.4 times that), e.g. 62 px
in a 2000-px-long decoded photograph. Crops are cut from the decoded image.
``Alignment.boxes`` and ``landmarks`` are always in the pixels of the image as
given (the file's full resolution, after its EXIF orientation).

The size policy is the same for every photograph: what MTCNN and the crops
read is under ``2 * decode_side`` pixels long (a 4000x3000 JPEG: 2000x1500),
and MTCNN's largest level at most ``detect_side``. A photograph under
``2 * decode_side`` (all the sample photographs) is read at full size, so its
embedding is that of the full-size path; a larger one is resampled by the
decoder, and no resampled path agrees with the full-size one better than the
full-size path agrees with itself when the photograph is shifted by one pixel
(FaceNet cosine down to 0.97: docs/recognition.md). Files and arrays are
converted once, from uint8 to planar float memory, which detection and
cropping share.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .._device import resolve_device
from ..errors import MRIFaceError
from .images import MAX_IMAGE_PIXELS, _load, load_image  # noqa: F401  (load_image, MAX_IMAGE_PIXELS re-exported)
from .models import ARCFACE_TEMPLATE, FACENET_CROP, CropSpec

__all__ = ["Alignment", "FaceAligner", "load_image", "similarity_transform", "DEFAULT_MARGIN",
           "DEFAULT_MIN_PROB", "MAX_IMAGE_PIXELS"]

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
        (N, 3, S, S) float32 crops for the aligner's first :class:`CropSpec`
        (FaceNet's by default: ``(rgb - 127.5) / 128``); zeros where no face.
    found : torch.Tensor
        (N,) bool, a face was kept.
    prob : torch.Tensor
        (N,) float32 MTCNN probability of the kept face, NaN if none.
    boxes : torch.Tensor
        (N, 4) float32 ``x1, y1, x2, y2`` in input pixels (before the
        margin), NaN if none.
    n_faces : torch.Tensor
        (N,) int64 number of faces with probability >= ``min_prob``.
    landmarks : torch.Tensor
        (N, 5, 2) float32 ``x, y`` input pixels of the kept face's left eye,
        right eye, nose tip, left and right mouth corners (image left and
        right), NaN if none (or if not given).
    specs : tuple of CropSpec
        The specs this alignment has crops for (the first is ``crops``').
    extra_crops : dict
        CropSpec -> (N, 3, S, S) crops for the other specs; use :meth:`crop_for`.
    """

    crops: torch.Tensor
    found: torch.Tensor
    prob: torch.Tensor
    boxes: torch.Tensor
    n_faces: torch.Tensor
    landmarks: "torch.Tensor | None" = None
    specs: "tuple[CropSpec, ...]" = ()
    extra_crops: "Mapping[CropSpec, torch.Tensor]" = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.landmarks is None:  # built by hand (tests, older callers): unknown landmarks
            object.__setattr__(self, "landmarks", torch.full((len(self), 5, 2), float("nan")))

    def __len__(self) -> int:
        return int(self.found.shape[0])

    def crop_for(self, spec: CropSpec) -> torch.Tensor:
        """The (N, 3, S, S) crops cut for ``spec`` (zeros where no face).

        Raises
        ------
        MRIFaceError
            The aligner was not built with ``spec``.
        """
        if spec in self.extra_crops:
            return self.extra_crops[spec]
        if (self.specs and spec == self.specs[0]) or (not self.specs and spec.size == self.crops.shape[-1]
                                                      and spec.alignment == "box"):
            return self.crops
        raise MRIFaceError(f"this alignment has no crops for {spec}: build the FaceAligner with "
                           f"crops=(..., {spec}) (it has {', '.join(map(str, self.specs)) or 'only .crops'})")


# ----------------------------------------------------------------------------- geometry
def _embed_found(embedder, alignment: Alignment) -> torch.Tensor:
    """(N, dim) float32 embeddings of an alignment's crops for ``embedder.crop``; NaN rows where no face.

    The :class:`Alignment` branch of the built-in embedders' ``embed``: only images with a face are embedded.
    """
    out = torch.full((len(alignment), embedder.dim), float("nan"), dtype=torch.float32)
    rows = torch.nonzero(alignment.found).flatten()
    if len(rows):
        out[rows] = embedder.embed(alignment.crop_for(embedder.crop)[rows])
    return out


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (rotation, uniform scale, shift) taking ``src`` onto ``dst``.

    Umeyama's solution without reflection; in 2-D it has a closed form: with
    points as complex numbers ``z`` (source) and ``w`` (target), centred,
    ``c = sum(conj(z) w) / sum(|z|^2)`` and ``w ~ c (z - mean z) + mean w``.

    Parameters
    ----------
    src, dst : torch.Tensor
        (B, K, 2) and (K, 2) or (B, K, 2) point sets, K >= 2.

    Returns
    -------
    torch.Tensor
        (B, 2, 3) matrices ``M`` with ``dst ~ M[:, :, :2] @ src + M[:, :, 2]``.
    """
    src = src.to(torch.float64)
    dst = dst.to(device=src.device, dtype=torch.float64).expand_as(src)
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - ms, dst - md
    n2 = (s ** 2).sum((1, 2))
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(1) / n2
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / n2
    rot = torch.stack([torch.stack([a, -b], 1), torch.stack([b, a], 1)], 1)  # (B, 2, 2)
    t = md[:, 0] - (rot @ ms[:, 0, :, None])[..., 0]
    return torch.cat([rot, t[..., None]], 2)


def _warp_arcface(img: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) 0..255 images and (B, 5, 2) landmarks -> (B, 3, size, size) template-aligned crops.

    Coordinates are pixel-centre based (pixel i spans [i - 0.5, i + 0.5]),
    as insightface's template and OpenCV's ``warpAffine`` use them.
    """
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) * (size / 112.0)
    m = similarity_transform(points, template)  # landmarks -> template
    rot, t = m[:, :, :2], m[:, :, 2]
    inv = torch.linalg.inv(rot)
    idx = torch.arange(size, dtype=torch.float64, device=points.device)
    gy, gx = torch.meshgrid(idx, idx, indexing="ij")
    out_xy = torch.stack([gx, gy], -1).reshape(1, -1, 2)  # (1, S*S, 2) output pixel centres
    src_xy = (out_xy - t[:, None, :]) @ inv.transpose(1, 2)  # (B, S*S, 2) source pixel centres
    h, w = img.shape[-2:]
    # grid_sample with align_corners=False: pixel centre i sits at (2i + 1) / n - 1
    grid = torch.stack([(2 * src_xy[..., 0] + 1) / w - 1, (2 * src_xy[..., 1] + 1) / h - 1], -1)
    grid = grid.reshape(-1, size, size, 2).to(img.dtype)
    return torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _planar(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) values stored plane by plane: a view of a contiguous (B, 3, H, W) tensor.

    MTCNN permutes its input to (B, 3, H, W) and resamples it once per
    pyramid level and per candidate box; on planar memory a 2000x1500
    photograph's detection took 1.4 s of CPU instead of 1.4-3.3 s (loaded
    2-core machine), with the same boxes to 1e-4 px.
    """
    return x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


class FaceAligner:
    """Detect one face per image with MTCNN and cut the crops the face models ask for.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` = CUDA when present.
    crops : sequence of CropSpec, optional
        The crops to cut from each detection; the first becomes
        ``Alignment.crops``, all are available from ``Alignment.crop_for``.
        Default: one ``"box"`` crop of ``image_size`` pixels with FaceNet's
        normalisation (FaceNet's crop at the default 160).
    image_size : int
        Side of the default box crop in pixels (FaceNet: 160); ignored when
        ``crops`` is given.
    margin : int
        Pixels of a ``"box"`` crop added around the detected box
        (facenet-pytorch's convention), default :data:`DEFAULT_MARGIN`.
    min_prob : float
        Minimum detection probability for a face (after MTCNN's own
        thresholds 0.6, 0.7, 0.7).
    select : {"largest", "probable"}
        Which face to keep when there are several (see module docstring).
    min_face_size : int
        Smallest face MTCNN looks for, pixels of the image it detects on.
    batch_size : int
        Most images of equal size detected together; fewer when they are
        large, so that a batch holds at most ``batch_pixels`` pixels (MTCNN's
        first stage allocates a few floats per pixel and pyramid level).
    batch_pixels : int
        Pixel budget of one detection batch (default 16 images of 512x512).
    detect_side : int or None
        Longest side of MTCNN's first pyramid level: finer levels are skipped
        in larger images (see "Large photographs" above); None: never.
    decode_side : int or None
        Image files whose long side is larger are decoded reduced by an
        integer factor, keeping the long side at least this; None: never.

    Examples
    --------
    >>> from mriface import datasets
    >>> from mriface.recognition import CropSpec
    >>> arcface = CropSpec(112, "arcface", "arcface")
    >>> aligner = FaceAligner(device="cpu", crops=(FaceAligner.default_crop(), arcface))
    >>> a = aligner.align([datasets.fetch("obama"), datasets.fetch("biden")])
    >>> a.crops.shape, a.found.tolist(), tuple(a.crop_for(arcface).shape), tuple(a.landmarks.shape)
    (torch.Size([2, 3, 160, 160]), [True, True], (2, 3, 112, 112), (2, 5, 2))
    """

    def __init__(self, *, device: "str | torch.device" = "auto", crops: "Sequence[CropSpec] | None" = None,
                 image_size: int = 160, margin: int = DEFAULT_MARGIN, min_prob: float = DEFAULT_MIN_PROB,
                 select: str = "largest", min_face_size: int = 20, batch_size: int = 16,
                 batch_pixels: int = 16 * 512 * 512, detect_side: "int | None" = 384,
                 decode_side: "int | None" = 1600) -> None:
        from facenet_pytorch import MTCNN

        if select not in ("largest", "probable"):
            raise MRIFaceError(f"select={select!r}: use 'largest' or 'probable'")
        if crops is None:
            crops = (FACENET_CROP if image_size == FACENET_CROP.size else
                     CropSpec(int(image_size), "box", FACENET_CROP.normalisation),)
        crops = tuple(dict.fromkeys(crops))  # unique, in order
        if not crops or not all(isinstance(c, CropSpec) for c in crops):
            raise MRIFaceError(f"crops={crops!r}: give one or more CropSpec")
        for c in crops:
            if c.alignment == "box" and not 0 <= margin < c.size:
                raise MRIFaceError(f"margin={margin} must be in [0, image_size={c.size})")
        if batch_size < 1:
            raise MRIFaceError(f"batch_size={batch_size} must be >= 1")
        for name, v in (("detect_side", detect_side), ("decode_side", decode_side)):
            if v is not None and v < 64:
                raise MRIFaceError(f"{name}={v}: give at least 64 pixels, or None")
        self.device = resolve_device(device)
        self.crops = crops
        self.image_size = crops[0].size
        self.margin = int(margin)
        self.min_prob = float(min_prob)
        self.select = select
        self.batch_size = int(batch_size)
        self.batch_pixels = int(batch_pixels)
        self.detect_side = detect_side
        self.decode_side = decode_side
        self._mtcnn = MTCNN(image_size=self.image_size, margin=margin, min_face_size=min_face_size,
                            select_largest=False, keep_all=True, device=self.device)
        self._mtcnn.eval()

    @staticmethod
    def default_crop() -> CropSpec:
        """FaceNet's crop, the default: 160 px box with margin, ``(x - 127.5) / 128``."""
        return FACENET_CROP

    # ------------------------------------------------------------------ inputs
    def _per_batch(self, h: int, w: int) -> int:
        return max(1, min(self.batch_size, self.batch_pixels // max(1, h * w)))

    def _batches(self, images: object) -> "list[tuple[list[int], torch.Tensor, list[int]]]":
        """Group the inputs into (indices, (B, H, W, 3) float 0..255 tensor, decode factors) of equal size.

        Images from files and arrays come as views of planar (B, 3, H, W)
        memory, converted from uint8 in one pass: detection and cropping read
        that memory without copying a photograph again (see :func:`_planar`).
        """
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[-1] != 3:
                raise MRIFaceError(
                    f"image tensor has shape {tuple(images.shape)}: give (N, H, W, 3) in [0, 1]"
                )
            x = images.detach()
            x = x.float() if x.dtype == torch.uint8 else x.float().clamp(0, 1) * 255.0
            n, step = x.shape[0], self._per_batch(x.shape[1], x.shape[2])
            return [(list(range(i, min(i + step, n))), x[i:i + step], [1] * len(range(i, min(i + step, n))))
                    for i in range(0, n, step)]
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray, int]]] = {}
        for i, item in enumerate(images):
            arr, k = _load(item, i, self.decode_side)
            groups.setdefault(arr.shape[:2], []).append((i, arr, k))
        out = []
        for (h, w), members in groups.items():
            step = self._per_batch(h, w)
            for j in range(0, len(members), step):
                chunk = members[j:j + step]
                x = torch.empty((len(chunk), 3, h, w), dtype=torch.float32)
                for row, (_, a, _) in enumerate(chunk):
                    a = a if a.flags.writeable else a.copy()  # torch.from_numpy warns on read-only memory
                    x[row].copy_(torch.from_numpy(a).permute(2, 0, 1))
                out.append(([i for i, _, _ in chunk], x.permute(0, 2, 3, 1), [k for _, _, k in chunk]))
        return out

    # ------------------------------------------------------------------ core
    def _select(self, boxes: object, probs: object) -> "tuple[int | None, np.ndarray | None, float, int]":
        """Apply the face policy to one image's detections -> (detection index, box, prob, n_faces)."""
        if boxes is None:
            return None, None, float("nan"), 0
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        keep = np.flatnonzero(p >= self.min_prob)
        if len(keep) == 0:
            return None, None, float("nan"), 0
        b, p = b[keep], p[keep]
        if self.select == "largest":
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            best = int(np.argmax(area))
        else:
            best = int(np.argmax(p))
        return int(keep[best]), b[best], float(p[best]), int(len(p))

    def _crop(self, x: torch.Tensor, boxes: torch.Tensor, spec: "CropSpec | None" = None) -> torch.Tensor:
        """Margin-expanded boxes of (B, H, W, 3) 0..255 images -> normalised (B, 3, S, S) box crops."""
        spec = spec or self.crops[0]
        return spec.normalise(self._box_crop(x.permute(0, 3, 1, 2).contiguous(), boxes, spec.size))

    def _box_crop(self, img: torch.Tensor, boxes: torch.Tensor, s: int) -> torch.Tensor:
        """(B, 3, H, W) 0..255 images, (B, 4) boxes in pixels -> (B, 3, s, s) 0..255 crops."""
        from torchvision.ops import roi_align

        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        # facenet-pytorch: margin pixels of the output crop, scaled back to the input
        mx = self.margin * w / (s - self.margin) / 2
        my = self.margin * h / (s - self.margin) / 2
        rois = torch.stack([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device),
                            boxes[:, 0] - mx, boxes[:, 1] - my, boxes[:, 2] + mx, boxes[:, 3] + my], 1)
        return roi_align(img, rois, output_size=(s, s), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def _detect(self, x: torch.Tensor) -> "tuple[list, list, list]":
        """MTCNN on a (B, H, W, 3) 0..255 batch -> boxes, probabilities and landmarks per image.

        MTCNN scans an image pyramid whose first level is the image scaled by
        ``12 / min_face_size`` (each level resampled from the image itself).
        When that level's long side would exceed ``detect_side``, the finest
        levels are skipped: ``min_face_size`` is raised by whole pyramid
        steps, so that the levels searched are exactly the coarser levels of
        the full-size path and a face they find gets the same box. (Detecting
        on a resampled copy instead moved boxes by up to 25 px on the sample
        photographs, and FaceNet embeddings by up to 0.04 in cosine.)
        """
        from facenet_pytorch.models.utils.detect_face import detect_face

        mt = self._mtcnn
        minsize = float(mt.min_face_size)
        first = max(x.shape[1:3]) * 12.0 / minsize
        if self.detect_side is not None and first > self.detect_side:
            steps = math.ceil(math.log(first / self.detect_side) / -math.log(mt.factor) - 1e-9)
            minsize = minsize / mt.factor ** steps
            x = _planar(x)  # no copy when x is a view of planar memory (files and arrays: _batches)
        else:
            # channels-last memory here, so that smaller images keep their exact arithmetic (planar
            # memory changes the resampling's summation order: about 1e-6 in an embedding)
            x = x.contiguous()
        batch_boxes, batch_points = detect_face(x, minsize, mt.pnet, mt.rnet, mt.onet, mt.thresholds,
                                                mt.factor, self.device)
        boxes, probs, points = [], [], []
        for b, pt in zip(batch_boxes, batch_points):  # as MTCNN.detect(select_largest=False) returns them
            b = np.asarray(b)
            if len(b) == 0:
                boxes.append(None), probs.append([None]), points.append(None)
            else:
                boxes.append(b[:, :4]), probs.append(b[:, 4]), points.append(np.asarray(pt))
        return boxes, probs, points

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
            One row per input image, in input order, with crops for every spec.

        Raises
        ------
        InputFileError
            An image file cannot be read or is too large (the message names it).
        """
        batches = self._batches(images)
        n = sum(len(idx) for idx, _, _ in batches)
        crops = {spec: torch.zeros((n, 3, spec.size, spec.size), dtype=torch.float32) for spec in self.crops}
        found = torch.zeros(n, dtype=torch.bool)
        prob = torch.full((n,), float("nan"), dtype=torch.float32)
        boxes = torch.full((n, 4), float("nan"), dtype=torch.float32)
        marks = torch.full((n, 5, 2), float("nan"), dtype=torch.float32)
        n_faces = torch.zeros(n, dtype=torch.int64)
        for idx, x, factors in batches:
            x = x.to(self.device)
            det_boxes, det_probs, det_points = self._detect(x)
            keep_rows, keep_boxes, keep_points = [], [], []
            for row, (b, p, pts) in enumerate(zip(det_boxes, det_probs, det_points)):
                j, box, pr, count = self._select(b, p)
                n_faces[idx[row]] = count
                if box is None:
                    continue
                pt = np.asarray(pts, dtype=np.float64).reshape(-1, 5, 2)[j]
                keep_rows.append(row)
                keep_boxes.append(box)
                keep_points.append(pt)
                found[idx[row]] = True
                prob[idx[row]] = pr
                # pixels of the decoded image (x) -> pixels of the image as given
                boxes[idx[row]] = torch.as_tensor(box * factors[row], dtype=torch.float32)
                marks[idx[row]] = torch.as_tensor(pt * factors[row], dtype=torch.float32)
            if not keep_rows:
                continue
            dest = torch.as_tensor([idx[r] for r in keep_rows])
            img = x.permute(0, 3, 1, 2).contiguous()  # no copy for files and arrays (planar already)
            if len(keep_rows) < len(idx):
                img = img[torch.as_tensor(keep_rows, device=self.device)]
            kb = torch.as_tensor(np.stack(keep_boxes), dtype=torch.float32, device=self.device)
            kp = torch.as_tensor(np.stack(keep_points), dtype=torch.float64, device=self.device)
            raw: dict[tuple[int, str], torch.Tensor] = {}  # one resampling per geometry, shared by normalisations
            for spec in self.crops:
                key = (spec.size, spec.alignment)
                if key not in raw:
                    raw[key] = (self._box_crop(img, kb, spec.size) if spec.alignment == "box"
                                else _warp_arcface(img, kp, spec.size))
                crops[spec][dest] = spec.normalise(raw[key]).float().cpu()
        first = self.crops[0]
        return Alignment(crops=crops[first], found=found, prob=prob, boxes=boxes, n_faces=n_faces,
                         landmarks=marks, specs=self.crops,
                         extra_crops={s: c for s, c in crops.items() if s != first})

    __call__ = align
