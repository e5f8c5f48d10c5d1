"""Shard sources other than a local folder: a URL prefix on a local HTTP server, ``pipe:`` commands, brace
patterns; retries and a clear error for an unreachable URL. Embeddings and trained weights match the folder's."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, embed_args
from safetensors.numpy import load_file

from retrieval.cli import main
from retrieval.data import source
from retrieval.embed.embeddings import EmbeddingSet
from retrieval.errors import UserError
from retrieval.util import free_port

REPO = Path(__file__).resolve().parents[1]
FAST = ["log.wandb=disabled", "data.num_workers=0", "train.deterministic=true", "train.eval_every=0"]
FAST += ["train.epochs=1", "data.steps_per_epoch=2"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    fail_first: set[str] | None = None  # paths answered 503 once (a flaky server), then served

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.fail_first is not None and self.path.endswith(".tar") and self.path not in self.fail_first:
            self.fail_first.add(self.path)
            self.send_error(503, "try again")
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path, flaky: bool = False, seconds: float = 300):
    """``http://127.0.0.1:PORT/`` serving ``folder`` from a thread; shut down on exit or after ``seconds``."""
    handler = type("Handler", (_Quiet,), {"fail_first": set() if flaky else None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    watchdog = threading.Timer(seconds, server.shutdown)  # bounded even if a test hangs
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _pipe_source(folder: Path) -> str:
    """``pipe:cat`` brace patterns for every split of a builder folder (webdataset's S3 convention, locally)."""
    parts = []
    for split in ("train", "val", "test"):
        n = len(list(folder.glob(f"{split}-*.tar")))
        parts.append(f"pipe:cat {folder}/{split}-{{000000..{n - 1:06d}}}.tar")
    return "::".join(parts)


def _embed(model: Path, shards: str, out: Path) -> EmbeddingSet:
    argv = embed_args(model, shards, out)
    assert main(argv + ["--num-workers", "1", "--batch-size", "32"]) == 0
    return EmbeddingSet.load(out)


def test_train_and_embed_from_http_and_pipe_match_the_folder(synth_shards, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "http"
    base = ["train", "--config", TINY, *FAST]
    assert main(base + ["--shards", str(synth_shards), "--run-dir", str(local)]) == 0
    with serve(synth_shards, flaky=True) as url:  # every shard answers 503 once: the retry must absorb it
        assert main(base + ["--shards", url, "--run-dir", str(remote)]) == 0
        a, b = load_file(str(local / "model.safetensors")), load_file(str(remote / "model.safetensors"))
        assert all(np.array_equal(a[k], b[k]) for k in a), "same data from HTTP: the same weights"
        from_http = _embed(local, url, tmp_path / "emb-http")
    piped = tmp_path / "pipe"
    assert main(base + ["--shards", _pipe_source(synth_shards), "--run-dir", str(piped)]) == 0
    c = load_file(str(piped / "model.safetensors"))
    assert all(np.array_equal(a[k], c[k]) for k in a), "same data from pipe:cat: the same weights"
    from_folder = _embed(local, str(synth_shards), tmp_path / "emb-folder")
    from_pipe = _embed(local, _pipe_source(synth_shards), tmp_path / "emb-pipe")
    for other in (from_http, from_pipe):
        assert np.array_equal(other.ids, from_folder.ids)
        assert np.array_equal(other.embeddings, from_folder.embeddings)


def test_source_forms_resolve_to_the_same_shards(synth_shards):
    names = sorted(p.name for p in synth_shards.glob("train-*.tar"))
    assert [Path(u).name for u in source.shard_urls(synth_shards, "train")] == names
    pipe = source.shard_urls(_pipe_source(synth_shards), "train")
    assert [source.tar_name(u) for u in pipe] == names and all(u.startswith("pipe:cat ") for u in pipe)
    assert source.read_stats(_pipe_source(synth_shards)) == source.read_stats(synth_shards)
    with serve(synth_shards) as url:
        assert source.shard_urls(url, "train") == [url + n for n in names]
        assert source.read_stats(url)["train"]["samples"] == source.read_stats(synth_shards)["train"]["samples"]


def test_unreachable_url_is_a_clear_error_after_retries(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FETCH_ATTEMPTS", "2")
    dead = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(UserError, match="not found.*shards index"):
        source.read_stats(dead)
    with pytest.raises(UserError, match=r"train-000000.tar: unreachable after 2 attempts"):
        source.open_shard(dead + "train-000000.tar")
    with pytest.raises(UserError, match="unreachable after 2 attempts"):
        source.open_shard("pipe:exit 3 && train-000000.tar")
