"""The one exception hierarchy of mriface.

Every error a user can cause (a bad file, missing data, an impossible option)
is a :class:`MRIFaceError` whose message says which input was wrong and what
to do. The command line prints that message on one line and exits with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "MRIFaceError",
    "InputFileError",
    "VolumeError",
    "SurfaceError",
    "DataUnavailableError",
    "WeightsError",
    "BackendError",
    "ManifestError",
]


class MRIFaceError(Exception):
    """Base class of every error that a user's input or setup can cause."""


class InputFileError(MRIFaceError):
    """A file is missing, unreadable, truncated or of an unsupported format."""


class VolumeError(MRIFaceError):
    """A volume was read but cannot be used: wrong dimensionality, empty, no head."""


class SurfaceError(MRIFaceError):
    """No usable head surface could be built (or loaded) from the input."""


class DataUnavailableError(MRIFaceError):
    """Sample data or a file to fetch is not cached and cannot be fetched."""


class WeightsError(MRIFaceError):
    """Face-recognition weights are missing, corrupt or do not fit the network."""


class BackendError(MRIFaceError):
    """A rendering or compute backend is not available for the request."""


class ManifestError(MRIFaceError):
    """A study manifest, BIDS dataset or photograph folder is malformed."""
