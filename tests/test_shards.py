"""``retrieval shards build|verify|merge-stats``: contract, skips, determinism, resume, parts, other inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shards_build_args
from PIL import Image

from retrieval.cli import main
from retrieval.data.shard_writer import read_samples, verify
from retrieval.data.shards import build, merge_stats
from retrieval.data.synth import synth_sop
from retrieval.errors import UserError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def sop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sop") / "sop"
    synth_sop(root, 40, (2, 5), seed=1, size=40)
    return root


@pytest.fixture(scope="module")
def reference(sop, tmp_path_factory) -> Path:
    """The build every other build is compared with (1 worker, small shards)."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert _build(sop, out, "--workers", "1") == 0
    return out


def _build(sop: Path, out: Path, *extra: str) -> int:
    return main(shards_build_args(sop, out, "--shard-size", "12", "--val-classes", "4", "--seed", "5", *extra))


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def txt_count(sop: Path, name: str) -> int:
    return len((sop / name).read_text().splitlines()) - 1


def test_round_trip_contract(sop, reference, capsys):
    assert main(["shards", "verify", str(reference)]) == 0
    assert "ok" in capsys.readouterr().out
    stats = json.loads((reference / "stats.json").read_text())
    sizes = json.loads((reference / "sizes.json").read_text())
    assert stats["train"]["samples"] + stats["val"]["samples"] == txt_count(sop, "Ebay_train.txt")
    assert stats["test"]["samples"] == txt_count(sop, "Ebay_test.txt")
    assert stats["val"]["classes"] == 4 and stats["train"]["classes"] == 16 and stats["test"]["classes"] == 20
    assert sizes == {k: v for s in SPLITS for k, v in stats[s]["shard_samples"].items()}
    assert set(sizes) == set(tars(reference)) and stats["config"]["seed"] == 5
    for split in SPLITS:
        assert set(stats[split]) >= {"samples", "classes", "shards", "bytes", "skipped", "seconds", "shard_samples"}
    sample = read_samples(reference / "test-000000.tar")[0]
    meta = json.loads(sample["json"])
    assert sample["__key__"] == "000000001" and sample["cls"] == str(meta["class_id"]).encode()
    assert set(meta) == {"image_id", "class_id", "super_class_id", "path", "width", "height", "split"}
    assert meta["path"].endswith(".JPG") and meta["split"] == "test" and max(meta["width"], meta["height"]) == 40
    # small RGB JPEGs pass through byte for byte
    assert sample["jpg"] == (sop / meta["path"]).read_bytes()


def test_train_shards_class_grouped_and_shuffled(reference):
    order, home = [], {}
    for name in sorted(p.name for p in reference.glob("train-*.tar")):
        for s in read_samples(reference / name):
            c = int(s["cls"])
            assert home.setdefault(c, name) == name  # a class never spans two shards
            if not order or order[-1] != c:
                assert c not in order  # ... and is contiguous
                order.append(c)
    assert order != sorted(order)  # shuffled by seed
    ids = [json.loads(s["json"])["image_id"] for p in sorted(reference.glob("test-*.tar")) for s in read_samples(p)]
    assert ids == sorted(ids)


def test_rebuild_is_byte_identical_and_seed_matters(sop, reference, tmp_path):
    assert _build(sop, tmp_path / "w2", "--workers", "2") == 0
    assert tars(tmp_path / "w2") == tars(reference)
    assert (
        main(
            [
                "shards",
                "build",
                "--sop-root",
                str(sop),
                "--out",
                str(tmp_path / "s6"),
                "--shard-size",
                "12",
                "--val-classes",
                "4",
                "--seed",
                "6",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert tars(tmp_path / "s6")["train-000000.tar"] != tars(reference)["train-000000.tar"]


def test_corrupt_and_missing_are_counted_not_fatal(sop, tmp_path, capsys):
    bad = tmp_path / "sop"
    shutil.copytree(sop, bad)
    rows = [r.split() for r in (bad / "Ebay_test.txt").read_text().splitlines()[1:]]
    corrupt, missing = rows[3][3], rows[7][3]
    data = (bad / corrupt).read_bytes()
    (bad / corrupt).write_bytes(data[: len(data) // 2])  # truncated JPEG
    (bad / missing).unlink()
    assert _build(bad, tmp_path / "err", "--workers", "1") == 2
    assert f"{bad / missing}: image file not found (listed in Ebay_test.txt" in capsys.readouterr().err
    out = tmp_path / "skip"
    assert _build(bad, out, "--workers", "2", "--on-missing", "skip") == 0
    assert main(["shards", "verify", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    skipped = {s["path"]: s["reason"] for s in stats["test"]["skipped"]}
    assert set(skipped) == {corrupt, missing}
    assert skipped[missing].startswith("missing file") and "OSError" in skipped[corrupt]
    assert stats["test"]["samples"] == txt_count(bad, "Ebay_test.txt") - 2


def test_resume_after_lost_shards_and_stale_temp(sop, reference, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(reference, out)
    for name in ("train-000001.tar", "test-000002.tar"):
        (out / name).unlink()
    (out / ".build" / "val-000000.tar.json").unlink()  # a tar without its summary is not finished
    (out / ".test-000002.tar.tmp").write_bytes(b"half a shard")
    (out / "stats.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert _build(sop, out, "--workers", "2") == 0
    assert tars(out) == tars(reference) and not list(out.glob(".*.tmp"))
    assert {n: (out / n).stat().st_mtime_ns for n in before if not n.startswith("val")} == {
        n: t for n, t in before.items() if not n.startswith("val")
    }  # finished shards were not rewritten
    assert main(["shards", "verify", str(out)]) == 0


def test_kill_midway_then_rerun(sop, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "retrieval",
        "shards",
        "build",
        "--sop-root",
        str(sop),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--val-classes",
        "4",
        "--seed",
        "5",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*.tar")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "stats.json").exists()  # killed midway
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    fresh = tmp_path / "fresh"
    assert subprocess.run(cmd[:8] + [str(fresh)] + cmd[9:], capture_output=True).returncode == 0
    assert tars(out) == tars(fresh) and len(tars(out)) > 10
    assert main(["shards", "verify", str(out)]) == 0


def test_parts_then_merge(sop, reference, tmp_path):
    out = tmp_path / "parts"
    assert _build(sop, out, "--workers", "1", "--part", "1/3") == 0
    assert not (out / "stats.json").exists()
    with pytest.raises(UserError, match=r"shard\(s\) not built yet"):
        merge_stats(out)
    for i in (0, 2):
        assert _build(sop, out, "--workers", "1", "--part", f"{i}/3") == 0
    assert main(["shards", "merge-stats", str(out)]) == 0
    assert tars(out) == tars(reference)
    ref_stats, stats = (json.loads((d / "stats.json").read_text()) for d in (reference, out))
    for split in SPLITS:
        assert stats[split]["shard_samples"] == ref_stats[split]["shard_samples"]
    assert (out / "sizes.json").read_text() == (reference / "sizes.json").read_text()
    assert main(["shards", "build", "--sop-root", str(sop), "--out", str(out), "--part", "3/3"]) == 2


def test_other_options_same_out_and_verify_mismatch(sop, reference, tmp_path, capsys):
    build(out=tmp_path / "x", sop_root=str(sop), shard_size=12, val_classes=4, seed=5, workers=1)
    with pytest.raises(UserError, match="holds a build made from other inputs or options"):
        build(out=tmp_path / "x", sop_root=str(sop), shard_size=13, val_classes=4, seed=5, workers=1)
    out = tmp_path / "tampered"
    shutil.copytree(reference, out)
    stats = json.loads((out / "stats.json").read_text())
    stats["test"]["samples"] += 1
    (out / "stats.json").write_text(json.dumps(stats))
    (out / "val-000000.tar").unlink()
    assert main(["shards", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "test: " in text and "stats.json says" in text and "val: shards on disk" in text and "FAILED" in text
    problems, _ = verify(reference, workers=2)
    assert problems == []


def _images(root: Path, n_classes: int, per_class: int) -> list[tuple[str, str]]:
    rows = []
    for c in range(n_classes):
        for i in range(per_class):
            rel = f"cls_{c:02d}/img{i}.png"  # PNG and larger than --max-side: re-encoded to JPEG
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (90, 60), (20 * c % 256, 40 * i % 256, 99)).save(root / rel)
            rows.append((rel, f"label-{c}"))
    return rows


def test_manifest_and_image_folder_inputs(tmp_path):
    rows = _images(tmp_path / "cat", 8, 3)
    (tmp_path / "cat" / "m.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    for flag, src in (("--manifest", tmp_path / "cat" / "m.csv"), ("--image-folder", tmp_path / "cat")):
        out = tmp_path / flag.strip("-")
        assert (
            main(
                [
                    "shards",
                    "build",
                    flag,
                    str(src),
                    "--out",
                    str(out),
                    "--max-side",
                    "45",
                    "--val-classes",
                    "1",
                    "--test-classes",
                    "0.5",
                    "--workers",
                    "1",
                ]
            )
            == 0
        )
        assert main(["shards", "verify", str(out)]) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert [stats[s]["classes"] for s in SPLITS] == [3, 1, 4] and stats["config"]["source"]["kind"] == flag[
            2:
        ].replace("-", "_")
        meta = json.loads(read_samples(out / "test-000000.tar")[0]["json"])
        assert (meta["width"], meta["height"]) == (45, 30) and meta["path"].endswith(".png")


@pytest.mark.slow
def test_webdataset_reads_the_shards(reference):
    import webdataset as wds

    urls = [str(p) for p in sorted(reference.glob("test-*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json")
    n = sum(1 for img, cls, meta in ds if int(cls) == meta["class_id"] and img.size == (meta["width"], meta["height"]))
    assert n == json.loads((reference / "stats.json").read_text())["test"]["samples"]


def test_bad_part_and_source_arguments(sop, tmp_path, capsys):
    assert main(["shards", "build", "--sop-root", str(sop), "--out", str(tmp_path / "o"), "--part", "2/2"]) == 2
    assert "--part: expected 0 <= i < n" in capsys.readouterr().err
    assert main(["shards", "merge-stats", str(tmp_path / "nothing")]) == 2
    assert os.path.exists(sop / "Ebay_info.txt")


def _local_slurm() -> dict[str, str] | None:
    """SLURM_CONF of the local test cluster (.ci/slurm-up.sh writes it), or None."""
    conf = os.environ.get("SLURM_CONF")
    env_file = Path(os.environ.get("RETRIEVAL_SLURM_DIR") or "/tmp/retrieval-slurm") / "slurm.env"
    if not conf and env_file.is_file():
        conf = env_file.read_text().strip().split("SLURM_CONF=")[-1]
    if not conf or not shutil.which("sbatch"):
        return None
    env = dict(os.environ, SLURM_CONF=conf)
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True)
    return env if ping.returncode == 0 and "UP" in ping.stdout else None


@pytest.mark.slurm
def test_sbatch_array_then_dependent_merge(sop, reference, repo_root, tmp_path):
    env = _local_slurm()
    if env is None:
        pytest.skip("no local Slurm: start one with .ci/slurm-up.sh (.ci/run does it)")
    env["RETRIEVAL"] = f"{sys.executable} -m retrieval"
    out = tmp_path / "out"
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-2",
            "--cpus-per-task=1",
            "--mem=500M",
            f"--chdir={tmp_path}",
            str(repo_root / "slurm" / "shards.sbatch"),
            "--sop-root",
            str(sop),
            "--out",
            str(out),
            "--shard-size",
            "12",
            "--val-classes",
            "4",
            "--seed",
            "5",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert submit.returncode == 0, submit.stderr
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "sizes.json").is_file():
        time.sleep(1)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert (out / "sizes.json").is_file(), logs
    assert tars(out) == tars(reference)
    assert "part 2/3" in logs and "merge job" in logs
    deadline = time.time() + 30  # verify runs in the merge job after merge-stats
    while time.time() < deadline and "verify: " not in logs:
        time.sleep(1)
        logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert f"verify: {out}: ok" in logs


def test_a_build_shows_progress_with_a_total_also_in_a_log_file(sop, tmp_path, capsys):
    """Today a build whose stderr is not a terminal (Slurm, a log file) prints nothing while it works."""
    assert _build(sop, tmp_path / "shards", "--workers", "1") == 0
    err = capsys.readouterr().err  # captured: not a terminal
    total = sum(json.loads((tmp_path / "shards" / "stats.json").read_text())[s]["samples"] for s in SPLITS)
    assert "to write)" in err and f"{total}/{total}" in err


def test_shards_follow_the_umask(sop, tmp_path):
    """Shards were chmod-ed 0644 whatever the umask; a group-writable team setting (002) gives 0664."""
    import stat

    old = os.umask(0o002)
    try:
        assert _build(sop, tmp_path / "shards", "--workers", "1") == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "shards").rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o664} and len(files) > 5
