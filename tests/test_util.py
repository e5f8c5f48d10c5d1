"""util: atomic files and folders, folder locks, file modes under the umask (issue 29, points 5, 6 and 9)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval import util


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    """mkstemp makes 0600 whatever the umask; a team on a shared cluster must be able to read each other's files."""
    old = os.umask(mask)
    try:
        util.write_atomic(tmp_path / "a.json", "{}")
        with util.atomic_path(tmp_path / "b.bin") as tmp, open(tmp, "wb") as f:
            f.write(b"x")
        stage = util.stage_folder(tmp_path / "folder")
        plain = tmp_path / "plain"
        plain.write_text("reference")  # what open() gives under this umask
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == _mode(plain) == 0o666 & ~mask
    assert _mode(stage) == 0o777 & ~mask
    assert util.file_mode() == 0o666 & ~old  # read back without changing it


def test_switch_folder_replaces_the_old_version_whole(tmp_path):
    dest = tmp_path / "index"
    dest.mkdir()
    (dest / "old-only").write_text("old")
    (dest / "shared").write_text("old")
    with util.staged(dest) as stage:
        (stage / "shared").write_text("new")
        assert (dest / "old-only").is_file()  # the old version is whole until the switch
    assert sorted(p.name for p in dest.iterdir()) == ["shared"] and (dest / "shared").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no stage, no old version left


def test_a_failed_version_leaves_the_old_folder_as_it_was(tmp_path):
    dest = tmp_path / "emb"
    dest.mkdir()
    (dest / "meta.json").write_text("old")
    with pytest.raises(RuntimeError), util.new_version(dest) as stage:
        (stage / "meta.json").write_text("half")
        raise RuntimeError("killed half-way")
    assert (dest / "meta.json").read_text() == "old"
    assert not list(tmp_path.glob(".emb.stage-*"))


def test_clean_stages_removes_leftovers_and_restores_a_missing_folder(tmp_path):
    dest = tmp_path / "index"
    (tmp_path / ".index.stage-dead").mkdir()  # a build killed while writing
    old = tmp_path / ".index.old-dead"  # the fallback switch killed between its two renames
    old.mkdir()
    (old / "index.json").write_text("{}")
    removed = util.clean_stages(dest)
    assert [p.name for p in removed] == [".index.stage-dead"]
    assert (dest / "index.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_the_fallback_switch_without_exchange(tmp_path, monkeypatch):
    """Filesystems without RENAME_EXCHANGE: two renames, and still the new folder in place, nothing left."""
    monkeypatch.setattr(util, "_exchange", lambda a, b: False)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "x").write_text("old")
    with util.staged(dest) as stage:
        (stage / "x").write_text("new")
    assert (dest / "x").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_held_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    """One writer per folder; readers share; a killed holder's lock is gone with it (flock is per process)."""
    path = util.folder_lock_path(tmp_path / "emb")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from retrieval import util; util.lock({str(path)!r}); print('held', flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(util.Busy) as busy:
            util.lock(path)
        assert busy.value.holder == str(holder.pid)
        with pytest.raises(util.Busy):
            util.lock(path, shared=True)
    finally:
        holder.kill()
        holder.wait()
    a, b = util.lock(path, shared=True), util.lock(path, shared=True)  # readers go together
    with pytest.raises(util.Busy):
        util.lock(path)
    util.unlock(a)
    util.unlock(b)
    util.unlock(util.lock(path))
