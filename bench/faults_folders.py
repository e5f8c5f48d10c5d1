"""Fault campaign for the output folders (``make faults``; a few trials run in the default suite): kill -9
``retrieval index build`` (plain and ``--factory auto``) and ``retrieval index add`` / ``index remove`` at instants,
and run two ``retrieval embed`` into one folder at once (one of them killed in some trials), then read the folder as
search and eval would.

    python bench/faults_folders.py --trials 20 --update-trials 20 --embed-trials 10 --seed 0 [--work DIR]

Index trials: the folder first holds an index over embeddings set A; a build over set B (other vectors, another
count) is killed at an instant, half uniform over a build's duration and half right after an event in the folder
(the stage folder appears, its index.faiss or index.json is written, the folder is switched). Each outcome is
``IndexFolder.load`` (what ``retrieval search`` and ``serve`` load) of the folder:

- old: it loads and is A's build (its build id), every vector of A finds its own id first;
- new: it loads and is B's, every vector of B finds its own id first;
- refused: one line naming the folder;
- MIXED: anything else (it loads but answers with another set's rows, or a file is missing): must never happen.

Then a build that is not killed must succeed and leave nothing beside the folder (what the killed one left is
cleaned). Update trials: the folder holds a build over set A (Flat, then IVF, then HNSW in turn); ``index add`` of
set C (the same model, new ids) or ``index remove`` of a quarter of A's ids is killed at an instant, as above. The
folder must then load as the old version (A's build id, A's rows) or the new one (the next version: its rows find
themselves, a removed id is never returned), and an update that is not killed must succeed and leave it clean. Embed trials: the folder holds model A's set; embeds of model B and model A start 0-1 s apart, and half
of the trials kill one of them at a random instant. The folder must then load (as eval loads it) with exactly the
vectors of one model's complete set (old, new A or new B), and a run that did not finish must have been refused
with a line naming the folder, or killed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.faults import kill_after  # noqa: E402
from retrieval import dist  # noqa: E402
from retrieval.embed.embeddings import EmbeddingSet  # noqa: E402
from retrieval.errors import UserError  # noqa: E402
from retrieval.index.folder import IndexFolder  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
PY = [sys.executable, "-m", "retrieval"]


def _staged(name: str = ""):
    return lambda out: any(out.parent.glob(f".{out.name}.stage-*/{name}"))


EVENTS = {  # file-system signs of the windows worth killing in (``out`` is the folder), each a sequence of states
    "stage created": [_staged()],
    "index.faiss staged": [_staged("index.faiss")],
    "index.json staged": [_staged("index.json")],
    "switched": [_staged(), lambda out: not _staged()(out)],  # the stage appeared, then became the folder
}


def _env() -> dict[str, str]:
    return dist.launch_env(cpu=True, WANDB_MODE="disabled", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def _vectors(folder: Path, n: int, d: int, seed: int, model: int | None = None) -> None:
    """``n`` unit vectors with ids ``3 i + seed`` (sets of seeds 0, 1, 2 never share an id) of model ``model``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, n // 4, n)
    model = seed if model is None else model
    meta = {"model": f"set-{model}", "model_sha256": f"{model:064d}"}
    EmbeddingSet(x, np.arange(n, dtype=np.int64) * 3 + seed, labels, labels % 7, [], meta).save(folder)


def _build_cmd(emb: Path, out: Path, auto: bool) -> list[str]:
    cmd = [*PY, "index", "build", "--embeddings", str(emb), "--out", str(out), "--gpu", "none"]
    return cmd + (["--factory", "auto", "--tune-queries", "200"] if auto else [])


def _run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as f:
        return subprocess.run(cmd, env=_env(), stdout=f, stderr=f).returncode


def _killed(cmd: list[str], out: Path, when: tuple[str | None, float], log: Path) -> str:
    """Start ``cmd`` and SIGKILL it at ``when`` (an event, then a delay; or a delay alone); where it was killed."""
    event, delay = when
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=f, start_new_session=True)
    killed = kill_after(proc, [lambda state=state: state(out) for state in EVENTS.get(event, [])], delay, poll=0.002)
    where = f"{delay * 1000:.0f} ms after '{event}'" if event else f"at {delay:.2f} s"
    return where if killed else where + " (already ended)"


def index_outcome(out: Path, sets: dict[str, tuple[Path, str]]) -> str:
    """old | new | refused | MIXED: the folder as search and serve load it (module docstring)."""
    try:
        folder = IndexFolder.load(out)
    except UserError as e:
        return "refused" if str(out) in str(e) else f"MIXED (a refusal that names no folder: {e})"
    for name, (emb, build_id) in sets.items():
        if build_id not in (None, folder.info.get("build_id")):
            continue
        es = EmbeddingSet.load(emb)
        if folder.index.ntotal != len(es) or folder.info.get("embeddings") != str(emb):
            continue
        rows = np.linspace(0, len(es) - 1, 500).astype(np.int64)  # a sample of its rows: each must find itself
        _, found = folder.search(es.embeddings[rows], 1)
        if np.array_equal(found[:, 0], es.ids[rows]) and (folder.rows(es.ids) >= 0).all():
            return name
    return "MIXED"


def index_trials(work: Path, trials: int, rng: random.Random, auto: bool) -> dict[str, int]:
    a, b, out = work / "emb-a", work / "emb-b", work / ("index-auto" if auto else "index")
    log = work / f"{out.name}.log"
    t0 = time.monotonic()
    assert _run(_build_cmd(b, work / f"{out.name}-timing", auto), log) == 0, f"see {log}"
    duration = time.monotonic() - t0
    counts = {"old": 0, "new": 0, "refused": 0, "MIXED": 0, "clean rebuild": 0}
    for i in range(trials):
        shutil.rmtree(out, ignore_errors=True)
        assert _run(_build_cmd(a, out, auto), log) == 0, f"see {log}"
        old_id = IndexFolder.load(out).info["build_id"]
        event = rng.choice([None, *EVENTS]) if i % 2 else None
        when = (event, rng.uniform(0, 0.05)) if event else (None, rng.uniform(0.05, 1.0) * duration)
        where = _killed(_build_cmd(b, out, auto), out, when, log)
        outcome = index_outcome(out, {"old": (a, old_id), "new": (b, None)})
        counts[outcome if outcome in counts else "MIXED"] += 1
        clean = _run(_build_cmd(b, out, auto), log) == 0 and index_outcome(out, {"new": (b, None)}) == "new"
        clean = clean and sorted(p.name for p in work.glob(f".{out.name}.*")) in ([], [f".{out.name}.lock"])
        counts["clean rebuild"] += clean
        print(f"{out.name} trial {i + 1:2d}/{trials}: killed {where}: {outcome}; rebuild clean: {clean}", flush=True)
    return counts


# ------------------------------------------------------------------------------------------------ updates
UPDATE_FACTORIES = ("Flat", "IVF64,Flat", "HNSW16")


def _update_cmd(out: Path, kind: str, work: Path) -> list[str]:
    if kind == "add":
        return [*PY, "index", "add", "--index", str(out), "--embeddings", str(work / "emb-c")]
    return [*PY, "index", "remove", "--index", str(out), "--ids", str(work / "gone.txt")]


def update_outcome(out: Path, old_id: str, expected: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """old | add | remove | refused | MIXED: the folder as search and serve load it (module docstring).
    ``expected``: what each outcome's index must hold, (ids, vectors); a removed id must never come back."""
    try:
        folder = IndexFolder.load(out)
    except UserError as e:
        return "refused" if str(out) in str(e) else f"MIXED (a refusal that names no folder: {e})"
    name = "old" if folder.info["build_id"] == old_id else folder.info["versions"][-1]["change"]
    if name not in expected or folder.info["count"] != len(expected[name][0]):
        return "MIXED"
    ids, x = expected[name]
    rows = np.linspace(0, len(ids) - 1, 300).astype(np.int64)
    _, found = folder.search(x[rows], 10)
    gone = np.setdiff1d(expected["old"][0], ids)
    if not np.array_equal(found[:, 0], ids[rows]) or np.isin(found, gone).any():
        return "MIXED"
    return name


def _sets(work: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    a, c = EmbeddingSet.load(work / "emb-a"), EmbeddingSet.load(work / "emb-c")
    gone = np.loadtxt(work / "gone.txt", dtype=np.int64)
    keep = ~np.isin(a.ids, gone)
    both = np.concatenate([a.ids, c.ids]), np.concatenate([a.vectors32(), c.vectors32()])
    return {"old": (a.ids, a.vectors32()), "add": both, "remove": (a.ids[keep], a.vectors32()[keep])}


def update_trials(work: Path, trials: int, rng: random.Random) -> dict[str, int]:
    """Kill ``index add`` / ``index remove`` at instants (module docstring); the counts of each outcome."""
    out, log = work / "index-update", work / "index-update.log"
    expected = _sets(work)
    counts = {"old": 0, "add": 0, "remove": 0, "refused": 0, "MIXED": 0, "clean update": 0}
    for i in range(trials):
        factory, kind = UPDATE_FACTORIES[i % 3], ("add", "remove")[(i // 3) % 2]
        shutil.rmtree(out, ignore_errors=True)
        assert _run([*_build_cmd(work / "emb-a", out, False), "--factory", factory], log) == 0, f"see {log}"
        old_id = IndexFolder.load(out).info["build_id"]
        shutil.rmtree(work / "index-timing", ignore_errors=True)
        shutil.copytree(out, work / "index-timing")
        t0 = time.monotonic()
        assert _run(_update_cmd(work / "index-timing", kind, work), log) == 0, f"see {log}"  # how long it takes
        event = rng.choice([None, *EVENTS]) if i % 2 else None
        when = (event, rng.uniform(0, 0.05)) if event else (None, rng.uniform(0.2, 1.5) * (time.monotonic() - t0))
        where = _killed(_update_cmd(out, kind, work), out, when, log)
        outcome = update_outcome(out, old_id, expected)
        counts[outcome if outcome in counts else "MIXED"] += 1
        if outcome == "old":  # the update that was killed, run to its end, must give its version
            clean = _run(_update_cmd(out, kind, work), log) == 0 and update_outcome(out, old_id, expected) == kind
        else:
            clean = outcome == kind and _run(_build_cmd(work / "emb-a", out, False), log) == 0
        clean = clean and sorted(p.name for p in work.glob(f".{out.name}.*")) in ([], [f".{out.name}.lock"])
        counts["clean update"] += clean
        print(f"{factory} {kind} trial {i + 1:2d}/{trials}: killed {where}: {outcome}; clean: {clean}", flush=True)
    return counts


def update_sets(work: Path, rows: int) -> None:
    """Set A (the index's rows), set C (the same model, new ids) and a quarter of A's ids to remove."""
    _vectors(work / "emb-a", rows, 64, seed=1, model=1)
    _vectors(work / "emb-c", rows // 10, 64, seed=0, model=1)
    ids = EmbeddingSet.load(work / "emb-a", vectors=False).ids
    (work / "gone.txt").write_text("\n".join(map(str, ids[::4])) + "\n")


# ------------------------------------------------------------------------------------------------ embed
def _embed_cmd(model: Path, shards: Path, out: Path) -> list[str]:
    return [*PY, "embed", "--model", str(model), "--untrained", "--shards", str(shards), "--split", "test",
            "--out", str(out), "--num-workers", "0", "--part-rows", "16"]  # fmt: skip


def _shards(work: Path) -> Path:
    out = work / "shards"
    if not (out / "stats.json").is_file():
        synth = ["synth-sop", str(work / "sop"), "--classes", "60", "--images-per-class", "3-5", "--size", "64"]
        subprocess.run([*PY, *synth], check=True, env=_env(), capture_output=True)
        build = ["shards", "build", "--sop-root", str(work / "sop"), "--out", str(out), "--shard-size", "40"]
        subprocess.run([*PY, *build, "--workers", "1"], check=True, env=_env(), capture_output=True)
    return out


def embed_outcome(out: Path, refs: dict[str, np.ndarray]) -> str:
    """The model whose complete set the folder holds, or MIXED (eval would refuse or score another mix)."""
    try:
        es = EmbeddingSet.load(out)
    except UserError:
        return "MIXED (not loadable)"
    x = es.vectors32()
    for name, ref in refs.items():
        if x.shape == ref.shape and np.allclose(x, ref, atol=1e-5):
            return name
    return "MIXED"


def embed_trials(work: Path, trials: int, rng: random.Random) -> dict[str, int]:
    shards, log = _shards(work), work / "embed.log"
    models = {"A": work / "tiny-a.yaml", "B": work / "tiny-b.yaml"}
    for seed, path in enumerate(models.values()):  # two untrained models: the same architecture, other weights
        path.write_text(TINY.read_text().replace("train:\n", f"train:\n  seed: {seed + 1}\n", 1))
    refs = {}
    for name, model in models.items():
        assert _run(_embed_cmd(model, shards, work / f"ref-{name}"), log) == 0, f"see {log}"
        refs[name] = EmbeddingSet.load(work / f"ref-{name}").vectors32()
    counts = {"A": 0, "B": 0, "refused": 0, "killed": 0, "MIXED": 0}
    out = work / "emb"
    for i in range(trials):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(work / "ref-A", out)
        procs = {}
        for name in ("B", "A"):
            with open(log, "a") as f:
                procs[name] = subprocess.Popen(_embed_cmd(models[name], shards, out), env=_env(), stdout=f,
                                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
            time.sleep(rng.uniform(0, 1.0))
        victim = rng.choice(["A", "B"]) if i % 2 else None
        if victim:
            time.sleep(rng.uniform(0, 3.0))
            if procs[victim].poll() is None:
                os.killpg(procs[victim].pid, signal.SIGKILL)
                counts["killed"] += 1
        errors = {n: p.communicate()[1] for n, p in procs.items()}
        refused = [n for n, p in procs.items() if p.returncode == 2 and f"{out} is being written" in errors[n]]
        counts["refused"] += len(refused)
        outcome = embed_outcome(out, refs)
        counts[outcome if outcome in counts else "MIXED"] += 1
        codes = {n: p.returncode for n, p in procs.items()}
        print(
            f"embed trial {i + 1:2d}/{trials}: exit codes {codes}, killed {victim}: folder holds {outcome}", flush=True
        )
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="kills of each index build (plain, auto)")
    p.add_argument("--update-trials", type=int, default=20, help="kills of index add / remove")
    p.add_argument("--embed-trials", type=int, default=10)
    p.add_argument("--rows", type=int, default=300_000, help="rows of set A (B has 1.5x): the plain builds")
    p.add_argument("--auto-rows", type=int, default=60_000, help="rows of set A for --factory auto (tuning is slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="faults-folders-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    results = {}
    for auto, rows in ((False, args.rows), (True, args.auto_rows)):
        if args.trials:
            _vectors(work / "emb-a", rows, 64, seed=1)
            _vectors(work / "emb-b", rows + rows // 2, 64, seed=2)
            results["index build" + (" --factory auto" if auto else "")] = index_trials(work, args.trials, rng, auto)
    if args.update_trials:
        update_sets(work, args.rows // 3)
        results["index add / remove"] = update_trials(work, args.update_trials, rng)
    if args.embed_trials:
        results["two embeds into one folder"] = embed_trials(work, args.embed_trials, rng)
    bad = 0
    for what, counts in results.items():
        print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
        bad += counts["MIXED"] + (counts["clean rebuild"] != args.trials if "clean rebuild" in counts else 0)
        bad += counts["clean update"] != args.update_trials if "clean update" in counts else 0
    if args.work is None and not bad:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
