"""`retrieval report`: the HTML holds the table, the curves and a gallery whose green/red frames match a
brute-force float64 search; missing parts degrade to sentences; a real headless Chromium renders it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _report_fixture import half_right_embeddings, make_run, metric_values
from PIL import Image

from retrieval.cli import main
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.report.build import build_report, top_k
from retrieval.report.html import METRICS

FIGURE = re.compile(r'<figure class="(query|hit|miss)" data-id="(\d+)" data-label="(\d+)"')
CHROMIUM = "/usr/bin/chromium"


def gallery_part(page: str) -> str:
    """The page up to the query gallery's end (the failures section after it has figures of its own)."""
    return page.split("<h2>Search with new photos</h2>")[0]


def gallery_rows(page: str) -> list[list[tuple[str, int, int]]]:
    """[[(role, id, label) of the query, then of each neighbour], ...] in page order."""
    rows: list[list[tuple[str, int, int]]] = []
    for role, image_id, label in FIGURE.findall(gallery_part(page)):
        if role == "query":
            rows.append([])
        rows[-1].append((role, int(image_id), int(label)))
    return rows


def brute_force_neighbours(query_id: int, k: int) -> list[int]:
    """Ids of the k nearest images by float64 cosine, the query itself removed by index (independent of report.py)."""
    emb, _, ids = half_right_embeddings()
    x = emb.astype(np.float64)
    q = int(np.flatnonzero(ids == query_id)[0])
    sims = [(float(x[q] @ x[j]), j) for j in range(len(x)) if j != q]
    sims.sort(key=lambda t: -t[0])
    return [int(ids[j]) for _, j in sims[:k]]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_report_table_curves_and_gallery(run_dir: Path, capsys) -> None:
    queries, k = 6, 4
    assert main(["report", str(run_dir), "--queries", str(queries), "--k", str(k)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == run_dir / "report.html"
    page = out.read_text()

    # table: results.json rows in percent, like the seed's table
    assert '<table id="metrics">' in page and "finetuned" in page and "<td>triplet</td>" in page
    for key, value in metric_values(0.03).items():
        assert f'<td class="num">{100 * value:.2f}</td>' in page, key
    # curves: loss, validation metrics, throughput as embedded PNGs
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 5  # + the Recall@K curve and the score histograms
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)

    # gallery: from the fine-tuned folder, frames agree with brute force, exactly half right by construction
    rows = gallery_rows(page)
    assert len(rows) == queries
    emb, labels, ids = half_right_embeddings()
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    hits = misses = 0
    for (role, qid, qlabel), *neighbours in rows:
        assert qlabel == label_of[qid]
        assert [n[1] for n in neighbours] == brute_force_neighbours(qid, k)
        for role, nid, nlabel in neighbours:
            assert role == ("hit" if label_of[nid] == label_of[qid] else "miss") and nlabel == label_of[nid]
        hits += sum(label_of[n[1]] == qlabel for n in neighbours)
        misses += sum(label_of[n[1]] != qlabel for n in neighbours)
    assert (hits, misses) == (queries * k // 2, queries * k // 2)
    part = gallery_part(page)
    assert part.count('<figure class="hit"') == hits and part.count('<figure class="miss"') == misses

    # thumbnails: one per shown image, JPEG, at most 96 px; whole page stays small
    thumbs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', part)
    assert len(thumbs) == queries * (k + 1)
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0]))) as im:
        assert im.format == "JPEG" and max(im.size) <= 96
    assert out.stat().st_size < 400_000
    # config collapsed and escaped, summary, versions
    assert "<details><summary>config.yaml</summary>" in page and "# &lt;tiny&gt;" in page
    assert "best_step" in page and "numpy" in page and "generated" in page


def test_gallery_is_deterministic_for_a_seed(run_dir: Path, tmp_path: Path) -> None:
    a = gallery_rows(build_report(run_dir, out=tmp_path / "a.html", seed=3).read_text())
    b = gallery_rows(build_report(run_dir, out=tmp_path / "b.html", seed=3).read_text())
    c = gallery_rows(build_report(run_dir, out=tmp_path / "c.html", seed=4).read_text())
    assert a == b and len(a) == 12
    assert [r[0] for r in a] != [r[0] for r in c]


def test_table_falls_back_to_eval_folders_then_val_line(tmp_path: Path) -> None:
    run = make_run(tmp_path, results=False)
    page = build_report(run).read_text()
    assert "emb-test/metrics.json" in page and "Loss" not in page
    assert page.index("<td>emb-test-untrained</td>") < page.index("<td>emb-test</td>")  # baseline first
    assert f"{100 * metric_values(0.03)['recall@1']:.2f}" in page
    for folder in ("emb-test", "emb-test-untrained"):
        (run / folder / "metrics.json").unlink()
    page = build_report(run).read_text()
    assert "val @ step 40" in page and f"{100 * metric_values(40 / 200)['map@r']:.2f}" in page


def test_missing_parts_are_sentences_not_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, shards=False)  # meta.json names a shard folder that does not exist
    page = build_report(run, k=4, queries=3).read_text()
    assert "has no test-*.tar: ids and classes only" in page
    assert "data:image/jpeg" not in page and gallery_part(page).count("<span>id ") == 3 * 5

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 0.5}\n{"kind": "tra')  # killed mid-write
    page = build_report(bare).read_text()
    assert "No metrics" in page and "line 2 is not JSON" in page and "No gallery" in page
    assert page.count("data:image/png") == 1 and "No config.yaml" in page and "No summary.json" in page


def test_explicit_embeddings_and_shards(tmp_path: Path, run_dir: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "shards"), moved)
    out = build_report(run_dir, embeddings_dirs=[run_dir / "emb-test"], shards=moved, out=tmp_path / "r.html", k=2)
    page = out.read_text()
    assert gallery_part(page).count("data:image/jpeg") == 12 * 3 and "not found" not in page


def test_relative_shard_path_in_meta_is_found_from_any_cwd(run_dir: Path) -> None:
    # `retrieval embed --shards shards` run from the folder above the run writes a relative path
    meta = run_dir / "emb-test" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "shards": "shards"}))
    page = build_report(run_dir, k=2, queries=4).read_text()
    assert gallery_part(page).count("data:image/jpeg") == 4 * 3


@pytest.mark.parametrize("n", [24, 300])
def test_knn_and_numpy_gallery_search_agree(n: int) -> None:
    emb = half_right_embeddings()[0] if n == 24 else np.random.default_rng(0).normal(size=(n, 16)).astype(np.float16)
    queries = np.array([0, 5, n - 1])
    order, scores = top_k(emb, queries, 5)
    order_np, scores_np = top_k(emb, queries, 5, use_knn=False)
    np.testing.assert_array_equal(order, order_np)
    np.testing.assert_allclose(scores, scores_np, rtol=1e-5, atol=1e-5)
    assert not (order == queries[:, None]).any()


def test_user_errors_name_the_input(tmp_path: Path, run_dir: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--embeddings", str(tmp_path / "nope")]) == 2
    assert "--embeddings" in capsys.readouterr().err
    (run_dir / "results.json").write_text("[{")
    assert main(["report", str(run_dir)]) == 2
    assert "results.json: not valid JSON" in capsys.readouterr().err
    (run_dir / "results.json").write_text(json.dumps({"training": "x"}))
    assert main(["report", str(run_dir)]) == 2
    assert "expected a list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real browser


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 8) -> int:
    return int((np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    page = build_report(run_dir, k=4, queries=6)
    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri(), profile=tmp_path / "p1")
    assert shot.is_file() and shot.stat().st_size > 20_000, done.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, plots and photos, not a blank page
    assert _near(pixels, (0x1A, 0x9A, 0x3C)) > 500 and _near(pixels, (0xD6, 0x27, 0x28)) > 500  # green and red frames

    dom = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "p2").stdout
    assert (
        '<table id="metrics">' in dom and "Recall@1000" in dom and gallery_part(dom).count('<figure class="hit"') == 12
    )


# ---------------------------------------------------------------------------------------------
# The sections that explain the numbers


def _brute_top1(emb: np.ndarray, labels: np.ndarray) -> list[tuple[int, int, float]]:
    """(query row, top-1 row, score) of every image, float64, itself excluded."""
    x = emb.astype(np.float64)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = sims.argmax(1)
    return [(q, int(top[q]), float(sims[q, top[q]])) for q in range(len(x))]


def _relabelled_run(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The fixture run whose fine-tuned set has two images moved to their sister class: some top-1s are wrong."""
    run = make_run(tmp_path)
    emb, labels, ids = half_right_embeddings()
    labels = labels.copy()
    labels[0], labels[12] = 101, 105
    supers = labels // 102  # 100, 101 -> 0; the rest -> 1
    es = EmbeddingSet.load(run / "emb-test")
    EmbeddingSet(emb, ids, labels, supers, es.paths, es.meta).save(run / "emb-test")
    return run, emb, labels, supers


def _section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}</h2>", 1)[1].split("<h2>", 1)[0]


def test_report_explains_failures_recall_super_classes_scores(tmp_path: Path) -> None:
    run, emb, labels, supers = _relabelled_run(tmp_path)
    summary = {"queries": 10, "top1_same_class": 0.3, "topk_any_same_class": 0.8}
    (run / "search-queries.json").write_text(json.dumps({"summary": summary, "queries": []}))
    page = build_report(run, k=2, queries=3).read_text()

    # untrained -> fine-tuned change, search-queries hit rates
    assert '<table id="change">' in page and page.count('<td class="num">+3.00</td>') == len(METRICS)
    search = _section(page, "Search with new photos")
    assert 'id="search-queries"' in search and "30.00" in search and "80.00" in search

    # worst failures: wrong top-1s by decreasing score, each beside its best same-class image (brute force)
    _, _, ids = half_right_embeddings()
    wrong = sorted((t for t in _brute_top1(emb, labels) if labels[t[1]] != labels[t[0]]), key=lambda t: -t[2])[:6]
    assert wrong, "the fixture must have failures"
    shown = [
        [int(i) for i in re.findall(r'data-id="(\d+)"', row)]
        for row in _section(page, "Worst failures").split('<div class="row failure">')[1:]
    ]
    x = emb.astype(np.float64)
    expected = []
    for q, w, _ in wrong:
        same = [j for j in range(len(x)) if labels[j] == labels[q] and j != q]
        best = max(same, key=lambda j: x[q] @ x[j])
        expected.append([int(ids[q]), int(ids[w]), int(ids[best])])
    assert shown == expected
    assert "data:image/jpeg" in _section(page, "Worst failures")  # thumbnails from the shards

    # Recall@K curve and score histograms are plots; per-super-class recall matches brute force
    assert 'id="recall-curve"' in page and 'id="score-histograms"' in page
    top1 = _brute_top1(emb, labels)
    table = _section(page, "Per super class")
    for s in (0, 1):
        rows = [q for q in range(len(emb)) if supers[q] == s]
        r1 = np.mean([labels[top1[q][1]] == labels[q] for q in rows])
        assert f"<td>{s}</td><td>c{100 + 2 * s}</td>" in table  # the name is the first folder of its paths
        assert f'<td class="num">{len(rows)}</td><td class="num">{100 * r1:.2f}</td>' in table, s
    assert "No wandb run" in page


def test_analysis_against_brute_force(tmp_path: Path) -> None:
    from retrieval.report.analysis import analyse

    run, emb, labels, _ = _relabelled_run(tmp_path)
    a = analyse(EmbeddingSet.load(run / "emb-test"))
    x = emb.astype(np.float64)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    first = [next(r for r, j in enumerate(order[q]) if labels[j] == labels[q]) for q in range(len(x))]
    assert a.ks == [1, 2, 4, 8, 16] and a.queries == len(x)
    np.testing.assert_allclose(a.recall, [np.mean(np.array(first) < k) for k in a.ks])
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if labels[i] == labels[j]]
    assert len(a.positive) == len(pairs)
    np.testing.assert_allclose(np.sort(a.positive), np.sort([x[i] @ x[j] for i, j in pairs]), atol=1e-5)
    others = [x[i] @ x[j] for i in range(len(x)) for j in range(i + 1, len(x)) if labels[i] != labels[j]]
    np.testing.assert_allclose(np.sort(a.negative), np.sort(others), atol=1e-5)  # a small set: every pair


def test_wandb_link_offline_and_online(run_dir: Path) -> None:
    folder = run_dir / "wandb" / "offline-run-20260101_000000-abc123"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "debug.log").write_text("nothing to see\n")
    section = _section(build_report(run_dir).read_text(), "Tracking")
    assert "wandb sync" in section and "offline-run-20260101_000000-abc123" in section
    (folder / "logs" / "debug.log").write_text("View run at https://wandb.ai/team/proj/runs/abc123\n")
    section = _section(build_report(run_dir).read_text(), "Tracking")
    assert '<a href="https://wandb.ai/team/proj/runs/abc123">' in section


def test_a_single_validation_point_is_a_point_on_a_sane_axis() -> None:
    from matplotlib.figure import Figure

    from retrieval.report.plots import draw_validation

    ax = Figure().subplots()
    draw_validation(ax, [{"kind": "val", "step": 40, "recall@1": 0.25}], [METRICS[0]])
    lo, hi = ax.get_xlim()
    assert lo <= 39 and hi >= 41 and ax.get_ylim() == (0, 100)
    line = ax.get_lines()[0]
    assert line.get_marker() == "o" and list(line.get_xdata()) == [40]
    assert all(float(t).is_integer() for t in ax.get_xticks())


# ---------------------------------------------------------------------------------------------
# Issue 29: what the page says about where its numbers come from


def test_the_loss_curve_is_named_after_the_run_loss(run_dir: Path, monkeypatch) -> None:
    """Today every loss is plotted as "triplet loss"."""
    from retrieval.report import build, plots

    (run_dir / "config.yaml").write_text("loss:\n  name: multi_similarity\n")
    seen = []
    monkeypatch.setattr(build, "curve_images", lambda *a: seen.append(a) or plots.curve_images(*a))
    build_report(run_dir)
    assert seen[0][2] == "multi_similarity"
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    monkeypatch.setattr(plots, "figure_png", lambda draw: draw(ax))
    plots.curve_images([{"kind": "train", "step": 1, "samples": 32, "loss": 0.5}], [], "multi_similarity")
    assert ax.get_ylabel() == "multi similarity loss" and ax.get_xlabel() == "images seen"


def test_the_sample_behind_the_curve_and_failures_is_said(run_dir: Path, monkeypatch) -> None:
    """Today the Recall@K curve and the worst failures come from a 2,000-query sample without a word."""
    from retrieval.report import analysis, build

    page = build_report(run_dir).read_text()
    assert "Every one of the 24 images of emb-test searched as a query" in page
    real = analysis.analyse
    monkeypatch.setattr(build, "analyse", lambda es, seed=0: real(es, max_queries=10, seed=seed))
    page = build_report(run_dir).read_text()
    assert "A seeded sample of 10 of the 24 images of emb-test searched as queries" in page


def test_search_summary_saved_by_search_queries_is_found(run_dir: Path) -> None:
    """Today: "No search-queries.json" although `retrieval search --queries` ran (only the demo saved one)."""
    from retrieval.index.folder import IndexFolder

    index = run_dir / "index"
    index.mkdir()
    (index / "index.json").write_text("{}")
    assert "No search summary" in _section(build_report(run_dir).read_text(), "Search with new photos")
    summary = {"queries": 11, "top1_same_class": 0.25, "topk_any_same_class": 0.5}
    IndexFolder(index, None, {}, None).save_search_summary(summary, "q.txt", 10)
    section = _section(build_report(run_dir).read_text(), "Search with new photos")
    assert '<td class="num">11</td>' in section and "25.00" in section and "search-queries.json" in section


def test_every_wandb_folder_of_the_run_is_named(run_dir: Path) -> None:
    """Each invocation (fresh start, resumes) writes its own offline folder; today only the newest was named."""
    names = ["offline-run-20260101_000000-abc123", "offline-run-20260102_000000-abc123"]
    for name in names:
        (run_dir / "wandb" / name / "logs").mkdir(parents=True)
    section = _section(build_report(run_dir).read_text(), "Tracking")
    assert "2 folder(s)" in section and all(section.count(n) == 2 for n in names)  # listed and in `wandb sync`


def test_the_selection_shows_best_and_last(run_dir: Path) -> None:
    summary = {"select_metric": "recall@1", "metric": "recall@1", "best_metric": 0.146, "best_step": 40}
    summary.update(last_metric=0.208, last_step=55, val_queries=300, metric_se=0.0234)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = build_report(run_dir).read_text()
    assert "the best validation: recall@1 0.1460 at step 40; the last validation: recall@1 0.2080 at step 55" in page
    assert "± 0.0459 at 95 % on 300 val queries" in page


def test_a_shards_folder_is_no_run_folder(tmp_path: Path, capsys) -> None:
    """Today `retrieval report SHARDS` writes report.html into the shards folder."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "stats.json").write_text("{}")
    (shards / "train-000000.tar").write_bytes(b"")
    assert main(["report", str(shards)]) == 2
    assert "a shards folder (stats.json, *.tar), not a run folder" in capsys.readouterr().err
    assert not (shards / "report.html").exists()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2 and not (tmp_path / "empty" / "report.html").exists()
