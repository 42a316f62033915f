"""Writing renders: one PNG per image plus a sidecar CSV of its parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._io import atomic_path, child_path, csv_safe, safe_component
from ..errors import InputFileError

__all__ = ["write_renders", "render_filename"]


def render_filename(subject: str, view: int, *, prefix: str = "") -> str:
    """File name of one render: ``{prefix}{subject}_view{view:02d}.png``.

    The subject id becomes one safe name component (:func:`mriface._io.safe_component`:
    unsafe characters -> '_', plus a hash of the id when anything changed).
    """
    return f"{safe_component(prefix) if prefix else ''}{safe_component(subject)}_view{int(view):02d}.png"


def write_renders(batch, folder, *, prefix: str = "") -> "list[Path]":
    """Write every image of a :class:`~mriface.render.RenderBatch` as PNG, plus ``{prefix}renders.csv``.

    Each PNG and the CSV are written atomically (temporary file, then
    rename). The CSV has one row per image: ``file``, then the columns of
    :meth:`RenderBatch.to_dataframe` (subject, view, camera, light and skin
    parameters).

    Parameters
    ----------
    batch : RenderBatch
    folder : str or os.PathLike
        Created if missing.
    prefix : str
        Prepended to every file name.

    Returns
    -------
    list of pathlib.Path
        The PNG paths, in the batch's order (the CSV path is not included).

    Raises
    ------
    InputFileError
        If ``folder`` exists and is not a folder, or cannot be written.
    """
    from PIL import Image

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputFileError(f"write_renders: {folder} exists and is not a folder: give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(f"write_renders: cannot create folder {folder}: {exc}") from exc
    images = (batch.images.detach().cpu().clamp(0, 1) * 255 + 0.5).to(dtype=__import__("torch").uint8).numpy()
    paths = []
    names = []
    for k in range(images.shape[0]):
        name = render_filename(batch.subjects[k], int(batch.view[k]), prefix=prefix)
        path = child_path(folder, name)  # an id-derived name never leaves the folder
        with atomic_path(path) as tmp:
            Image.fromarray(np.ascontiguousarray(images[k])).save(tmp, format="PNG")
        paths.append(path)
        names.append(name)
    df = batch.to_dataframe()
    df.insert(0, "file", names)
    with atomic_path(child_path(folder, f"{safe_component(prefix) if prefix else ''}renders.csv")) as tmp:
        csv_safe(df).to_csv(tmp, index=False)  # ids in cells neutralised against spreadsheet formulas
    return paths
