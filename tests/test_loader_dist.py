"""Streaming loader under 2 real processes (accelerate launch, gloo) over an odd number of uneven shards."""

from __future__ import annotations

import json
import textwrap

import _shardkit as sk
import pytest
from _launch import ACCELERATE, cpu_env, free_port, run

from retrieval.config.schema import DataConfig
from retrieval.data.input_spec import InputSpec
from retrieval.data.loader import EpochSpan, Reader, train_loader

SPEC = InputSpec(32, (0.5,) * 3, (0.5,) * 3, 0.875)

pytestmark = pytest.mark.dist

P, K, STEPS, EPOCHS = 3, 2, 5, 2
CFG = dict(classes_per_batch=P, images_per_class=K, class_pool=6, num_workers=2, seed=3)

# Each rank: train epochs with one all-reduce per batch (unequal counts would hang, then time out),
# then its eval share; results go to OUT/rank{R}.json.
WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as td
    from retrieval import dist
    from retrieval.config.schema import DataConfig
    from retrieval.data.loader import EpochSpan, eval_loader, train_loader
    from retrieval.data.input_spec import InputSpec

    shards, out, cfg = sys.argv[1], sys.argv[2], DataConfig(**json.loads(sys.argv[3]))
    td.init_process_group("gloo")
    SPEC = InputSpec(32, (0.5,) * 3, (0.5,) * 3, 0.875)
    res = {"train": [], "eval": []}
    for epoch in range(int(sys.argv[4])):
        ids = []
        for b in train_loader(shards, cfg, SPEC, EpochSpan(epoch, int(sys.argv[5]))):
            dist.all_reduce_sum(torch.ones(1))
            ids.append(b["image_id"].tolist())
        res["train"].append(ids)
    for b in eval_loader(shards, "test", SPEC, 4, 2):
        res["eval"] += b["image_id"].tolist()
    with open(f"{out}/rank{dist.rank()}.json", "w") as f:
        json.dump(res, f)
    dist.destroy()
    """
)


def test_two_ranks_disjoint_equal_and_exactly_once(tmp_path):
    shards = tmp_path / "shards"
    # 5 uneven train shards (3..10 classes of 2..6 images), 3 uneven test shards.
    layout, c = [], 1
    for n in (3, 8, 4, 10, 5):
        layout.append([(c + i, 2 + (c + i) % 5) for i in range(n)])
        c += n
    shard_of = sk.write_split(shards, "train", layout)
    test_of = sk.write_split(shards, "test", [[(500, 5)], [(501, 3), (502, 7), (503, 2)], [(504, 4)]], first_id=900)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # accelerate launch with 2 CPU processes (gloo), as users launch the trainer
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--main_process_port", str(free_port()), str(script), str(shards), str(tmp_path), json.dumps(CFG)]
    cmd += [str(EPOCHS), str(STEPS)]
    run(cmd, env=cpu_env(), timeout=120)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for epoch in range(EPOCHS):
        per_rank = [res[r]["train"][epoch] for r in range(2)]
        assert [len(b) for b in per_rank] == [STEPS, STEPS], "equal batch counts on every rank"
        seen = [{shard_of[i] for batch in batches for i in batch} for batches in per_rank]
        assert not seen[0] & seen[1], f"epoch {epoch}: ranks share shards {seen}"
        assert all(len(batch) == P * K for batches in per_rank for batch in batches)
    assert res[0]["train"][0] != res[0]["train"][1], "a new order every epoch"
    # a rank's stream is the same as the single-process loader told its rank explicitly
    local = train_loader(shards, DataConfig(**CFG), SPEC, EpochSpan(1, STEPS), Reader(1, 2))
    assert [b["image_id"].tolist() for b in local] == res[1]["train"][1]

    union = res[0]["eval"] + res[1]["eval"]
    assert sorted(union) == sorted(test_of), "eval: every sample exactly once over the ranks"
    assert {test_of[i] for i in res[0]["eval"]}.isdisjoint({test_of[i] for i in res[1]["eval"]})


# One train shard, 2 ranks x 2 workers: the in-shard split. Each rank: a full epoch (one all-reduce per batch),
# the same epoch resumed at step 3 (image checksums compared), and its share of a 1-shard eval split.
ONE_SHARD_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as td
    from retrieval import dist
    from retrieval.config.schema import DataConfig
    from retrieval.data.loader import EpochSpan, eval_loader, train_loader
    from retrieval.data.input_spec import InputSpec

    shards, out, cfg = sys.argv[1], sys.argv[2], DataConfig(**json.loads(sys.argv[3]))
    td.init_process_group("gloo")
    SPEC = InputSpec(32, (0.5,) * 3, (0.5,) * 3, 0.875)

    def epoch(start):
        rows = []
        for b in train_loader(shards, cfg, SPEC, EpochSpan(0, 6, start)):
            dist.all_reduce_sum(torch.ones(1))
            rows.append([b["image_id"].tolist(), b["label"].tolist(), float(b["image"].double().sum())])
        return rows

    res = {"full": epoch(0), "resumed": epoch(3), "eval": []}
    for b in eval_loader(shards, "test", SPEC, 4, 2):
        res["eval"] += b["image_id"].tolist()
    with open(f"{out}/rank{dist.rank()}.json", "w") as f:
        json.dump(res, f)
    dist.destroy()
    """
)


def test_one_shard_two_ranks_two_workers_split_inside_the_shard(tmp_path):
    shards = tmp_path / "shards"
    sk.write_split(shards, "train", [[(c, 3 + c % 4) for c in range(1, 25)]])  # ONE shard, 24 classes
    test_of = sk.write_split(shards, "test", [[(500 + c, 5) for c in range(6)]], first_id=900)  # ONE test shard
    script = tmp_path / "worker.py"
    script.write_text(ONE_SHARD_WORKER)
    cfg = dict(CFG, class_pool=4)
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--main_process_port", str(free_port()), str(script), str(shards), str(tmp_path), json.dumps(cfg)]
    run(cmd, env=cpu_env(), timeout=180)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [len(r["full"]) for r in res] == [6, 6], "equal steps on every rank"
    ids = [[i for ids, _, _ in r["full"] for i in ids] for r in res]
    labels = [{c for _, labels, _ in r["full"] for c in labels} for r in res]
    assert not set(ids[0]) & set(ids[1]) and not labels[0] & labels[1], "ranks read disjoint classes"
    assert all(len(b[0]) == P * K for r in res for b in r["full"])
    for r in res:
        assert r["resumed"] == r["full"][3:], "a mid-epoch resume yields the very same batches (bitwise)"
    union = res[0]["eval"] + res[1]["eval"]
    assert sorted(union) == sorted(test_of) and res[0]["eval"] and res[1]["eval"], "eval: each sample exactly once"
