"""Shared benchmark plumbing: timed repeats after warm-up, spread statistics, machine/version facts,
the JSON envelope every ``bench-<what>.json`` shares, plain-text tables and PNG curves.

Every measured item is a dict ``{"median", "min", "max", "p10", "p90", "mean", "repeats", "warmup", "unit"}``
(plus item-specific fields), so a reader can judge the spread and not only one number. A ratio is
``ours / reference`` measured in the same process (or the same run) on the same machine: ratios travel
between machines far better than absolute images/s.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
LEVELS = ("tiny", "quick", "full")  # tiny: tests; quick: `--quick`, minutes on 2 CPU cores; full: real sizes


@dataclass(frozen=True)
class Repeats:
    """How often to measure: ``warmup`` untimed blocks, then ``repeats`` timed blocks of ``block`` calls."""

    warmup: int
    repeats: int
    block: int = 1


def level_of(quick: bool, tiny: bool = False) -> str:
    return "tiny" if tiny else ("quick" if quick else "full")


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: Any = None) -> None:
    """Wait for queued CUDA work: a timer read without it measures the launch, not the kernels."""
    import torch

    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def summarize(values: Sequence[float], unit: str, warmup: int, **extra: Any) -> dict[str, Any]:
    """Median and spread of repeated measurements (nearest-rank p10/p90: honest for a handful of repeats)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("summarize: no measurements")
    n = len(vals)

    def pct(q: float) -> float:
        return vals[min(n - 1, max(0, math.ceil(q * n) - 1))]

    mid = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return {
        "median": mid,
        "min": vals[0],
        "max": vals[-1],
        "p10": pct(0.1),
        "p90": pct(0.9),
        "mean": sum(vals) / n,
        "repeats": n,
        "warmup": warmup,
        "unit": unit,
        **extra,
    }


def time_calls(
    fn: Callable[[], Any], repeats: int, device: Any = None, warmup: int = 0, peak_memory: bool = False
) -> tuple[dict[str, Any], Any]:
    """Seconds per call of ``fn`` (each call between two synchronised clock reads) and its last output;
    with ``peak_memory`` on CUDA, the peak allocated GB over the timed calls as ``peak_mem_gb``."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda")
    if peak_memory and cuda:
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    extra = {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None} if peak_memory else {}
    return summarize(times, "s", warmup, **extra), out


def time_rate(
    fn: Callable[[], Any], items_per_call: int, reps: Repeats, device: Any = None, unit: str = "images/s", **extra: Any
) -> dict[str, Any]:
    """Items per second of ``fn``: ``reps.warmup`` untimed blocks, then ``reps.repeats`` timed blocks.

    A block is ``reps.block`` calls between two synchronised clock reads, so the per-call launch
    overhead and asynchronous CUDA work are both inside the timed region.
    """
    for _ in range(reps.warmup * reps.block):
        fn()
    synchronize(device)
    rates = []
    for _ in range(reps.repeats):
        start = time.perf_counter()
        for _ in range(reps.block):
            fn()
        synchronize(device)
        rates.append(items_per_call * reps.block / max(time.perf_counter() - start, 1e-12))
    return summarize(rates, unit, reps.warmup, calls_per_block=reps.block, items_per_call=items_per_call, **extra)


def ratio(ours: dict[str, Any] | float | None, reference: dict[str, Any] | float | None) -> float | None:
    """``ours / reference`` on medians; None when either side was not measured."""
    a = ours.get("median") if isinstance(ours, dict) else ours
    b = reference.get("median") if isinstance(reference, dict) else reference
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


# ---------------------------------------------------------------------------------------------
# Where the numbers came from


def machine_info() -> dict[str, Any]:
    """Host facts that change throughput: CPU model and count, memory, GPU."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "gpu": None,
        "gpu_count": 0,
        "gpu_memory_gb": None,
        "loadavg": load_average(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1)
            )
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # the GPU check runs with torch + timm + accelerate only
        try:
            return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (ValueError, OSError):
            return None


_DISTRIBUTIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "accelerate": ("accelerate",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "webdataset": ("webdataset",),
    "numpy": ("numpy",),
    "pillow": ("pillow", "Pillow"),
    "retrieval": ("retrieval",),
}


def versions() -> dict[str, str | None]:
    """Installed versions from package metadata (None = not installed); torch also reports its CUDA."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in _DISTRIBUTIONS.items():
        out[name] = None
        for dist_name in dists:
            try:
                out[name] = metadata.version(dist_name)
                if dist_name.startswith("faiss-"):
                    out[name] += f" ({dist_name})"
                break
            except metadata.PackageNotFoundError:
                continue
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        out["torch_cuda"] = None
    return out


def device_info(device: Any) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
    return info


def default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Inputs


# synth-sop classes (half train, half test), longer image side, images per shard, val classes. Tiny keeps >= 8
# train classes (P of configs/tiny.yaml) on each of 2 ranks, which the 2-process scaling run needs.
# "gpu" feeds the SwinV2-B recipes' trainer: P = 32..48 classes per batch from each of 8 loader workers needs
# >= 48 classes in every worker's shards: 12 shards of ~100 classes (the quick set failed there: 42 train classes).
SYNTH = {"tiny": (56, 72, 60, 4), "quick": (96, 80, 80, 6), "full": (400, 96, 256, 20), "gpu": (2400, 256, 500, 40)}


def synthetic_shards(work: Path, level: str, px: int | None = None) -> Path:
    """Synthetic SOP shards made by the real commands (``retrieval synth-sop`` + ``retrieval shards build``);
    reused when ``work`` already holds them (``bench all`` shares one folder between topics)."""
    from retrieval.cli import main

    classes, default_px, shard_size, val = SYNTH[level]
    px = px or default_px
    out = Path(work) / f"shards-{level}-{px}px"
    if (out / "stats.json").is_file():
        return out
    sop = Path(work) / f"sop-{level}-{px}px"
    # One worker for the CPU sets (seconds). The GPU set (12,000 images at 256 px) is rendered by a pool: synth-sop
    # and the shard builder start theirs with "spawn", which a running torch cannot deadlock.
    workers = str(min(8, os.cpu_count() or 1)) if level == "gpu" else "1"
    steps = [
        [
            "synth-sop",
            str(sop),
            "--classes",
            str(classes),
            "--images-per-class",
            "4-6",
            "--seed",
            "0",
            "--size",
            str(px),
            "--workers",
            workers,
            "--force",
        ],
        [
            "shards",
            "build",
            "--sop-root",
            str(sop),
            "--out",
            str(out),
            "--workers",
            workers,
            "--shard-size",
            str(shard_size),
            "--val-classes",
            str(val),
            "--seed",
            "0",
        ],
    ]
    for argv in steps:
        if main(argv) != 0:
            raise RuntimeError(f"`retrieval {' '.join(argv)}` failed; see the log above")
    return out


def data_stack_missing() -> str | None:
    """Name of the first missing package the shard readers need (GPU check hosts have torch+timm+accelerate
    only), else None."""
    import importlib.util

    for name in ("webdataset", "torchvision", "pytorch_metric_learning", "faiss"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def load_average() -> list[float] | None:
    """1/5/15-minute load: on a shared 2-core machine other people's jobs are part of the measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Output


def envelope(
    what: str,
    level: str,
    device: Any,
    config: dict[str, Any],
    results: dict[str, Any],
    ratios: dict[str, float | None],
    notes: Iterable[str] = (),
    goals: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The shape every ``bench-<what>.json`` shares (extra keys are topic-specific)."""
    return {
        "bench": what,
        "schema": SCHEMA,
        "level": level,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "device": device_info(device),
        "config": config,
        "results": results,
        "ratios": ratios,
        "goals": goals or {},
        "notes": list(notes),
        **extra,
    }


def _plain(x: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, paths to strings, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _plain(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(out_dir: Path, what: str, payload: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{what}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_plain(payload), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def plot_curves(
    path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[Sequence[float], Sequence[float]]]
) -> Path | None:
    """One PNG with a line per series; None (and no file) where matplotlib is absent (GPU hosts)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    xs_all = sorted({float(x) for xs, _ in series.values() for x in xs})
    if xs_all and all(x.is_integer() for x in xs_all) and len(xs_all) <= 12:
        ax.set_xticks(xs_all)  # process or worker counts: integer ticks only
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_stat(x: Any) -> bool:
    return isinstance(x, dict) and "median" in x


def publish(out_dir: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Every topic ends here: ``bench-<what>.json`` written once, its table printed once."""
    write_json(out_dir, payload["bench"], payload)
    print(format_report(payload), flush=True)
    return payload


def format_report(payload: dict[str, Any]) -> str:
    """The printed form of a ``bench-<what>.json``: measured items with their spread, then the ratios."""
    rows = [
        (
            name,
            s["median"],
            s.get("p10", s.get("min")),
            s.get("p90", s.get("max")),
            s.get("unit", ""),
            f"{s.get('repeats', '?')}+{s.get('warmup', '?')}w",
            s.get("peak_mem_gb"),
        )
        for name, s in _flat_stats(payload.get("results", {}))
    ]
    dev = payload.get("device", {})
    head = f"== bench {payload.get('bench')} ({payload.get('level')}, {dev.get('name') or dev.get('type')}) =="
    parts = [head]
    if rows:
        parts.append(format_table(("item", "median", "p10", "p90", "unit", "repeats", "peak GB"), rows))
    ratios = payload.get("ratios") or {}
    goals = payload.get("goals") or {}
    if ratios:
        parts.append(format_table(("ratio", "value", "goal"), [(k, v, goals.get(k)) for k, v in ratios.items()]))
    parts += [f"note: {n}" for n in payload.get("notes", [])]
    return "\n".join(parts)


def _flat_stats(results: dict[str, Any], prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for name, value in results.items():
        if is_stat(value):
            out.append((prefix + name, value))
        elif isinstance(value, dict):
            out += _flat_stats(value, f"{prefix}{name}/")
    return out
