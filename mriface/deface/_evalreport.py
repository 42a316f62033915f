"""The report of :func:`mriface.deface.evaluate.evaluate_methods`: the table, CMC curves, published figures.

Written as ``report.md`` and ``report.html`` beside ``cmc.png`` (scan-to-scan,
one curve per method) and ``cmc_photos.png`` (with photographs), with
:mod:`mriface.report`'s figure helpers and Markdown escaping. Renders appear
only as links, and only when the evaluation wrote them (``include_images``).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._io import write_text_atomic
from ..report import Rate, _finish_rank_axes, _pyplot, md_text

__all__ = ["write_eval_report", "plot_cmc_methods", "display_rows"]


def plot_cmc_methods(cmcs: Mapping[str, np.ndarray], path: "str | Path", *, title: str) -> Path:
    """One cumulative match characteristic per method, in one PNG (written atomically)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    try:
        top = max([5, *(len(c) for c in cmcs.values())])
        for i, (name, cmc) in enumerate(cmcs.items()):
            c = np.asarray(cmc, float).reshape(-1)
            if not c.size:
                continue
            c = np.concatenate([c, np.full(top - c.size, c[-1])])  # beyond the gallery nothing changes
            ax.step(np.arange(1, top + 1), 100 * c, where="post", lw=2, label=name,
                    ls="-" if i < 10 else "--")
        ax.set_xlim(0.5, top + 0.5)
        ax.set_ylim(-2, 102)
        return _finish_rank_axes(fig, ax, Path(path), ylabel="own scan within rank (%)", title=title)
    finally:
        plt.close(fig)


def _rate(row: Mapping, key: str) -> str:
    n = int(row.get(f"{key}_n", 0) or 0)
    x = row.get(key)
    if not n or x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    r = Rate(int(x), n, float(row[f"{key}_ci95_low"]), float(row[f"{key}_ci95_high"]))
    return r.text()


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def display_rows(table, *, photos: bool) -> "tuple[list[str], list[list[str]]]":
    """The table as text: one row per method, the columns a reader compares."""
    cols = ["method", "scan-to-scan rank 1", "top 5"]
    if photos:
        cols += ["photographs rank 1", "photographs top 5"]
    cols += ["renders with a face", "brain voxels changed", "face region changed", "s per scan", "failures"]
    extra = [c for c in table.columns if c.startswith(("rank1_", "top5_", "photo_rank1_"))
             and not c.endswith(("_n", "_low", "_high"))]
    cols += extra
    rows = []
    for rec in table.to_dict("records"):
        r = [str(rec["method"]), _rate(rec, "rank1"), _rate(rec, "top5")]
        if photos:
            r += [_rate(rec, "photo_rank1"), _rate(rec, "photo_top5")]
        found = (f"{rec['renders_with_face']}/{rec['renders']} = {rec['face_detected_pct']:.0f}%"
                 if rec.get("renders") else "–")
        brain = ("–" if isinstance(rec["brain_voxels_changed"], float) and math.isnan(rec["brain_voxels_changed"])
                 else f"{int(rec['brain_voxels_changed']):,} ({_num(rec['brain_changed_pct'], '.2g')}%)")
        fails = [f"{k} {rec[k]}" for k in ("registration_failed", "face_left_intact") if rec.get(k)]
        other = rec.get("failures") or ""
        r += [found, brain, _num(rec["face_region_changed_pct"], ".0f") + ("%" if not (
            isinstance(rec["face_region_changed_pct"], float) and math.isnan(rec["face_region_changed_pct"])) else ""),
              _num(rec["seconds_per_scan"], ".1f"), "; ".join(fails) or (other if other else "none")]
        r += [str(rec.get(c, "")) for c in extra]
        rows.append(r)
    return cols, rows


def _markdown(title: str, cols, rows, figures: Sequence[str], summary: dict, images: Sequence[str]) -> str:
    m = md_text
    out = [f"# {m(title)}", ""]
    out += ["| " + " | ".join(m(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(m(v) for v in r) + " |" for r in rows]
    out += ["", "Published figures (photographs vs MRI face renders):", ""]
    out += [f"- {m(p['study'])} (n = {p['n']}): before {m(p['before'])}; after {m(p['after'])}"
            for p in summary["published"]]
    out += ["", *[f"![{m(f)}]({f})" for f in figures], "", "## Definitions", ""]
    out += [f"- {m(k)}: {m(v)}" for k, v in summary["definitions"].items()]
    out += ["", "## Studies", ""]
    out += [f"- {m(r['method'])}: studies/{m(r['method'])}/scan-to-scan/report.md" for r in summary["rows"]]
    out += ["", "## Problems", ""]
    out += [f"- {m(p['kind'])}: {m(p['where'])}: {m(p['message'])}" for p in summary["problems"]] or ["- none"]
    out += ["", "## Options", ""]
    out += [f"- {m(k)}: {m(v)}" for k, v in summary["options"].items()]
    mach = summary["machine"]
    out += [f"- machine: {m(mach['platform'])}, {mach['cpus']} CPUs, load average {m(mach['load_average'])}"]
    out += ["", "## Before and after", ""]
    if images:
        out += [f"- [{m(p)}](<{p}>)" for p in images]
    else:
        out += ["No renders are included (they show faces); run with --include-images to write them."]
    return "\n".join(out) + "\n"


def _html(title: str, cols, rows, figures: Sequence[str], summary: dict, images: Sequence[str]) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
           "text-align:left;font-size:90%}th{background:#f3f3f3}img{max-width:48%;margin:.5em 1%}</style>",
           "</head><body>", f"<h1>{e(title)}</h1>", "<table>",
           "<tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows]
    out += ["</table>", "<p>Published figures (photographs vs MRI face renders):</p><ul>"]
    out += [f"<li>{e(p['study'])} (n = {p['n']}): before {e(p['before'])}; after {e(p['after'])}</li>"
            for p in summary["published"]]
    out += ["</ul><p>", *[f"<img src='{e(f)}' alt='{e(f)}'>" for f in figures], "</p>",
            "<h2>Definitions</h2><ul>", *[f"<li>{e(k)}: {e(v)}</li>" for k, v in summary["definitions"].items()],
            "</ul><h2>Studies</h2><ul>"]
    out += [f"<li><a href='studies/{e(r['method'])}/scan-to-scan/report.html'>{e(r['method'])}</a></li>"
            for r in summary["rows"]]
    out += ["</ul><h2>Problems</h2><ul>"]
    out += [f"<li>{e(p['kind'])}: {e(p['where'])}: {e(p['message'])}</li>" for p in summary["problems"]] \
        or ["<li>none</li>"]
    out += ["</ul><h2>Options</h2><table>"]
    out += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in summary["options"].items()]
    out += ["</table><h2>Before and after</h2>"]
    if images:
        out += ["<ul>", *[f"<li><a href='{e(p)}'>{e(p)}</a></li>" for p in images], "</ul>"]
    else:
        out += ["<p>No renders are included (they show faces); run with <code>--include-images</code>.</p>"]
    out += ["</body></html>"]
    return "\n".join(out) + "\n"


def write_eval_report(out: Path, table, cmcs: Mapping, photo_cmcs: Mapping, summary: dict,
                      images: Sequence[str], *, n_gallery: int) -> dict:
    """Write ``report.md``, ``report.html``, ``cmc.png`` and (with photographs) ``cmc_photos.png``."""
    files, figures = {}, []
    if cmcs:
        files["cmc"] = plot_cmc_methods(cmcs, out / "cmc.png", title="Scan-to-scan: defaced vs original scans")
        figures.append("cmc.png")
    if photo_cmcs:
        files["cmc_photos"] = plot_cmc_methods(photo_cmcs, out / "cmc_photos.png",
                                               title="Photographs vs defaced scans")
        figures.append("cmc_photos.png")
    cols, rows = display_rows(table, photos=bool(photo_cmcs))
    title = f"mriface deface-eval: {len(table)} rows, {n_gallery} scans"
    files["markdown"] = write_text_atomic(out / "report.md", _markdown(title, cols, rows, figures, summary, images))
    files["html"] = write_text_atomic(out / "report.html", _html(title, cols, rows, figures, summary, images))
    return files
