"""Streaming loader, single process: P×K structure, determinism, resume, small classes, bad data, eval coverage."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import _shardkit as sk
import pytest
import torch

from retrieval.config.schema import DataConfig
from retrieval.data import loader as L
from retrieval.data import transforms as tfm
from retrieval.data.decode import decode_image
from retrieval.data.input_spec import InputSpec
from retrieval.errors import UserError

# tests run more workers than this machine's 2 cores on purpose (worker splitting), torch warns about it
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

MEAN = STD = (0.5, 0.5, 0.5)
IMG = 32
SPEC = InputSpec(IMG, MEAN, STD, 0.875)


def _train_layout() -> list[list[tuple[int, int]]]:
    """5 uneven shards, 30 classes of 1..7 images (class c has 1 + c % 7 images)."""
    sizes = [3, 9, 5, 7, 6]
    layout, c = [], 1
    for n in sizes:
        layout.append([(c + i, 1 + (c + i) % 7) for i in range(n)])
        c += n
    return layout


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[int, int]]:
    """Train shards + a 4-shard test split; returns (dir, image_id -> class_id of train)."""
    d = tmp_path_factory.mktemp("shards")
    layout = _train_layout()
    sk.write_split(d, "train", layout)
    sk.write_split(d, "test", [[(100 + s * 3 + i, 3) for i in range(3)] for s in range(4)], first_id=1000)
    classes, image_id = {}, 1
    for shard in layout:
        for c, n in shard:
            for _ in range(n):
                classes[image_id] = c
                image_id += 1
    return d, classes


def _cfg(**kw) -> DataConfig:
    base = dict(classes_per_batch=3, images_per_class=4, class_pool=8, num_workers=0, seed=7)
    return DataConfig(**{**base, **kw})


def _train(d: Path, cfg: DataConfig, epoch: int = 0, steps: int = 6, start_step: int = 0, **kw) -> list[dict]:
    return list(L.train_loader(d, cfg, SPEC, L.EpochSpan(epoch, steps, start_step), L.Reader(**kw)))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"])
        and torch.equal(x["label"], y["label"])
        and torch.equal(x["image_id"], y["image_id"])
        for x, y in zip(a, b, strict=True)
    )


def _class_sizes(classes: dict[int, int]) -> Counter:
    return Counter(classes.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_are_p_by_k(shards, workers):
    d, classes = shards
    cfg = _cfg(num_workers=workers)
    loader = L.train_loader(d, cfg, SPEC, L.EpochSpan(0, 7))
    assert len(loader) == 7
    batches = list(loader)
    assert len(batches) == 7
    sizes = _class_sizes(classes)
    for b in batches:
        assert b["image"].shape == (12, 3, IMG, IMG) and b["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["image_id"].dtype == torch.int64
        labels = b["label"].view(3, 4)
        assert (labels == labels[:, :1]).all(), "each class fills K consecutive slots"
        assert len(set(labels[:, 0].tolist())) == 3, "P distinct classes"
        for lab, iid in zip(b["label"].tolist(), b["image_id"].tolist(), strict=True):
            assert classes[iid] == lab
            assert sizes[lab] >= 2, "1-image classes have no positive and are never used"
        assert b["skipped"] == 0


def test_order_is_a_function_of_seed_and_epoch(shards):
    d, _ = shards
    a = _train(d, _cfg(num_workers=2), epoch=3)
    assert _same(a, _train(d, _cfg(num_workers=2), epoch=3))
    assert not _same(a, _train(d, _cfg(num_workers=2), epoch=4))
    assert not _same(a, _train(d, _cfg(num_workers=2, seed=8), epoch=3))
    # one worker in a process == in-process (W = 1 both ways)
    assert _same(_train(d, _cfg(num_workers=1)), _train(d, _cfg(num_workers=0)))


def test_a_slow_consumer_gets_the_batches_a_fast_one_gets(shards):
    """Workers hand images over through shared slots (retrieval.data.handoff): with the consumer slow, both workers
    run as far ahead as the DataLoader lets them; no batch is overwritten before it is taken, none after."""
    d, _ = shards
    fast = _train(d, _cfg(num_workers=2), steps=12)
    slow = []
    for batch in L.train_loader(d, _cfg(num_workers=2), SPEC, L.EpochSpan(0, 12)):
        slow.append(batch)
        time.sleep(0.1)
    assert _same(fast, slow)
    assert len({b["image"].data_ptr() for b in slow}) == 12, "each batch owns its images"


@pytest.mark.parametrize("workers,start", [(0, 3), (2, 1), (2, 4), (3, 5), (2, 9)])
def test_resume_yields_the_tail(shards, workers, start):
    d, _ = shards
    full = _train(d, _cfg(num_workers=workers), epoch=1, steps=9)
    tail = _train(d, _cfg(num_workers=workers), epoch=1, steps=9, start_step=start)
    assert len(tail) == 9 - start
    assert _same(full[start:], tail)


def test_resume_decodes_only_yielded_batches(shards, monkeypatch):
    d, _ = shards
    calls = []
    real = L.decode_image
    monkeypatch.setattr(L, "decode_image", lambda data: calls.append(1) or real(data))
    _train(d, _cfg(), steps=8, start_step=6)
    assert len(calls) == 2 * 3 * 4


def test_small_class_rule(shards):
    d, classes = shards
    sizes = _class_sizes(classes)
    seen_small = False
    for b in _train(d, _cfg(small_class="repeat"), steps=10):
        for lab, ids in zip(b["label"].view(3, 4)[:, 0].tolist(), b["image_id"].view(3, 4).tolist(), strict=True):
            distinct = {i for i, c in classes.items() if c == lab}
            if sizes[lab] < 4:  # repeat: every image of the class once, then repeats
                seen_small = True
                assert set(ids) == distinct
            else:
                assert len(set(ids)) == 4
    assert seen_small
    for b in _train(d, _cfg(small_class="drop"), steps=10):
        assert all(sizes[lab] >= 4 for lab in b["label"].tolist())


@pytest.mark.parametrize("workers", [0, 1])
def test_too_few_classes_is_a_user_error(tmp_path, workers):
    sk.write_split(tmp_path, "train", [[(1, 4), (2, 1), (3, 2), (4, 5)]])
    with pytest.raises(UserError, match="classes_per_batch=3") as e:
        _train(tmp_path, _cfg(small_class="drop", num_workers=workers))
    assert "Traceback" not in str(e.value)


def test_corrupt_jpegs_are_skipped_and_counted(tmp_path, caplog):
    # class 1: images 1..4, image 2 corrupt; class 2: images 5..7 all corrupt; class 6: images 21..24,
    # only 21 decodes (and the eval worker of shard 1 ends on 3 corrupt samples after 2 full batches).
    layout = [[(1, 4), (2, 3), (3, 4)], [(4, 5), (5, 4), (6, 4)]]
    bad = {2, 5, 6, 7, 22, 23, 24}
    sk.write_split(tmp_path, "train", layout, corrupt=bad)
    sk.write_split(tmp_path, "test", layout, corrupt=bad, first_id=1)
    cfg = _cfg(class_pool=6)
    with caplog.at_level(logging.WARNING, logger="retrieval.data.samples"):
        batches = _train(tmp_path, cfg, steps=8)
    assert len(batches) == 8
    assert sum(b["skipped"] for b in batches) == len(bad)
    assert len([r for r in caplog.records if "skipping sample" in r.message]) == 1, "warn once"
    for b in batches:
        assert b["image"].shape[0] == 12 and not set(b["image_id"].tolist()) & bad
        labels = b["label"].view(3, 4)
        assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == 3
        assert 2 not in b["label"].tolist(), "a class with no decodable image is replaced"
        if 6 in b["label"].tolist():
            assert b["image_id"][b["label"] == 6].tolist() == [21] * 4, "one decodable image fills the class"
    ev = list(L.eval_loader(tmp_path, "test", SPEC, 5, 2))
    ids = [i for b in ev for i in b["image_id"].tolist()]
    assert sorted(ids) == [i for i in range(1, 25) if i not in bad]
    assert sum(b["skipped"] for b in ev) == len(bad)
    assert [len(b["path"]) for b in ev if b["skipped"] == 3] == [0], "trailing skips come in an empty batch"


@pytest.mark.parametrize("workers,batch", [(0, 4), (3, 5), (4, 7)])
def test_eval_yields_every_sample_once(shards, workers, batch):
    d, _ = shards
    batches = list(L.eval_loader(d, "test", SPEC, batch, workers))
    ids = [i for b in batches for i in b["image_id"].tolist()]
    assert sorted(ids) == list(range(1000, 1036))
    for b in batches:
        assert b["image"].shape[1:] == (3, IMG, IMG) and 0 < len(b["path"]) <= batch
        assert len(b["label"]) == len(b["super_label"]) == len(b["path"])
        # workers send the integer columns as lists; the consumer gets int64 tensors whichever way they came
        assert all(b[k].dtype == torch.int64 for k in ("label", "image_id", "super_label"))


def test_eval_with_more_ranks_than_shards(shards):
    d, _ = shards
    per_rank = [
        [i for b in L.eval_loader(d, "test", SPEC, 8, 2, L.Reader(r, 6)) for i in b["image_id"].tolist()]
        for r in range(6)
    ]
    assert all(per_rank), "fewer shards than ranks: the split goes inside the shards, every rank gets samples"
    assert sorted(i for p in per_rank for i in p) == list(range(1000, 1036))


def test_ranks_see_disjoint_shards_and_equal_counts(shards):
    d, classes = shards
    shard_of = {}
    for iid in classes:  # image ids are numbered shard by shard
        shard_of[iid] = next(s for s, end in enumerate([3, 12, 17, 24, 30]) if classes[iid] <= end)
    for epoch in (0, 1):
        seen = []
        for r in range(2):
            batches = _train(d, _cfg(num_workers=2), epoch=epoch, steps=5, rank=r, world=2)
            assert len(batches) == 5
            seen.append({shard_of[i] for b in batches for i in b["image_id"].tolist()})
        assert not seen[0] & seen[1]


def test_fewer_shards_than_readers_split_inside_shards(tmp_path):
    """2 shards for 3 ranks x 2 workers: no error, no dropped worker; disjoint classes, equal step counts."""
    sk.write_split(tmp_path, "train", [[(c, 4 + c % 3) for c in range(1, 19)], [(c, 5) for c in range(19, 37)]])
    per_rank = [_train(tmp_path, _cfg(num_workers=2, class_pool=3), steps=4, rank=r, world=3) for r in range(3)]
    assert [len(b) for b in per_rank] == [4, 4, 4]
    labels = [{c for b in batches for c in b["label"].tolist()} for batches in per_rank]
    assert not (labels[0] & labels[1] or labels[0] & labels[2] or labels[1] & labels[2])


def test_clear_errors_on_missing_inputs(tmp_path):
    with pytest.raises(UserError, match="stats.json"):
        L.read_stats(tmp_path)
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(UserError, match="stats.json: not valid JSON"):
        L.read_stats(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        L.shard_urls(tmp_path / "nope", "train")
    (tmp_path / "stats.json").unlink()
    with pytest.raises(UserError, match="no shards for split 'val'"):
        L.shard_urls(tmp_path, "val")
    sk.write_split(tmp_path, "val", [[(1, 2)]])
    assert L.read_stats(tmp_path)["val"]["samples"] == 2
    assert L.shard_urls(tmp_path, "val") == [str(tmp_path / "val-000000.tar")]


def test_transforms_shapes_at_full_size_decode():
    img = decode_image(sk.jpeg_bytes(0, size=200))
    assert img.size == (208, 200)  # full size: no draft decode, whatever the model's input (issue 29)
    cfg = DataConfig(color_jitter=0.3)
    spec48 = InputSpec(48, MEAN, STD, 0.875)
    assert tfm.train_transform(spec48, cfg)(img).shape == (3, 48, 48)
    assert tfm.eval_transform(spec48)(img).shape == (3, 48, 48)
    assert tfm.eval_min_side(224, 0.875) == 256


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_leaves_the_global_rng_alone(shards, workers):
    """A resumed trainer's RNG must match an uninterrupted one: loaders neither draw from nor reseed it."""
    d, _ = shards
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _train(d, _cfg(num_workers=workers), steps=2)
    list(L.eval_loader(d, "test", SPEC, 8, workers))
    assert torch.equal(torch.rand(3), expected)


def test_a_cls_that_is_no_integer_is_refused_not_hashed():
    """Today `.cls` = "zq" is hashed into a label silently (only `shards verify` notices): now the sample is
    malformed (skipped and counted, warned once); text labels are read with data.label_key=txt."""
    from retrieval.data.samples import parse_sample, stable_int

    raw = {"__key__": "000000001", "jpg": sk.jpeg_bytes(0), "cls": b"zq", "txt": b"zq"}
    with pytest.raises(ValueError, match=r"its \.cls holds 'zq', expected an integer class id"):
        parse_sample(raw, "cls")
    assert parse_sample(raw, "txt").label == stable_int("zq")
    assert parse_sample({**raw, "cls": b" 12\n"}, "cls").label == 12


def test_hard_negative_pairs_meet_in_batches(shards, tmp_path):
    """data.hard_negatives (retrieval feedback export): a batch that draws one class of a pair draws the other when
    the worker's pool holds it; without the file the batches are those of before (no extra random draws)."""
    from retrieval.data.negatives import write_pairs

    d, _ = shards
    pairs = [(4, 20), (9, 26), (5, 13)]  # classes of 5 + 7, 3 + 6, 6 + 7 images, in different shards
    write_pairs(tmp_path / "neg.tsv", {p: 1 for p in pairs})

    def met(batches: list[dict]) -> tuple[int, int]:
        """(batches holding a whole pair, batches holding one class of a pair without its partner)."""
        labels = [set(b["label"].tolist()) for b in batches]
        whole = sum(any({a, b} <= s for a, b in pairs) for s in labels)
        half = sum(any(len({a, b} & s) == 1 for a, b in pairs) for s in labels)
        return whole, half

    cfg = _cfg(class_pool=32)
    plain = _train(d, cfg, steps=12)
    forced = _train(d, _cfg(class_pool=32, hard_negatives=str(tmp_path / "neg.tsv")), steps=12)
    assert met(plain)[0] <= 2 and met(forced)[0] >= 10, (met(plain), met(forced))
    assert _same(plain, _train(d, cfg, steps=12))
    bad = tmp_path / "bad.tsv"
    bad.write_text("4\tnine\n")
    with pytest.raises(UserError, match="bad.tsv:1: expected two class ids"):
        _train(d, _cfg(hard_negatives=str(bad)), steps=1)


def test_a_pool_that_holds_every_class_reads_the_shards_once(shards, tmp_path):
    """A pool of at least the worker's classes keeps them (re-reading a pass per batch cost 200 ms a plan at 255
    classes); every usable class comes once per cycle, never twice in a batch."""
    d, classes = shards
    copy = tmp_path / "shards"
    copy.mkdir()
    for f in d.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    usable = {c for c, n in _class_sizes(classes).items() if n >= 2}  # a 1-image class has no positive
    cycle = len(usable) // 3  # batches of P = 3 classes
    batches = iter(L.train_loader(copy, _cfg(class_pool=64), SPEC, L.EpochSpan(0, 3 * cycle)))
    first = next(batches)
    for tar in copy.glob("train-*.tar"):
        tar.unlink()  # a planner that reads its shards again fails from here on
    per_batch = [set(b["label"].tolist()) for b in [first, *batches]]
    assert len(per_batch) == 3 * cycle and all(len(labels) == 3 for labels in per_batch)
    for k in range(3):  # each cycle: distinct classes
        assert len(set().union(*per_batch[k * cycle : (k + 1) * cycle])) == 3 * cycle
    assert set().union(*per_batch) == usable


@pytest.mark.parametrize("cache_mb", [256, 0])
def test_a_small_pool_rereads_its_shards_from_memory_with_the_same_batches(shards, tmp_path, cache_mb):
    """A pool smaller than the worker's classes passes over its shards again and again; after the first pass the
    worker reads them from its shard cache (no tar parsing, no download), and the batches are those of a worker
    that reads the tars every pass. Without the cache, the second pass needs the files."""
    d, _ = shards
    copy = tmp_path / "shards"
    shutil.copytree(d, copy)
    rereading = _train(d, _cfg(shard_cache_mb=0), steps=30)  # 30 x P=3 draws: about 4 passes over 30 groups
    batches = iter(L.train_loader(copy, _cfg(shard_cache_mb=cache_mb), SPEC, L.EpochSpan(0, 30)))
    first = [next(batches) for _ in range(10)]  # a pool of 8 + 3 x 9 groups: the first pass is over
    for tar in copy.glob("train-*.tar"):
        tar.unlink()
    if cache_mb == 0:
        with pytest.raises(FileNotFoundError, match="train-"):
            list(batches)
        return
    assert _same(rereading, [*first, *batches])
