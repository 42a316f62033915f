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


# ------------------------------------------------------------------ image files: bit depth, size guard, large photos
def _grey_face() -> np.ndarray:
    return np.asarray(Image.fromarray(_photo("obama", 0.4)).convert("L"))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, aligner):
    g8 = _grey_face()
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    from mriface.recognition import load_image

    np.testing.assert_array_equal(load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png"))
    a = aligner.align([tmp_path / "g16.png", tmp_path / "g8.png"])
    assert a.found.tolist() == [True, True] and a.prob[0] > 0.99
    torch.testing.assert_close(a.crops[0], a.crops[1])
    # arrays: uint16 is 16-bit data too
    np.testing.assert_array_equal(load_image(g8.astype(np.uint16) * 257), load_image(g8))


def test_16_bit_rgb_and_float_tiff(tmp_path):
    from mriface.recognition import load_image

    rgb = _photo("obama", 0.2)
    cv2 = pytest.importorskip("cv2")  # a test dependency: writes 16-bit RGB, which Pillow cannot
    cv2.imwrite(str(tmp_path / "rgb16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    cv2.imwrite(str(tmp_path / "rgb16.tif"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    for name in ("rgb16.png", "rgb16.tif"):
        np.testing.assert_array_equal(load_image(tmp_path / name), rgb)
    g8 = _grey_face()
    Image.fromarray(g8.astype(np.float32) / 255.0).save(tmp_path / "unit.tif")  # float in [0, 1]
    Image.fromarray(g8.astype(np.float32)).save(tmp_path / "byte.tif")  # float in [0, 255]
    Image.fromarray(g8.astype(np.float32) * 4.0 - 300.0).save(tmp_path / "any.tif")  # any range: stretched
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    want = np.repeat(g8[..., None], 3, 2)
    np.testing.assert_array_equal(load_image(tmp_path / "unit.tif"), want)
    np.testing.assert_array_equal(load_image(tmp_path / "byte.tif"), want)
    stretched = load_image(tmp_path / "any.tif").astype(int)
    lo, hi = int(g8.min()), int(g8.max())
    assert np.abs(stretched - (want.astype(float) - lo) * 255 / (hi - lo)).max() <= 1


def _png_header(path, width: int, height: int) -> None:
    """A PNG that declares width x height RGB pixels and holds none (only its header is read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_and_oversized_images_are_refused_naming_the_file(tmp_path, aligner):
    import warnings

    bomb, big = tmp_path / "bomb.png", tmp_path / "huge.png"
    _png_header(bomb, 30000, 30000)  # 900 megapixels: Pillow's DecompressionBombError
    _png_header(big, 10000, 9000)  # 90 megapixels: over mriface's own limit, under Pillow's error
    with pytest.raises(InputFileError, match="bomb.png"):
        aligner.align([bomb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns above 89 megapixels; the guard decides
        with pytest.raises(InputFileError, match=r"huge.png is 10000x9000 pixels \(90 megapixels\)"):
            aligner.align([big])


@pytest.mark.slow
def test_large_jpeg_is_decoded_reduced_and_reports_full_resolution_boxes(tmp_path):
    face = Image.fromarray(_photo("obama", 1.0))
    canvas = Image.new("RGB", (3400, 2600), (90, 90, 90))
    canvas.paste(face.resize((face.width * 3 // 2, face.height * 3 // 2), Image.BICUBIC), (1200, 200))
    path = tmp_path / "big.jpg"
    canvas.save(path, quality=92)
    from mriface.recognition.align import _load

    arr, k = _load(path, 0, 1600)
    assert k == 2 and arr.shape == (1300, 1700, 3)  # JPEG draft at 1/2
    reduced = FaceAligner(device="cpu").align([path])
    full = FaceAligner(device="cpu", decode_side=None).align([path])
    assert reduced.found.all() and full.found.all()
    # the same face in full-resolution pixels, whichever resolution it was decoded at
    assert (reduced.boxes - full.boxes).abs().max() < 12
    assert (reduced.landmarks - full.landmarks).abs().max() < 12
    diff = (reduced.crops - full.crops).abs().mean().item()
    # the same face, cut at half the resolution from a box that MTCNN placed a few pixels apart (0.107 measured)
    assert diff < 0.15, diff


def test_skipping_fine_pyramid_levels_keeps_the_boxes(aligner):
    img = _photo("obama3", 1.0)  # 1434x2333: MTCNN's first level is 1400 px long
    fine = FaceAligner(device="cpu", detect_side=None).align([img])
    coarse = aligner.align([img])  # default detect_side=384 skips four levels
    torch.testing.assert_close(coarse.boxes, fine.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(coarse.crops, fine.crops, atol=5e-4, rtol=0)


@pytest.mark.slow
def test_large_photo_is_detected_on_a_bounded_input_with_the_decoded_images_embedding(tmp_path):
    """A 4000x3000 photograph: decoded at 1/2, MTCNN's levels at most detect_side long, and the
    embedding that the full-size path gives for the decoded image (the only change is the decode)."""
    from mriface.recognition import get_model
    from mriface.recognition.align import _load

    im = Image.open(datasets.fetch("obama")).convert("RGB")  # 910x1137, upscaled to 3000x4000
    path = tmp_path / "large.jpg"
    im.resize((3000, 4000), Image.BICUBIC).save(path, quality=92)
    aligner = FaceAligner(device="cpu")
    seen, levels = [], []
    detect = aligner._detect
    aligner._detect = lambda x: seen.append(tuple(x.shape)) or detect(x)
    hook = aligner._mtcnn.pnet.register_forward_pre_hook(lambda m, a: levels.append(tuple(a[0].shape[-2:])))
    try:
        large = aligner.align([path])
    finally:
        hook.remove()
    assert seen == [(1, 2000, 1500, 3)]  # decoded at 1/2 (JPEG draft), never at 3000x4000
    assert levels and max(max(s) for s in levels) <= aligner.detect_side
    decoded, k = _load(path, 0, aligner.decode_side)
    assert k == 2
    ref = FaceAligner(device="cpu", detect_side=None, decode_side=None).align([decoded])
    assert large.found.all() and ref.found.all()
    # boxes and landmarks in the file's pixels: twice those of the decoded image
    torch.testing.assert_close(large.boxes, ref.boxes * 2, atol=1e-3, rtol=0)
    torch.testing.assert_close(large.landmarks, ref.landmarks * 2, atol=1e-3, rtol=0)
    model = get_model("facenet", device="cpu")
    cos = float((model.embed(large) * model.embed(ref)).sum())
    assert cos > 1 - 1e-6, cos
