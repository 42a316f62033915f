"""A study's report: headline rates, CMC curve, rank histogram, tables, problems.

The report is an HTML page (``report.html``) and the same content as
Markdown (``report.md``), beside two PNG figures (``cmc.png``,
``rank_histogram.png``) drawn with matplotlib's Agg backend (no display
needed). It shows no face: renders and photographs appear only when the study
was run with ``include_images=True``, and then only as links to the image
folder the study wrote.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ._io import atomic_path, write_text_atomic

__all__ = ["Rate", "ReportData", "plot_cmc", "plot_rank_histogram", "write_report", "PUBLISHED"]

#: The published study's results, for comparison in every report.
PUBLISHED = {
    "study": "Schwarz et al., N Engl J Med 2019;381:1684-1686",
    "n": 84,
    "rank1": 70,
    "top5": 80,
    "followup": "Schwarz et al., NeuroImage 2021;231:117845: 157 volunteers, 97% matched before "
                "defacing; 28-38% after mri_deface, pydeface or fsl_deface",
}


@dataclass(frozen=True)
class Rate:
    """``x`` of ``n`` with an exact 95% confidence interval (fractions, not percent)."""

    x: int
    n: int
    lo: float
    hi: float

    @classmethod
    def of(cls, x: int, n: int) -> "Rate":
        """``x`` of ``n`` with its Clopper-Pearson interval (:func:`mriface.match.clopper_pearson`).

        Examples
        --------
        >>> Rate.of(70, 84).text()
        '70/84 = 83% (95% CI 74-91%)'
        """
        from .match import clopper_pearson

        lo, hi = clopper_pearson(x, n)
        return cls(int(x), int(n), lo, hi)

    @property
    def value(self) -> float:
        return self.x / self.n if self.n else math.nan

    def text(self) -> str:
        """``"70/84 = 83% (95% CI 74-91%)"``."""
        if not self.n:
            return "n = 0"
        return (f"{self.x}/{self.n} = {100 * self.value:.0f}% "
                f"(95% CI {100 * self.lo:.0f}-{100 * self.hi:.0f}%)")


@dataclass
class ReportData:
    """Everything the report shows.

    Attributes
    ----------
    title : str
        Heading, e.g. ``"mriface study: photographs vs MRI renders"``.
    ranks : sequence of int or None
        Rank of each tested participant's true gallery subject (1 = first);
        None when it is not in the ranked list (no face, not in the top k).
    n_gallery : int
        Number of gallery subjects (the highest possible rank).
    cmc : numpy.ndarray
        (R,) fraction of participants whose true subject ranks <= r+1.
    rank1, top5 : Rate
        Headline rates over the tested participants.
    participants : pandas.DataFrame
        One row per participant (shown as a table).
    failures : dict
        kind -> count (inputs skipped, scans failed, no face found, ...).
    problems : sequence of str
        One line per problem.
    config : dict
        Options the study ran with.
    mode : str
        ``"photographs"`` or ``"scan-to-scan"`` (what the probes were).
    images : sequence of str
        Relative paths of written images (only with ``include_images``).
    extra : dict
        Further key/values for the header table (timings, versions).
    """

    title: str
    ranks: Sequence["int | None"]
    n_gallery: int
    cmc: np.ndarray
    rank1: Rate
    top5: Rate
    participants: Any
    failures: Mapping[str, int] = field(default_factory=dict)
    problems: Sequence[str] = field(default_factory=list)
    config: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "photographs"
    images: Sequence[str] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on servers; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _finish_rank_axes(fig, ax, path: Path, *, ylabel: str, title: str) -> Path:
    """Label a CMC plot's rank axis, add grid and legend, and save it (shared by the CMC figures)."""
    ax.set_xlabel("rank")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_cmc(cmc: np.ndarray, path: "str | Path", *, n: "int | None" = None,
             published: bool = True) -> Path:
    """Draw the cumulative match characteristic as a PNG.

    Parameters
    ----------
    cmc : numpy.ndarray
        (R,) fraction (0-1) of participants whose true subject ranks <= r+1.
    path : str or Path
        PNG to write (atomically).
    n : int, optional
        Participants tested, for the legend.
    published : bool
        Mark the published study's rank-1 and top-5 rates.
    """
    plt = _pyplot()
    cmc = np.asarray(cmc, dtype=float).reshape(-1)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    try:
        if cmc.size:
            if cmc.size < 5:  # beyond the gallery's size nothing changes: show up to rank 5
                cmc = np.concatenate([cmc, np.full(5 - cmc.size, cmc[-1])])
            r = np.arange(1, cmc.size + 1)
            ax.step(r, 100 * cmc, where="post", lw=2, label=f"this study (n = {n})" if n else "this study")
            ax.set_xlim(0.5, max(cmc.size, 5) + 0.5)
        if published:
            p = PUBLISHED
            ax.plot([1, 5], [100 * p["rank1"] / p["n"], 100 * p["top5"] / p["n"]], "o", color="0.4",
                    label=f"Schwarz 2019 (n = {p['n']})")
        ax.set_ylim(0, 102)
        return _finish_rank_axes(fig, ax, Path(path), ylabel="true subject within rank (%)",
                                 title="Cumulative match characteristic")
    finally:
        plt.close(fig)


def plot_rank_histogram(ranks: Sequence["int | None"], n_gallery: int, path: "str | Path") -> Path:
    """Bar chart of how many participants' true subject came at each rank.

    Participants whose true subject is not ranked (no face found, outside the
    top k) get their own bar, "not found", so that no failure is hidden.
    """
    plt = _pyplot()
    found = np.array([r for r in ranks if r is not None], dtype=int)
    missing = sum(r is None for r in ranks)
    top = int(max(n_gallery, found.max() if found.size else 1, 1))
    counts = np.bincount(found, minlength=top + 1)[1:] if found.size else np.zeros(top, int)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    try:
        x = np.arange(1, top + 1)
        ax.bar(x, counts, color="C0", label="ranked")
        ax.bar([top + 1.5], [missing], color="C3", label="not found")
        ticks = list(x) if top <= 20 else list(np.unique(np.linspace(1, top, 10).round().astype(int)))
        ax.set_xticks([*ticks, top + 1.5], [*(str(t) for t in ticks), "n/f"])
        ax.set_xlabel("rank of the true subject")
        ax.set_ylabel("participants")
        ax.set_title("Rank of each participant's own scan")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- text
def _headline(data: ReportData) -> list[tuple[str, str]]:
    p = PUBLISHED
    pub1, pub5 = Rate.of(p["rank1"], p["n"]), Rate.of(p["top5"], p["n"])
    return [
        ("probes", data.mode),
        ("participants tested", str(data.rank1.n)),
        ("gallery subjects", str(data.n_gallery)),
        ("rank 1", data.rank1.text()),
        ("top 5", data.top5.text()),
        ("chance level", f"rank 1 {100 / max(data.n_gallery, 1):.0f}%, "
                         f"top 5 {min(100.0, 500 / max(data.n_gallery, 1)):.0f}%"),
        ("published (photographs vs MRI renders)", f"rank 1 {pub1.text()}; top 5 {pub5.text()}"),
    ]


def _table_rows(df) -> tuple[list[str], list[list[str]]]:
    cols = [str(c) for c in df.columns]
    rows = []
    for rec in df.itertuples(index=False):
        rows.append(["" if (isinstance(v, float) and math.isnan(v)) else
                     (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in rec])
    return cols, rows


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_text(value: object) -> str:
    r"""Text from the data (ids, messages, paths) made inert in Markdown.

    HTML is escaped (``<script>`` shows as text in every renderer), Markdown's
    characters that make links, code, emphasis or table cells (``[ ] ` * _ |``
    and the backslash) are backslash-escaped, and line breaks become spaces:
    an id can neither inject markup nor break the participants table.

    Examples
    --------
    >>> md_text("<script>|[x](y)")
    '&lt;script&gt;\\|\\[x\\](y)'
    """
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _markdown(data: ReportData, figures: Sequence[str]) -> str:
    m = md_text
    lines = [f"# {m(data.title)}", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {m(k)} | {m(v)} |" for k, v in _headline(data)]
    lines += [f"| {m(k)} | {m(v)} |" for k, v in data.extra.items()]
    lines += ["", f"Compare: {m(PUBLISHED['study'])}. Follow-up: {m(PUBLISHED['followup'])}.", ""]
    for fig in figures:
        lines += [f"![{m(fig)}]({fig})", ""]
    lines += ["## Participants", ""]
    cols, rows = _table_rows(data.participants)
    lines += ["| " + " | ".join(m(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(m(v) for v in r) + " |" for r in rows]
    lines += ["", "## Failures and problems", ""]
    if data.failures:
        lines += [f"- {m(k)}: {m(v)}" for k, v in data.failures.items()]
    else:
        lines += ["- none"]
    if data.problems:
        lines += ["", *[f"- {m(p)}" for p in data.problems]]
    lines += ["", "## Options", ""]
    lines += [f"- {m(k)}: {m(v)}" for k, v in data.config.items()]
    lines += ["", "## Images", ""]
    if data.images:
        lines += [f"- [{m(p)}](<{p}>)" for p in data.images]
    else:
        lines += ["No face images are included (renders and photographs are protected health "
                  "information); run with --include-images to write them."]
    return "\n".join(lines) + "\n"


def _html(data: ReportData, figures: Sequence[str]) -> str:
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(data.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:left;font-size:90%}th{background:#f3f3f3}img{max-width:48%;margin:.5em 1%}</style>",
        "</head><body>",
        f"<h1>{e(data.title)}</h1>",
        "<table>",
    ]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _headline(data)]
    out += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data.extra.items()]
    out += ["</table>",
            f"<p>Compare: {e(PUBLISHED['study'])}. Follow-up: {e(PUBLISHED['followup'])}.</p>", "<p>"]
    out += [f"<img src='{e(f)}' alt='{e(f)}'>" for f in figures]
    out += ["</p>", "<h2>Participants</h2>", "<table>"]
    cols, rows = _table_rows(data.participants)
    out.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows]
    out += ["</table>", "<h2>Failures and problems</h2>", "<ul>"]
    out += [f"<li>{e(k)}: {v}</li>" for k, v in data.failures.items()] or ["<li>none</li>"]
    out += ["</ul>"]
    if data.problems:
        out += ["<ul>", *[f"<li>{e(p)}</li>" for p in data.problems], "</ul>"]
    out += ["<h2>Options</h2>", "<table>"]
    out += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data.config.items()]
    out += ["</table>", "<h2>Images</h2>"]
    if data.images:
        out += ["<ul>", *[f"<li><a href='{e(p)}'>{e(p)}</a></li>" for p in data.images], "</ul>"]
    else:
        out += ["<p>No face images are included (renders and photographs are protected health "
                "information); run with <code>--include-images</code> to write them.</p>"]
    out += ["</body></html>"]
    return "\n".join(out) + "\n"


def write_report(data: ReportData, out_dir: "str | Path") -> dict[str, Path]:
    """Write ``report.html``, ``report.md``, ``cmc.png`` and ``rank_histogram.png``.

    Parameters
    ----------
    data : ReportData
        What to show.
    out_dir : str or Path
        Folder (created if needed). Every file is written atomically.

    Returns
    -------
    dict
        ``{"html", "markdown", "cmc", "rank_histogram"}`` -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmc_png = plot_cmc(data.cmc, out / "cmc.png", n=data.rank1.n)
    hist_png = plot_rank_histogram(data.ranks, data.n_gallery, out / "rank_histogram.png")
    figures = [cmc_png.name, hist_png.name]
    md = write_text_atomic(out / "report.md", _markdown(data, figures))
    page = write_text_atomic(out / "report.html", _html(data, figures))
    return {"html": page, "markdown": md, "cmc": cmc_png, "rank_histogram": hist_png}
