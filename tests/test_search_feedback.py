"""User feedback: `POST /feedback` records judgements in an append-only log (malformed ones 4xx, bounded, never
corrupted by kill -9), and `retrieval feedback export` turns it into a manifest and hard-negative pairs."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _api_fixture import World, make_world
from PIL import Image
from starlette.testclient import TestClient

from retrieval.cli import main
from retrieval.search.feedback import LOG, FeedbackLog
from retrieval.search.searcher import Searcher
from retrieval.search.serve import ServeOptions, create_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("feedback") / "run")


def _app(world: World, folder: Path, **options) -> TestClient:
    opts = ServeOptions(feedback_dir=str(folder), path_root=str(world.model), watch_s=0, **options)
    return TestClient(create_app(Searcher(world.index), opts))


def _judge(client: TestClient, photo: Path, result_id, same, **kw):
    data = {"result_id": str(result_id), "same": str(same)}
    return client.post("/feedback", files={"image": (photo.name, photo.read_bytes())}, data=data, **kw)


def test_judgements_are_recorded_and_malformed_ones_refused(world, tmp_path):
    folder = tmp_path / "fb"
    with _app(world, folder) as client:
        r = _judge(client, world.images[0], 10, "true")
        assert r.status_code == 201, r.text
        entry = r.json()["recorded"]
        assert (entry["result_id"], entry["same"], entry["result_class"], entry["index_version"]) == (10, True, 100, 1)
        r = client.post("/feedback", json={"path": str(world.images[4]), "result_id": 20, "same": False})
        assert r.status_code == 201 and r.json()["recorded"]["result_class"] == 100
        bad = [
            (_judge(client, world.images[0], "ten", "true"), 422, "result_id: expected an integer"),
            (_judge(client, world.images[0], 99999, "true"), 404, "result_id 99999: not an image of the index"),
            (_judge(client, world.images[0], 10, "maybe"), 422, "same: expected true or false"),
            (
                client.post("/feedback", files={"image": ("x.png", b"nope")}, data={"result_id": "10", "same": "1"}),
                415,
                "x.png: not a readable image",
            ),  # fmt: skip
            (client.post("/feedback", files={"photo": ("a.png", b"x")}, data={"result_id": "10"}), 422, "'image'"),
            (client.post("/feedback", json={"result_id": 10}), 422, '{"path": "..."'),
            (client.post("/feedback", json={"path": "/etc/hostname", "result_id": 10, "same": True}), 404, "no such"),
            (client.post("/feedback", content=b"x", headers={"Content-Type": "text/plain"}), 415, "expected multipart"),
        ]
        for response, status, message in bad:
            assert response.status_code == status and message in response.json()["detail"], response.text
        assert client.get("/healthz").json()["feedback"] == str(folder)
    entries, torn = FeedbackLog.read(folder)
    assert [e["result_id"] for e in entries] == [10, 20] and torn == 0
    assert (folder / entries[0]["query"]).read_bytes() == world.images[0].read_bytes()


def test_the_log_is_bounded(world, tmp_path):
    size = len(world.images[0].read_bytes())
    with _app(world, tmp_path / "fb", feedback_max_bytes=size + 2000) as client:
        assert _judge(client, world.images[0], 10, "true").status_code == 201
        assert _judge(client, world.images[0], 20, "false").status_code == 201  # the same photo: stored once
        noisy = tmp_path / "noisy.png"  # a second photo, of 10 kB: it would pass the bound
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(noisy)
        r = _judge(client, noisy, 10, "true")
        assert r.status_code == 507 and "feedback log full" in r.json()["detail"]
    assert len(FeedbackLog.read(tmp_path / "fb")[0]) == 2


WRITER = """
import sys
from retrieval.search.feedback import FeedbackLog
log = FeedbackLog(sys.argv[1], 2**30)
for i in range(10**6):
    log.record(bytes([i % 251]) * (200 + i % 7), "png", {"result_id": i, "same": i % 2 == 0, "result_class": i % 5})
    print(i, flush=True)
"""


def test_kill_9_never_corrupts_the_log(tmp_path):
    """A writer process killed at random instants: every judgement it confirmed is read back whole, a torn last line
    is skipped by the reader and cut by the next writer, and the log keeps growing cleanly."""
    folder, rng, confirmed = tmp_path / "fb", random.Random(0), 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.8, 2.0))
        os.kill(proc.pid, signal.SIGKILL)
        printed = proc.communicate()[0].split()
        entries, torn = FeedbackLog.read(folder)
        confirmed += len(printed)
        assert confirmed <= len(entries) <= confirmed + 1  # a line may be written before its print
        assert torn <= 1 and all(isinstance(e["result_id"], int) for e in entries)
        confirmed = len(entries)
    with open(folder / LOG, "ab") as f:  # what a kill inside the one write of a line would leave
        f.write(b'{"time": "2026-12-06T00:00:00", "query": "images/x.png", "resu')
    entries, torn = FeedbackLog.read(folder)
    assert len(entries) == confirmed and torn == 1
    log = FeedbackLog(folder, 2**30)  # the next writer cuts the torn tail before appending
    log.record(b"\x89PNG-ish", "png", {"result_id": -5, "same": True, "result_class": 1})
    log.close()
    entries, torn = FeedbackLog.read(folder)
    assert len(entries) == confirmed + 1 and torn == 0 and entries[-1]["result_id"] == -5


def test_export_turns_judgements_into_a_manifest_and_hard_negatives(world, tmp_path):
    folder, out = tmp_path / "fb", tmp_path / "export"
    q1, q2, q3 = world.images[0], world.images[7], world.images[12]  # classes 100, 102, 104
    with _app(world, folder) as client:
        for photo, result_id, same in [
            (q1, 20, "true"),  # q1 is product 100 (image 20 is of class 100)
            (q1, 40, "false"),  # ... not 101 (image 40)
            (q1, 70, "false"),  # ... not 102 (image 70)
            (q2, 70, "true"), (q2, 10, "true"),  # q2 confirmed as 102, then as 100: a conflict
            (q3, 10, "false"),  # q3: only "not the same": its product is unknown
            (q1, 70, "true"), (q1, 70, "false"),  # a corrected click: the latest wins
        ]:  # fmt: skip
            assert _judge(client, photo, result_id, same).status_code == 201
    assert main(["feedback", "export", "--log", str(folder), "--index", str(world.index), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judgements"] == 8 and summary["confirmed_queries"] == 1 and summary["conflicts"] == 1
    assert summary["unconfirmed_negatives"] == 1 and summary["hard_negative_pairs"] == 2
    assert (out / "hard_negatives.tsv").read_text().splitlines()[1:] == ["100\t101\t1", "100\t102\t1"]
    rows = list(csv.reader((out / "feedback.csv").open()))[1:]
    assert rows[0][:2] == [str((folder / FeedbackLog.read(folder)[0][0]["query"]).resolve()), "100"]
    catalogue = {(p, int(c)) for p, c, _ in rows[1:]}  # every photo of the judged products 100, 101, 102
    assert catalogue == {(str(p), c) for p, c in zip(world.images, world.labels, strict=True) if c <= 102}
    assert main(["feedback", "export", "--log", str(tmp_path / "nope"), "--out", str(out)]) == 2
