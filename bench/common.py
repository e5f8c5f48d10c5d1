"""What every topic shares: timed repeats and their spread, the JSON envelope, tables, synthetic shards made by
the product's own commands, and the trainer started as a user starts it (``python -m retrieval train``, under
``accelerate launch`` for several processes), its figures read from the ``metrics.jsonl`` it writes.

Every measured item is ``{"median", "min", "max", "p10", "p90", "mean", "repeats", "warmup", "unit", ...}``; a
ratio is ours / baseline on medians, both measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from retrieval.cli import main as retrieval_main
from retrieval.run_folder import RunFolder
from retrieval.util import free_port, write_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GPU_RECIPES = ("sop_swinv2_base.yaml", "sop_swinv2_fast.yaml")
# level -> synth-sop classes (half train), image side, images per shard, val classes. tiny keeps >= 8 train classes
# on each of 2 ranks (P of configs/tiny.yaml); "gpu" gives 8 loader workers x P = 48 classes for the SwinV2-B recipes.
SYNTH = {"tiny": (56, 72, 60, 4), "quick": (96, 80, 80, 6), "full": (400, 96, 256, 20), "gpu": (2400, 256, 500, 40)}


@dataclass(frozen=True)
class Options:
    """One topic's run: size level (tiny: tests, quick: minutes on 2 cores, full), folders, the experiment."""

    level: str
    out: Path
    work: Path
    config: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Repeats:
    """``warmup`` untimed blocks, then ``repeats`` timed blocks of ``block`` calls each."""

    warmup: int
    repeats: int
    block: int = 1


def cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if cuda() else "cpu")


# ------------------------------------------------------------------------------------------------- timing
def summarize(values: Sequence[float], unit: str, warmup: int, **extra: Any) -> dict[str, Any]:
    """Median and spread (nearest-rank p10/p90: honest for a handful of repeats)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("summarize: no measurements")
    n = len(vals)
    p10, p90 = (vals[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in (0.1, 0.9))
    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    stats = {"median": mid, "min": vals[0], "max": vals[-1], "p10": p10, "p90": p90, "mean": sum(vals) / n}
    return stats | {"repeats": n, "warmup": warmup, "unit": unit, **extra}


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()  # a clock read without it times the kernel launches, not the kernels


def time_rate(fn: Callable[[], Any], items: int, reps: Repeats, unit: str = "images/s") -> dict[str, Any]:
    """Items per second of ``fn``, each timed block between two synchronised clock reads."""
    for _ in range(reps.warmup * reps.block):
        fn()
    rates = []
    for _ in range(reps.repeats):
        sync()
        start = time.perf_counter()
        for _ in range(reps.block):
            fn()
        sync()
        rates.append(items * reps.block / max(time.perf_counter() - start, 1e-12))
    return summarize(rates, unit, reps.warmup, calls_per_block=reps.block, items_per_call=items)


def time_calls(fn: Callable[[], Any], reps: Repeats) -> tuple[dict[str, Any], Any]:
    """Seconds per call of ``fn`` and its last output."""
    for _ in range(reps.warmup):
        fn()
    times, out = [], None
    for _ in range(reps.repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return summarize(times, "s", reps.warmup), out


def ratio(ours: dict | None, baseline: dict | None) -> float | None:
    if not ours or not baseline or "median" not in ours or not baseline.get("median"):
        return None
    return float(ours["median"]) / float(baseline["median"])


def peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda() else None


# ------------------------------------------------------------------------------------ the product, from outside
def retrieval(*argv: Any) -> None:
    """``retrieval ARGV...`` in this process (``retrieval.cli.main``), raising when it fails."""
    args = [str(a) for a in argv]
    if retrieval_main(args) != 0:
        raise RuntimeError(f"`retrieval {' '.join(args)}` failed; see the log above")


def synthetic_shards(work: Path, level: str, px: int | None = None) -> Path:
    """Synthetic SOP shards built by ``retrieval synth-sop`` + ``retrieval shards build``, reused when present."""
    classes, default_px, per_shard, val = SYNTH[level]
    px = px or default_px
    out, sop = Path(work) / f"shards-{level}-{px}px", Path(work) / f"sop-{level}-{px}px"
    if not (out / "stats.json").is_file():
        workers = min(8, os.cpu_count() or 1) if level == "gpu" else 1
        retrieval("synth-sop", sop, "--classes", classes, "--images-per-class", "4-6", "--size", px, "--workers", workers, "--force")  # fmt: skip
        retrieval("shards", "build", "--sop-root", sop, "--out", out, "--workers", workers, "--shard-size", per_shard, "--val-classes", val)  # fmt: skip
    return out


def train_overrides(shards: Path, steps: int, log_every: int) -> list[str]:
    """A run of exactly ``steps`` optimizer steps in one epoch, logged every ``log_every``, no validation."""
    return [
        f"data.shards={shards}",
        f"train.max_steps={steps}",
        f"data.steps_per_epoch={steps}",
        "train.epochs=1",
        f"train.log_every={log_every}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "log.wandb=disabled",
    ]


def launch_train(procs: int, config: Path, run_dir: Path, overrides: Sequence[str], one_thread: bool = False) -> None:
    """``retrieval train`` in a fresh process, or under ``accelerate launch`` with ``procs`` processes (gloo on CPU,
    one process per GPU); ``one_thread``: one torch thread per process (CPU ranks that share the cores)."""
    cmd = [sys.executable, "-m", "retrieval", "train", "--config", str(config), "--run-dir", str(run_dir), *overrides]
    if procs > 1:  # the trainer takes its precision from train.precision: --mixed_precision only silences a warning
        launch = ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", str(procs)]
        launch += ["--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no"]
        cmd[1:2] = [*launch, "--dynamo_backend", "no", "-m"]
    env = child_env() | ({"ACCELERATE_USE_CPU": "1"} if not cuda() else {})
    env |= {"OMP_NUM_THREADS": "1"} if one_thread else {}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"trainer ({procs} process(es)) exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )


def child_env() -> dict[str, str]:
    """This environment for a child process, with this checkout first on its path, offline, no wandb."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def trainer_figures(run_dir: Path, warm: int) -> dict[str, Any]:
    """images/s over the ``"kind": "train"`` records of the run's ``metrics.jsonl``, the first ``warm`` skipped."""
    run = RunFolder(run_dir)
    train = [r for r in run.read_metrics() if r.get("kind") == "train"]
    if not train:
        raise RuntimeError(f"{run.metrics_path}: no train records")
    timed = train[warm:] or train
    per_gpu, wait = (
        summarize([r[key] for r in timed], "", 0)["median"] for key in ("images_per_s_per_gpu", "data_wait")
    )
    return summarize([r["images_per_s"] for r in timed], "images/s", len(train) - len(timed)) | {
        "images_per_s_per_gpu": per_gpu,
        "data_wait": wait,
        "peak_mem_gb": max(r["peak_mem_gb"] for r in timed),
        "source": str(run.metrics_path),
    }


def experiments(opts: Options) -> list[tuple[str, dict]]:
    """(config file, resolved dict) for the chosen config (default configs/tiny.yaml) and, on CUDA, both SwinV2-B
    recipes from scratch; each written resolved into ``opts.work`` so that every command reads the same file."""
    from retrieval.config.io import load_config, save_config, to_dict

    chosen = [] if cuda() and not opts.config else [(Path(opts.config or CONFIGS / "tiny.yaml"), list(opts.overrides))]
    if cuda():
        no_download = ["model.pretrained=false", "model.pretrained_file=null"]
        chosen += [(CONFIGS / name, [*no_download, *opts.overrides]) for name in GPU_RECIPES]
    out = []
    for path, overrides in chosen:
        cfg = load_config(path, overrides)
        resolved = Path(opts.work) / f"bench-{path.stem}.yaml"
        resolved.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, resolved)
        out.append((str(resolved), to_dict(cfg)))
    return out


def raw_timm(cfg: dict) -> torch.nn.Module:
    """The bare timm backbone of a config on the device: same name, kwargs, drop path, memory format, activation
    checkpointing and ``torch.compile``; no head, no normalisation."""
    import timm

    m = cfg["model"]
    kwargs = {"pretrained": False, "num_classes": 0, "drop_path_rate": m.get("drop_path_rate", 0.0), **m["kwargs"]}
    model = timm.create_model(m["name"], **kwargs).to(device())
    model.set_grad_checkpointing(bool(m.get("grad_checkpointing")))
    model = model.to(memory_format=torch.channels_last) if m.get("channels_last") else model
    return torch.compile(model) if m.get("compile") else model


def img_size(cfg: dict) -> int:
    import timm

    size = cfg["data"].get("img_size") or cfg["model"].get("kwargs", {}).get("img_size")
    return int(size) if size else int(timm.get_pretrained_cfg(cfg["model"]["name"]).input_size[-1])


def autocast(cfg: dict):
    """bf16/fp16 autocast where the config's precision gives it on this device (as the trainer resolves it)."""
    precision = cfg["train"].get("precision", "auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if precision == "auto" else precision)
    return torch.autocast("cuda", dtype=dtype, enabled=cuda() and dtype is not None)


def label(cfg: dict) -> str:
    return f"{cfg['model']['name']}@{img_size(cfg)}"


# ----------------------------------------------------------------------------------------------- the envelope
def machine() -> dict[str, Any]:
    cpu = next((x.split(":", 1)[1].strip() for x in _lines("/proc/cpuinfo") if x.startswith("model name")), None)
    mem = next((int(x.split()[1]) / 2**20 for x in _lines("/proc/meminfo") if x.startswith("MemTotal")), None)
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    info |= {"cpu_model": cpu or platform.processor(), "memory_gb": round(mem, 1) if mem else None}
    info |= {"loadavg": [round(x, 2) for x in os.getloadavg()], "gpu": None, "gpu_count": torch.cuda.device_count()}
    if cuda():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    names = ("torch", "torchvision", "timm", "accelerate", "webdataset", "numpy", "pillow", "retrieval")
    for name in (*names, "faiss-cpu", "faiss-gpu-cu12"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["faiss"] = out.pop("faiss-gpu-cu12") or out.pop("faiss-cpu")
    out.pop("faiss-cpu", None)
    return out


def publish(topic: str, opts: Options, config: Any, results: dict, ratios: dict, notes: Sequence[str] = ()) -> dict:
    """Write ``OUT/bench-<topic>.json`` (the envelope every topic shares), print its table, return it."""
    dev = {"type": device().type, "torch_threads": torch.get_num_threads(), "name": machine()["gpu"]}
    payload = {
        "bench": topic,
        "level": opts.level,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "device": dev,
        "config": config,
        "results": results,
        "ratios": {k: v for k, v in ratios.items() if v is not None},
        "notes": list(notes),
    }
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(opts.out) / f"bench-{topic}.json", json.dumps(payload, indent=1, default=str) + "\n")
    print(report(payload), flush=True)
    return payload


def stats_in(results: dict, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for name, value in results.items():
        if isinstance(value, dict) and "median" in value:
            out.append((prefix + name, value))
        elif isinstance(value, dict):
            out += stats_in(value, f"{prefix}{name}/")
    return out


def report(payload: dict) -> str:
    rows = [
        (name, s["median"], s["p10"], s["p90"], s["unit"], f"{s['repeats']}+{s['warmup']}w", s.get("peak_mem_gb"))
        for name, s in stats_in(payload["results"])
    ]
    text = [f"== bench {payload['bench']} ({payload['level']}, {payload['device']['name'] or 'cpu'}) =="]
    text.append(table(("item", "median", "p10", "p90", "unit", "repeats", "peak GB"), rows))
    text += [table(("ratio (ours / baseline)", "value"), list(payload["ratios"].items()))] if payload["ratios"] else []
    return "\n".join(text + [f"note: {n}" for n in payload["notes"]])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    left = [i == 0 or all(isinstance(row[i], str) for row in rows) for i in range(len(headers))]  # names, not numbers
    lines = [
        "  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(r, widths, left, strict=True)) for r in cells
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)
