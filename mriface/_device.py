"""Device selection shared by every stage that computes."""

from __future__ import annotations

import torch

from .errors import BackendError


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """Turn a user's ``device=`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` or ``None`` picks CUDA when it is available, else the CPU.
        Anything else is passed to :class:`torch.device` (``"cpu"``,
        ``"cuda"``, ``"cuda:1"``).

    Returns
    -------
    torch.device

    Raises
    ------
    BackendError
        If CUDA is asked for on a machine without it, or the name is not a device.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackendError(
            f"device={device!r} is not a device name: use 'auto', 'cpu' or 'cuda'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"device={device!r} asks for CUDA, but torch sees no CUDA device here: "
            "use device='cpu' or 'auto'"
        )
    return dev
