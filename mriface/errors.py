"""The one exception hierarchy of mriface.

Every error a user can cause (a bad file, missing data, an impossible option)
is a :class:`MRIFaceError` whose message says which input was wrong and what
to do. The command line prints that message on one line and exits with
status 2; any other exception is a bug and keeps its traceback.

Each class also inherits the built-in exception that says what it means
(:class:`OSError` for a file that cannot be read, :class:`FileNotFoundError`
for data that is not there, :class:`ValueError` for a value that cannot be
used), so that ``except ValueError`` in a user's notebook still catches a
malformed manifest.

Examples
--------
>>> issubclass(ManifestError, ValueError) and issubclass(InputFileError, OSError)
True
>>> str(InputFileError("scan.nii: not a readable NIfTI; check the file"))
'scan.nii: not a readable NIfTI; check the file'
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
    "TransformError",
]


class MRIFaceError(Exception):
    """Base class of every error that a user's input or setup can cause."""


class InputFileError(MRIFaceError, OSError):
    """A file is missing, unreadable, truncated or of an unsupported format."""


class VolumeError(MRIFaceError, ValueError):
    """A volume was read but cannot be used: wrong dimensionality, empty, no head."""


class SurfaceError(MRIFaceError, ValueError):
    """No usable head surface could be built (or loaded) from the input."""


class DataUnavailableError(MRIFaceError, FileNotFoundError):
    """Sample data or a file to fetch is not cached and cannot be fetched."""


class WeightsError(MRIFaceError, OSError):
    """Face-recognition weights are missing, corrupt or do not fit the network."""


class BackendError(MRIFaceError, ValueError):
    """A rendering or compute backend is not available for the request."""


class ManifestError(MRIFaceError, ValueError):
    """A study manifest, BIDS dataset or photograph folder is malformed."""


class TransformError(MRIFaceError, ValueError):
    """A study's probe transform (e.g. a defacing function) failed on one scan or returned no scan."""
