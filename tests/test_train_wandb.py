"""wandb as users expect (offline here): at the end of a run, a table of the final metrics (also in the run summary)
and the validation's worst failures as a table of images, logged through accelerate's tracker."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY

from retrieval.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_offline_run_has_final_metrics_and_failure_gallery(synth_shards: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # the table's artifact is staged here
    run = tmp_path / "run"
    argv = ["train", "--config", TINY, "--shards", str(synth_shards), "--run-dir", str(run), "log.wandb=offline"]
    argv += ["train.epochs=1", "data.steps_per_epoch=3", "data.num_workers=0", "train.log_every=1"]
    assert main(argv) == 0
    (folder,) = sorted((run / "wandb").glob("offline-run-*"))
    tables = {p.name.split("_")[0]: p for p in (folder / "files" / "media" / "table" / "final").glob("*.table.json")}
    assert set(tables) == {"metrics", "failures"}, sorted(folder.rglob("*"))

    metrics = json.loads(tables["metrics"].read_text())
    assert metrics["columns"] == ["metric", "value"]
    values = dict(metrics["data"])
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in val if r["kind"] == "val"][-1]
    assert values["recall@1"] == last["recall@1"] and values["global_step"] == 3

    failures = json.loads(tables["failures"].read_text())
    assert failures["columns"][:3] == ["query", "wrong top-1", "best correct"] and failures["data"]
    rows = failures["data"]
    assert all(r[4] != r[6] for r in rows) and rows == sorted(rows, key=lambda r: -r[7])  # wrong class, worst first
    # the table's images travel in the run's artifact (staged until `wandb sync`); the gallery is in the media panel
    staged = [p for p in (tmp_path / "wandb-data").rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(staged) >= 2 * len(rows)
    gallery = list((folder / "files" / "media" / "images" / "final").glob("failure_gallery_*.png"))
    assert len(gallery) == len(rows)
