"""`retrieval shards mix`: new products plus a replay sample of old products' classes, as one manifest that
`shards build --manifest` turns into training shards (the "new products arrived" recipe)."""

from __future__ import annotations

import csv
import json

from conftest import shards_build_args

from retrieval.cli import main
from retrieval.data.sop import read_sop_file


def test_new_products_plus_a_replay_sample_build_training_shards(tmp_path, caplog, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        synth = ["synth-sop", str(tmp_path / name), "--classes", "20", "--images-per-class", "2-3", "--size", "48"]
        assert main([*synth, "--seed", str(seed)]) == 0
    out = tmp_path / "mix.csv"
    argv = ["shards", "mix", "--new", str(tmp_path / "b"), "--replay", str(tmp_path / "a"), "--out", str(out)]
    assert main([*argv, "--replay-classes", "4", "--new-class-offset", "1000"]) == 0
    counts = json.loads(capsys.readouterr().out)
    rows = list(csv.reader(out.open()))[1:]
    new = read_sop_file(tmp_path / "b" / "Ebay_train.txt")  # the new products' train list only: test stays unseen
    old = {r.class_id: r for r in read_sop_file(tmp_path / "a" / "Ebay_train.txt")}
    assert counts["new_images"] == len(new) and counts["replay_classes"] == 4 and counts["shared_classes"] == 0
    assert [(p, int(c)) for p, c, _ in rows[: len(new)]] == [
        (str((tmp_path / "b" / r.path).resolve()), r.class_id + 1000) for r in new
    ]
    replayed = {int(c) for _, c, _ in rows[len(new) :]}
    assert len(replayed) == 4 and replayed <= set(old)  # whole old classes, their ids kept
    assert len(rows) - len(new) == sum(
        1 for r in read_sop_file(tmp_path / "a" / "Ebay_train.txt") if r.class_id in replayed
    )
    shards = tmp_path / "shards"
    build = shards_build_args("x", shards, "--workers", "1", "--test-classes", "0", "--val-classes", "2")
    build[2:4] = ["--manifest", str(out)]
    assert main(build) == 0
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["train"]["samples"] + stats["val"]["samples"] == len(rows) and stats["test"]["samples"] == 0
    assert main([*argv, "--replay-classes", "4"]) == 0  # no offset: the synthetic ids of a and b collide
    assert json.loads(capsys.readouterr().out)["shared_classes"] > 0 and "--new-class-offset past" in caplog.text
