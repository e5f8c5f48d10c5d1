"""HTML for ``retrieval report``: one self-contained page (inline CSS, base64 images), no templates needed."""

from __future__ import annotations

import base64
import html
import io
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from retrieval.config.schema import metric_label, metric_names
from retrieval.report.analysis import THUMB_PX

# the report's table: every metric but MAP@K
METRICS = [(name, metric_label(name)) for name in metric_names((1, 10, 100, 1000)) if name != "map@1000"]
COLORS = {"hit": "#1a9a3c", "miss": "#d62728", "query": "#1f5fbf"}


@dataclass
class Gallery:
    """Sampled queries and their top-k neighbours, as rows of (index, id, label, path, score, thumbnail)."""

    source: Path
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Explained:
    """The sections that explain the numbers (see :mod:`retrieval.report.analysis`); None/empty when absent."""

    source: str = ""  # the embeddings folder the failures, super classes and histograms come from
    queries: int = 0  # images of it searched as queries (a seeded sample of a large set)
    total: int = 0  # images in it
    change: dict | None = None  # fine-tuned minus untrained, per metric
    search: dict | None = None  # search --queries summary
    failures: list[dict] = field(default_factory=list)
    recall_curve: str | None = None  # base64 PNG
    super_classes: list[dict] = field(default_factory=list)
    histogram: str | None = None  # base64 PNG
    wandb: dict | None = None
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


def _png(b64: str | None, element_id: str, alt: str, missing: str) -> str:
    if not b64:
        return f'<p class="note" id="{element_id}">{_e(missing)}</p>'
    return f'<div class="curves"><img id="{element_id}" alt="{_e(alt)}" src="data:image/png;base64,{b64}"></div>'


def render_change(change: dict | None) -> str:
    if not change:
        return ""
    cells = "".join(
        f'<td class="num">{100 * change[key]:+.2f}</td>' if key in change else '<td class="num">–</td>'
        for key, _ in METRICS
    )
    head = "".join(f"<th>{_e(t)}</th>" for _, t in METRICS)
    return (
        f'<table id="change"><tr><th></th>{head}</tr><tr><td>fine-tuned − untrained</td>{cells}</tr></table>'
        '<p class="sub">Change from the untrained baseline to the fine-tuned model, in percentage points.</p>'
    )


def render_search(search: dict | None) -> str:
    if not search:
        return (
            '<p class="note" id="search-queries">No search summary: `retrieval search --index DIR --queries LIST` '
            "saves one as DIR/search-queries.json (an index folder under the run folder), the demo as "
            "RUN/search-queries.json.</p>"
        )
    if "error" in search:
        return f'<p class="note" id="search-queries">{_e(search["error"])}</p>'
    return (
        '<table id="search-queries"><tr><th>Queries</th><th>Top hit of the query\'s class</th>'
        "<th>One of the top k of its class</th></tr>"
        f'<tr><td class="num">{_e(search.get("queries", "–"))}</td><td class="num">{_pct(search.get("top1_same_class"))}</td>'
        f'<td class="num">{_pct(search.get("topk_any_same_class"))}</td></tr></table>'
        '<p class="sub">New photos of test products (not in the catalogue) searched against the index, in percent'
        f"{_e(' (' + search['source'] + ')') if search.get('source') else ''}.</p>"
    )


def sample_note(ex: Explained) -> str:
    """What the failures, the Recall@K curve, the super classes and the histograms were computed on."""
    if not ex.total:
        return ""
    if ex.queries >= ex.total:
        return f"Every one of the {ex.total} images of {ex.source} searched as a query."
    return (
        f"A seeded sample of {ex.queries} of the {ex.total} images of {ex.source} searched as queries (against all "
        "of them): the metrics table counts every image, so its figures can differ from this sample's."
    )


def render_selection(summary: Any) -> str:
    """Which weights the run exported, beside the last validation: val selection on a small split can pick worse."""
    if not isinstance(summary, dict) or summary.get("last_metric") is None:
        return ""
    name = summary.get("metric") or summary.get("select_metric", "")
    last = f"the last validation: {_e(name)} {summary['last_metric']:.4f} at step {summary.get('last_step')}"
    if summary.get("select_metric") == "last":
        chosen = "the last validated weights (train.select_metric=last)"
    else:
        chosen = f"the best validation: {_e(name)} {summary['best_metric']:.4f} at step {summary.get('best_step')}"
    se = summary.get("metric_se")
    noise = f"; ± {1.96 * se:.4f} at 95 % on {summary.get('val_queries')} val queries" if se is not None else ""
    return f'<p id="selection">Exported model (model.safetensors): {chosen}; {last}{noise}. final/ holds the last step.</p>'


def render_failures(ex: Explained) -> str:
    if not ex.failures:
        return '<p class="note" id="failures">No failures to show (no embeddings, or every top-1 is right).</p>'
    parts = [
        f'<div id="failures"><p class="sub">Queries of {_e(ex.source)} whose wrong top-1 scores highest: the query, '
        f'<b style="color:{COLORS["miss"]}">the wrong top-1</b>, <b style="color:{COLORS["hit"]}">the best-scoring '
        "image of its own class</b>.</p>"
    ]
    for row in ex.failures:
        cells = [_figure(row["query"], "query"), '<div class="sep"></div>', _figure(row["wrong"], "miss")]
        cells.append(
            _figure(row["correct"], "hit") if row["correct"] else '<p class="note">no other image of its class</p>'
        )
        parts.append(f'<div class="row failure">{"".join(cells)}</div>')
    return "\n".join(parts) + "</div>"


def render_super_classes(rows: list[dict], queries: int) -> str:
    if not rows:
        return '<p class="note" id="super-classes">No embeddings: no per-super-class table.</p>'
    body = "".join(
        f'<tr><td>{_e(r["super_class_id"])}</td><td>{_e(r["name"])}</td><td class="num">{r["queries"]}</td>'
        f'<td class="num">{_pct(r["recall@1"])}</td><td class="num">{_pct(r["recall@10"])}</td></tr>'
        for r in rows
    )
    return (
        '<table id="super-classes"><tr><th>Super class</th><th>Name</th><th>Queries</th><th>Recall@1</th>'
        f"<th>Recall@10</th></tr>{body}</table>"
        f'<p class="sub">Weakest first; {queries} queries searched against the whole set.</p>'
    )


def render_wandb(info: dict | None) -> str:
    if not info:
        return '<p class="note" id="wandb">No wandb run in this folder (log.wandb=disabled, or not a training run).</p>'
    folders = info["folders"]
    listed = "".join(f"<li><code>{_e(f)}</code></li>" for f in folders)
    head = (
        f'<p id="wandb">wandb run: <a href="{_e(info["url"])}">{_e(info["url"])}</a></p>'
        if info.get("url")
        else '<p id="wandb">wandb run (offline).</p>'
    )
    sync = " ".join(_e(f) for f in folders)
    return (
        f"{head}<p>{len(folders)} folder(s), one per invocation of the run (a resume or requeue adds one; all log into "
        f"one wandb run id):</p><ul>{listed}</ul><p>Publish them all: <code>wandb sync {sync}</code></p>"
    )


def render_explained(ex: Explained) -> str:
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in ex.notes)
    return f"""<h2>Search with new photos</h2>{render_search(ex.search)}
<h2>Worst failures</h2><p class="sub" id="sample">{_e(sample_note(ex))}</p>{render_failures(ex)}{notes}
<h2>Recall@K</h2>{_png(ex.recall_curve, "recall-curve", "Recall@K", "No embeddings: no Recall@K curve.")}
<h2>Per super class</h2>{render_super_classes(ex.super_classes, ex.queries)}
<h2>Scores</h2>{_png(ex.histogram, "score-histograms", "score histograms", "No same-class pairs: no histograms.")}
<h2>Tracking</h2>{render_wandb(ex.wandb)}"""


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
    explained: Explained | None = None,
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
<h2>Metrics</h2>{render_table(table, table_note)}{render_change(explained.change if explained else None)}
{render_selection(summary)}
<h2>Curves</h2><div class="curves">{curves_html}</div>{notes}
<h2>Query gallery</h2>{render_gallery(gallery, k)}
{render_explained(explained or Explained())}
<h2>Summary</h2>{summary_html}
<h2>Configuration</h2>{config_html}
<p class="sub">Versions: {version_html}</p>
</body></html>
"""


def data_uri(image) -> str:
    """A PIL image as a JPEG data URI: the page needs no folder beside it."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
