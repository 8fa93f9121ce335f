"""``skray report OUTPUT``: one static page on what a labeling run found.

Counts per label, score distributions, failures by reason with example keys,
throughput, and galleries (random and lowest-scoring examples of the most frequent
labels, thumbnails read back from the source objects). ``index.html`` carries every
image as a ``data:`` URI, so the one file opens anywhere offline: on a laptop, from
S3 through a presigned link, as an MLflow artifact. The charts are also written
beside it as PNGs. One pass over the parts (:mod:`skray.report.scan`) in bounded memory.
"""

from __future__ import annotations

import base64
import datetime
import html
from typing import Any

from skray.io.storage import join, read_json, redact_uri, write_bytes_atomic
from skray.label.sinks import MANIFEST, REPORT_DIR
from skray.report import charts
from skray.report.scan import Scan, scan_output
from skray.report.thumbnails import Reading, thumbnails

TOP_LABELS = 30  # in the bar chart
HISTOGRAM_LABELS = 7  # score panels besides the overall one
GALLERY_LABELS = 8  # labels with a gallery
GALLERY_EXAMPLES = 6  # random and lowest-scoring thumbnails per gallery label

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:24px;border-bottom:1px solid #ddd}
.sub{color:#666}\
.warn{background:#fde2e1;border:1px solid #c44e52;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px;word-break:break-all}
.cards{display:flex;gap:12px;margin:16px 0}\
.card{border:1px solid #ddd;border-radius:6px;padding:8px 16px}
.card b{display:block;font-size:24px}.card.bad b{color:#c44e52}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:24px;align-items:start}
img.chart{max-width:100%}.row{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 12px}
figure{margin:0;width:150px;font-size:11px}\
figure img,.missing{display:block;width:150px;height:112px;
object-fit:contain;background:#f4f4f4;border:1px solid #ccc;box-sizing:border-box}
figcaption{word-break:break-all;color:#444}
.missing{border:1px dashed #c44e52;color:#c44e52;overflow:hidden;padding:4px;font-size:10px;
word-break:break-all}
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f'<td class="n">{value:,}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(row: dict, thumbs: dict[str, bytes | str]) -> str:
    key = row["key"]
    caption = f"{row['score']:.3f} · {key.rsplit('/', 1)[-1]}" if row["score"] is not None else key
    thumb = thumbs.get(key, "missing: not read")
    title = html.escape(key, quote=True)
    if isinstance(thumb, bytes):
        picture = f'<img src="{_data_uri(thumb, "image/jpeg")}" alt="{title}" title="{title}">'
    else:
        picture = (
            f'<div class="missing" title="{title}">'
            f"{html.escape(key)}<br><b>{html.escape(thumb)}</b></div>"
        )
    return f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _header(manifest: dict | None, output: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<h1>Labeling report</h1>"
        f"<div class=sub><code>{html.escape(redact_uri(output))}</code> · {now}</div>"
    ]
    if manifest is None:
        parts.append(
            '<p class="warn">No manifest: the run is still going or died before the end. '
            "The figures below cover the parts committed so far.</p>"
        )
        return "".join(parts)
    if manifest.get("random_weights"):
        parts.append(
            '<p class="warn">RANDOM weights: no weights were given, the labels are meaningless.</p>'
        )
    model = [
        ("model", manifest.get("model")),
        ("weights", manifest.get("weights")),
        ("weights version", manifest.get("weights_version")),
        ("weights sha256", manifest.get("weights_sha256")),
    ]
    parts.append(_table([(k, v) for k, v in model if v is not None], ("", "")))
    return "".join(parts)


def _counts(scan: Scan, manifest: dict | None) -> str:
    """The headline figures as cards, then what else the manifest counted."""
    timings = (manifest or {}).get("timings") or {}
    min_score = ((manifest or {}).get("config") or {}).get("min_score")
    cards = [
        ("rows", scan.rows, ""),
        ("labeled", scan.labeled, ""),
        (
            "low confidence" + (f" (score < {min_score:g})" if min_score is not None else ""),
            scan.low_confidence,
            "",
        ),
        ("failed", scan.failed, "bad" if scan.failed else ""),
    ]
    if "img_per_s" in timings:
        cards.append(("img/s", timings["img_per_s"], ""))
    strip = "".join(
        f'<div class="card {cls}"><b>{value:,}</b>{html.escape(name)}</div>'
        for name, value, cls in cards
    )
    rows = [("parts", scan.parts)] + [
        (name.replace("_", " "), manifest[name])
        for name in ("skipped_already_done", "removed_from_input", "duplicates")
        if manifest and name in manifest
    ]
    return f'<div class="cards">{strip}</div>' + _table(rows, ("", ""))


def _chart(charts: dict[str, bytes], name: str, alt: str) -> str:
    return (
        f'<img class="chart" src="{_data_uri(charts[name], "image/png")}" alt="{alt}">'
        if name in charts
        else ""
    )


def _failures(scan: Scan) -> str:
    if not scan.failed:
        return "<h2>Failures</h2><p>None.</p>"
    rows = []
    for reason, count in scan.failures.most_common():
        examples = "<br>".join(
            f"<code>{html.escape(key)}</code> — {html.escape(error)}"
            for key, error in scan.failure_examples[reason]
        )
        rows.append(
            f'<tr><td>{html.escape(reason)}</td><td class="n">{count:,}</td>'
            f"<td>{examples}</td></tr>"
        )
    return (
        "<h2>Failures by reason</h2><table><tr><th>reason</th><th>rows</th><th>examples</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _throughput(manifest: dict | None, charts: dict[str, bytes]) -> str:
    timings = (manifest or {}).get("timings")
    if not timings:
        return ""
    figures = [
        (name.replace("_", " "), v) for name, v in timings.items() if not isinstance(v, list)
    ]
    return (
        f'<h2>Throughput</h2><div class="grid"><div>{_table(figures, ("", ""))}</div>'
        f"<div>{_chart(charts, 'throughput.png', 'throughput')}</div></div>"
    )


def _galleries(scan: Scan, labels: list[str | None], thumbs: dict[str, bytes | str]) -> str:
    sections = ["<h2>Galleries</h2>"]
    for label in labels:
        title = "low confidence (no label)" if label is None else label
        count = int(scan.label_counts[scan.labels.index(label)])
        sections.append(f"<h3>{html.escape(title)} <span class=sub>({count:,} rows)</span></h3>")
        for name, rows in (
            ("random", scan.rows_of(scan.random, label)),
            ("lowest scores", scan.rows_of(scan.lowest, label)),
        ):
            if rows:
                figures = "".join(_figure(row, thumbs) for row in rows)
                sections.append(f"<div class=sub>{name}</div><div class=row>{figures}</div>")
    return "".join(sections)


def render(
    output: str,
    manifest: dict | None,
    scan: Scan,
    thumbs: dict[str, bytes | str],
    charts: dict[str, bytes],
    gallery_labels: list[str | None],
) -> str:
    """The page, every image inline."""
    body = [
        _header(manifest, output),
        _counts(scan, manifest),
        '<div class="grid"><div><h2>Labels</h2>'
        f"{_chart(charts, 'labels.png', 'label counts')}</div>"
        f"<div>{_failures(scan)}</div></div>",
        f"<h2>Scores</h2>{_chart(charts, 'scores.png', 'score histograms')}",
        _throughput(manifest, charts),
    ]
    if gallery_labels:
        body.append(_galleries(scan, gallery_labels, thumbs))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>skray labeling report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def build_charts(scan: Scan, manifest: dict | None) -> dict[str, bytes]:
    """PNGs by file name; a chart with nothing to show is left out."""
    pngs = {}
    top = scan.top_labels(TOP_LABELS)
    if top:
        pngs["labels.png"] = charts.label_counts(top)
        per_label = [(label, scan.histogram(label)) for label, _ in top[:HISTOGRAM_LABELS]]
        if scan.low_confidence:
            per_label.append(("low confidence", scan.histogram(None)))
        pngs["scores.png"] = charts.score_histograms(scan.score_hist.sum(axis=0), per_label)
    progress = ((manifest or {}).get("timings") or {}).get("progress")
    if progress:
        pngs["throughput.png"] = charts.throughput(progress)
    return pngs


def write_report(output: str, dest: str | None = None, seed: int = 0) -> str:
    """Write ``index.html`` and the chart PNGs to ``dest`` (default ``OUTPUT/_report``);
    returns the page's URI. ``seed`` picks the random examples. ``manifest.timings.progress``
    (:class:`skray.label.progress.Progress`'s ``[seconds since start, images done]`` samples)
    becomes the throughput chart."""
    dest = dest or join(output, REPORT_DIR)
    manifest = read_json(join(output, MANIFEST))
    scan = scan_output(output, random_k=GALLERY_EXAMPLES, lowest_k=GALLERY_EXAMPLES, seed=seed)
    gallery_labels: list[str | None] = [label for label, _ in scan.top_labels(GALLERY_LABELS)]
    if scan.low_confidence:
        gallery_labels.append(None)
    keys = {
        row["key"]
        for label in gallery_labels
        for table in (scan.random, scan.lowest)
        for row in scan.rows_of(table, label)
    }
    thumbs = thumbnails(sorted(keys), Reading.from_config((manifest or {}).get("config")))
    charts = build_charts(scan, manifest)
    for name, png in charts.items():
        write_bytes_atomic(join(dest, name), png)
    page = join(dest, "index.html")
    write_bytes_atomic(
        page, render(output, manifest, scan, thumbs, charts, gallery_labels).encode()
    )
    return page
