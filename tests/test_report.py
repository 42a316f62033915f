"""The study report: exact confidence intervals, figures, and the HTML/Markdown pages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mriface.report import PUBLISHED, Rate, ReportData, plot_rank_histogram, write_report


def test_rate_ci_matches_the_binomial_tail_definition():
    """Rate uses mriface's one Clopper-Pearson (match.clopper_pearson)."""
    from scipy.stats import binom

    import mriface.report

    assert not hasattr(mriface.report, "exact_ci")  # one implementation, in mriface.match
    for x, n in [(70, 84), (80, 84), (0, 10), (10, 10), (3, 7)]:
        r = Rate.of(x, n)
        lo, hi = r.lo, r.hi
        # Clopper-Pearson: P(X >= x | lo) = 2.5% and P(X <= x | hi) = 2.5%
        if x > 0:
            assert binom.sf(x - 1, n, lo) == pytest.approx(0.025, abs=1e-6)
        else:
            assert lo == 0.0
        if x < n:
            assert binom.cdf(x, n, hi) == pytest.approx(0.025, abs=1e-6)
        else:
            assert hi == 1.0
        assert lo <= x / n <= hi


def test_rate_text_of_the_published_study():
    r = Rate.of(PUBLISHED["rank1"], PUBLISHED["n"])
    assert r.text().startswith("70/84 = 83% (95% CI ")
    assert Rate.of(0, 0).text() == "n = 0"


def _data(ranks, n_gallery=6):
    n = len(ranks)
    found = [r for r in ranks if r is not None]
    cmc = np.array([sum(r <= k for r in found) / n for k in range(1, n_gallery + 1)])
    df = pd.DataFrame({"participant": [f"p{i}<b>" for i in range(n)],
                       "true_rank": [np.nan if r is None else r for r in ranks]})
    return ReportData(title="test <study>", ranks=ranks, n_gallery=n_gallery, cmc=cmc,
                      rank1=Rate.of(sum(r == 1 for r in found), n), top5=Rate.of(sum(r <= 5 for r in found), n),
                      participants=df, failures={"no_face_in_renders": 1},
                      problems=["m.csv line 3: scan x.nii does not exist; fix the path"],
                      config={"views": 10})


def test_write_report_pages_and_figures(tmp_path):
    files = write_report(_data([1, 1, 2, None, 6]), tmp_path)
    assert set(files) == {"html", "markdown", "cmc", "rank_histogram"}
    for key in ("cmc", "rank_histogram"):
        with Image.open(files[key]) as im:
            assert im.format == "PNG" and im.size[0] > 300
    page = files["html"].read_text()
    assert "<script" not in page
    assert "test &lt;study&gt;" in page and "p0&lt;b&gt;" in page  # user text is escaped
    assert "2/5 = 40%" in page and "70/84" in page  # this study and the published one
    assert "cmc.png" in page and "rank_histogram.png" in page
    assert "m.csv line 3" in page and "no_face_in_renders" in page
    assert "No face images are included" in page
    md = files["markdown"].read_text()
    assert "| rank 1 | 2/5 = 40%" in md and "![cmc.png](cmc.png)" in md


def test_rank_histogram_shows_not_found(tmp_path):
    """The 'not found' bar is drawn: the figure differs with and without failures."""
    a = plot_rank_histogram([1, 1, 2], 4, tmp_path / "a.png")
    b = plot_rank_histogram([1, 1, 2, None, None], 4, tmp_path / "b.png")
    pa = np.asarray(Image.open(a).convert("L"), float)
    pb = np.asarray(Image.open(b).convert("L"), float)
    assert pa.shape == pb.shape and np.abs(pa - pb).mean() > 0.05
