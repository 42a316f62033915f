"""FaceAligner: detection policy, crops, no-face results and input handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mriface import datasets
from mriface.errors import InputFileError
from mriface.recognition import FaceAligner


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner(device="cpu")


def _photo(key: str, scale: float = 0.5) -> np.ndarray:
    im = Image.open(datasets.fetch(key)).convert("RGB")
    return np.asarray(im.resize((int(im.width * scale), int(im.height * scale)), Image.BILINEAR))


def test_photographs_give_one_face_each_with_standardised_crops(aligner):
    paths = [datasets.fetch(k) for k in ("obama", "biden")]
    a = aligner.align(paths)
    assert a.crops.shape == (2, 3, 160, 160) and a.crops.dtype == torch.float32
    assert a.found.tolist() == [True, True]
    assert a.n_faces.tolist() == [1, 1]
    assert torch.all(a.prob >= 0.9)
    for box, path in zip(a.boxes, paths):
        w, h = Image.open(path).size
        x1, y1, x2, y2 = box.tolist()
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) > 0.1 * w  # a portrait: the face is large
    # (x - 127.5) / 128 of 0..255 pixels, and a real picture, not a constant
    assert a.crops.min() >= -1.0 and a.crops.max() <= 1.0
    assert a.crops.std() > 0.2


def test_no_face_is_a_result_in_place(aligner):
    rng = np.random.default_rng(0)
    blank = np.full((200, 240, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    a = aligner.align([blank, _photo("obama"), noise])
    assert a.found.tolist() == [False, True, False]
    assert a.n_faces.tolist() == [0, 1, 0]
    assert torch.isnan(a.prob[[0, 2]]).all() and not torch.isnan(a.prob[1])
    assert torch.isnan(a.boxes[[0, 2]]).all()
    assert torch.all(a.crops[[0, 2]] == 0) and a.crops[1].abs().sum() > 0


def test_several_faces_policy(aligner):
    big, small = _photo("obama", 0.5), _photo("biden", 0.2)
    canvas = np.zeros((max(big.shape[0], small.shape[0]), big.shape[1] + small.shape[1] + 20, 3), np.uint8)
    canvas[: big.shape[0], : big.shape[1]] = big
    canvas[: small.shape[0], big.shape[1] + 20:] = small
    largest = aligner.align([canvas])
    assert largest.n_faces.item() == 2
    assert largest.boxes[0, 2] <= big.shape[1]  # the big (left) face was kept
    probable = FaceAligner(device="cpu", select="probable").align([canvas])
    assert probable.n_faces.item() == 2
    assert probable.prob[0] >= largest.prob[0]
    # the most probable face is the one whose detection probability is highest, whichever side
    left = FaceAligner(device="cpu").align([big]).prob[0]
    right = FaceAligner(device="cpu").align([small]).prob[0]
    if abs(float(left) - float(right)) > 1e-6:  # equal probabilities leave the choice to MTCNN's order
        assert (probable.boxes[0, 2] <= big.shape[1]).item() == bool(left > right)


def test_float_tensor_input_matches_uint8_arrays(aligner):
    imgs = np.stack([_photo("obama2", 0.4)[:400, :240]] * 2)
    imgs[1] = 0  # the second one has no face
    a_arr = aligner.align(list(imgs))
    a_ten = aligner.align(torch.from_numpy(imgs).float() / 255.0)
    assert a_arr.found.tolist() == a_ten.found.tolist() == [True, False]
    torch.testing.assert_close(a_ten.boxes[0], a_arr.boxes[0], atol=0.5, rtol=0)
    assert (a_ten.crops[0] - a_arr.crops[0]).abs().mean() < 0.02


def test_crop_geometry_follows_the_box_and_margin():
    al = FaceAligner(device="cpu", image_size=16, margin=4)
    h, w = 40, 60
    xs = torch.arange(w, dtype=torch.float32).expand(h, w)
    img = torch.stack([xs, xs, xs], -1)[None]  # value = column index
    box = torch.tensor([[10.0, 5.0, 34.0, 29.0]])
    crop = al._crop(img, box) * 128.0 + 127.5
    # margin 4 of 16 output pixels: the box grows by 4 / (16 - 4) of its width, half per side
    x1 = 10 - 24 * 4 / 12 / 2
    width = 24 * (1 + 4 / 12)
    centres = x1 + (torch.arange(16) + 0.5) * width / 16 - 0.5  # pixel i has its centre at i + 0.5
    torch.testing.assert_close(crop[0, 0, 8], centres, atol=1e-3, rtol=0)


def test_unreadable_image_names_the_file(aligner, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(InputFileError, match="broken.jpg"):
        aligner.align([bad])
    with pytest.raises(InputFileError, match="missing.png"):
        aligner.align([tmp_path / "missing.png"])


@pytest.mark.gpu
def test_cuda_alignment_agrees_with_cpu(aligner):
    # only files that travel with the tree: a reference face on a canvas, and an empty image
    from pathlib import Path

    face = Image.open(Path(__file__).parent / "data" / "facenet-reference" / "paul_rudd.png").convert("RGB")
    canvas = np.zeros((400, 400, 3), np.uint8)
    canvas[80:368, 60:348] = np.asarray(face.resize((288, 288), Image.BILINEAR))
    imgs = [canvas, np.zeros((300, 300, 3), np.uint8)]
    cpu, gpu = aligner.align(imgs), FaceAligner(device="cuda").align(imgs)
    assert gpu.found.tolist() == cpu.found.tolist() == [True, False]
    assert gpu.crops.device.type == "cpu"
    torch.testing.assert_close(gpu.boxes[0], cpu.boxes[0], atol=1.0, rtol=0)
