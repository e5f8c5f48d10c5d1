"""HTML for ``retrieval report``: one self-contained page (inline CSS, base64 images), no templates needed."""

from __future__ import annotations

import html
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from retrieval.config import metric_label, metric_names

# the report's table: every metric but MAP@K
METRICS = [(name, metric_label(name)) for name in metric_names((1, 10, 100, 1000)) if name != "map@1000"]
THUMB_PX = 96
COLORS = {"hit": "#1a9a3c", "miss": "#d62728", "query": "#1f5fbf"}


@dataclass
class Gallery:
    """Sampled queries and their top-k neighbours, as rows of (index, id, label, path, score, thumbnail)."""

    source: Path
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


CSS = f"""
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; margin-bottom: 2px; }} h2 {{ font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
.sub, .note {{ color: #666; }} .note {{ font-style: italic; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 9px; }} th {{ background: #f1f3f6; }} td.num {{ text-align: right; }}
.curves img {{ max-width: 590px; margin: 4px; border: 1px solid #eee; }}
.row {{ display: flex; gap: 6px; align-items: flex-start; margin: 10px 0; }}
.row .sep {{ width: 14px; }}
figure {{ margin: 0; text-align: center; font-size: 11px; width: {THUMB_PX + 10}px; }}
figure .box {{ width: {THUMB_PX}px; height: {THUMB_PX}px; border: 5px solid #999; display: flex;
  align-items: center; justify-content: center; background: #f4f4f4; overflow: hidden; }}
figure .box img {{ max-width: {THUMB_PX}px; max-height: {THUMB_PX}px; }}
figure.hit .box {{ border-color: {COLORS["hit"]}; }} figure.miss .box {{ border-color: {COLORS["miss"]}; }}
figure.query .box {{ border-color: {COLORS["query"]}; }}
figcaption {{ word-break: break-all; }}
pre {{ background: #f7f7f7; padding: 10px; overflow-x: auto; }}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def render_table(rows: list[dict], source: str) -> str:
    if not rows:
        return (
            '<p class="note">No metrics: no results.json, no metrics.json in an evaluation folder, and no '
            '"val" line in metrics.jsonl.</p>'
        )
    # a textual "loss" (results.json: "triplet") is the seed table's Loss column; a numeric one is a train loss
    with_loss = any(isinstance(r.get("loss"), str) for r in rows)
    titles = ["Model", "Training", *(["Loss"] if with_loss else []), *[t for _, t in METRICS], "Queries"]
    head = "".join(f"<th>{_e(h)}</th>" for h in titles)
    body = []
    for r in rows:
        cells = [f"<td>{_e(r.get('name', ''))}</td>", f"<td>{_e(r.get('training', ''))}</td>"]
        if with_loss:
            cells.append(f"<td>{_e(r['loss']) if isinstance(r.get('loss'), str) else ''}</td>")
        cells += [f'<td class="num">{_pct(r.get(key))}</td>' for key, _ in METRICS]
        cells.append(f'<td class="num">{_e(r.get("num_queries", "–"))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table id="metrics"><tr>{head}</tr>{"".join(body)}</table>'
        f'<p class="sub">In percent; from {_e(source)}. seed-MAP is the seed README\'s "MAP" (reciprocal rank '
        "of the first hit), kept under its own name for comparison.</p>"
    )


def _figure(item: dict, role: str) -> str:
    inner = (
        f'<img src="{item["thumb"]}" alt="image {item["id"]}">'
        if item["thumb"]
        else f"<span>id {item['id']}<br>class {item['label']}</span>"
    )
    score = "query" if item["score"] is None else f"{item['score']:.3f}"
    title = _e(item["path"] or f"image {item['id']}")
    return (
        f'<figure class="{role}" data-id="{item["id"]}" data-label="{item["label"]}" title="{title}">'
        f'<div class="box">{inner}</div><figcaption>{score} · c{item["label"]}</figcaption></figure>'
    )


def render_gallery(gallery: Gallery | None, k: int) -> str:
    if gallery is None:
        return (
            '<p class="note">No gallery: no evaluation folder with embeddings.npy (looked for emb-*/ and eval/*/ '
            "in the run folder; pass --embeddings DIR).</p>"
        )
    parts = [
        f'<p class="sub">Top-{k} exact inner-product neighbours from {_e(gallery.source)} (query excluded by '
        f'index). Frame: <b style="color:{COLORS["hit"]}">same class</b>, <b style="color:{COLORS["miss"]}">'
        f'other class</b>, <b style="color:{COLORS["query"]}">query</b>; caption: score · class.</p>'
    ]
    parts += [f'<p class="note">{_e(n)}</p>' for n in gallery.notes]
    for row in gallery.rows:
        query = row["query"]
        cells = [_figure(query, "query"), '<div class="sep"></div>']
        cells += [_figure(n, "hit" if n["label"] == query["label"] else "miss") for n in row["neighbours"]]
        parts.append(f'<div class="row">{"".join(cells)}</div>')
    return "\n".join(parts)


def versions() -> dict[str, str]:
    """Versions of what produced the page (installed metadata: no heavy imports such as torch)."""
    from retrieval import __version__

    out = {"retrieval": __version__, "python": platform.python_version()}
    for dist in ("numpy", "matplotlib", "pillow", "torch", "timm", "faiss-cpu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def render_page(
    *,
    run_dir: Path,
    table: list[dict],
    table_note: str,
    curves: list[tuple[str, str]],
    log_notes: list[str],
    gallery: Gallery | None,
    k: int,
    summary: Any,
    config: str | None,
) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    curves_html = "".join(f'<img alt="{_e(t)}" src="data:image/png;base64,{b}">' for t, b in curves) or (
        '<p class="note">No curves: metrics.jsonl has no train or val lines.</p>'
    )
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in log_notes)
    summary_html = (
        ("<table>" + "".join(f"<tr><th>{_e(k_)}</th><td>{_e(v)}</td></tr>" for k_, v in summary.items()) + "</table>")
        if isinstance(summary, dict)
        else '<p class="note">No summary.json.</p>'
    )
    config_html = (
        f"<details><summary>config.yaml</summary><pre>{_e(config)}</pre></details>"
        if config
        else '<p class="note">No config.yaml in the run folder.</p>'
    )
    version_html = " · ".join(f"{_e(n)} {_e(v)}" for n, v in versions().items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>retrieval report: {_e(run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>Run report: {_e(run_dir.name)}</h1>
<p class="sub">{_e(run_dir.resolve())} · generated {now}</p>
<h2>Metrics</h2>{render_table(table, table_note)}
<h2>Curves</h2><div class="curves">{curves_html}</div>{notes}
<h2>Query gallery</h2>{render_gallery(gallery, k)}
<h2>Summary</h2>{summary_html}
<h2>Configuration</h2>{config_html}
<p class="sub">Versions: {version_html}</p>
</body></html>
"""
