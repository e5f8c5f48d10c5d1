"""``bench serve-hostile``: ``retrieval serve`` (a real process, default bounds) under well-formed load, first alone
(the baseline), then with hostile requests arriving at the same time.

Well-formed: 16 client threads, each posting one JPEG (raw body) or two (multipart) after the other, for 10 s alone
and 20 s under attack (quick/full; tiny: 2 s and 4 s). Hostile, each on its own connection while the clients run:

* a chunked 300 MB body (no Content-Length), sent until the server answers (413 expected after 20 MB);
* six 12000 x 12000 1-bit PNGs in one multipart (17.5 kB each, 144 M pixels each when decoded: 413 from the header);
* 1,000 images in one multipart (413: --max-images);
* a client that sends its headers and stalls (408 after --body-timeout: 30 s; tiny: 5 s);
* a JSON body nested 100,000 deep (400);
* a 48-megapixel JPEG photo (well-formed: 200, decoded at reduced scale).

Figures: the well-formed clients' latency and images/s alone and under attack, their 5xx count, each hostile
request's status and seconds, the server's resident memory (``/proc/PID/status`` every 50 ms: at the start of the
attack phase, its peak, and 3 s after the last answer). The acceptance (README "Export and serve"): zero 5xx
for the well-formed, every hostile request 4xx, the peak under the documented bound, memory back within 10 % of
its start.
"""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import common
from bench.serve import tiny_index, wait_until_served
from retrieval.util import free_port

CLIENTS = 16
SECONDS = {"tiny": (2, 4), "quick": (10, 20), "full": (10, 20)}  # (alone, under attack)
FLAGS = {"tiny": ["--body-timeout", "5"]}  # the test's short run waits less for the stalled client's 408
PEAK_BOUND_GB = 0.5  # over the RSS at the start of the attack (README: decoders x pixels + in-flight bodies)


class RssSampler:
    """The server's resident memory every 50 ms, from /proc (what the kernel counts, page cache excluded)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now_gb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.now_gb()))

    def peak_since(self, start: float) -> float:
        return max(gb for t, gb in self.samples if t >= start)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


# ------------------------------------------------------------------------------------------ well-formed load


def clients(url: str, jpegs: list[bytes], seconds: float) -> dict:
    """16 threads posting one JPEG (raw) or two (multipart) in turn until ``seconds`` pass."""
    deadline = time.monotonic() + seconds

    def one_client(c: int) -> tuple[list[float], dict[str, int], int]:
        latencies, statuses, images = [], {}, 0
        with httpx.Client(timeout=120) as http:
            i = c
            while time.monotonic() < deadline:
                i += CLIENTS
                start = time.perf_counter()
                try:
                    if i % 2:
                        r = http.post(f"{url}/search?k=10", content=jpegs[i % len(jpegs)])
                    else:
                        pair = [("image", (f"{j}.jpg", jpegs[(i + j) % len(jpegs)])) for j in range(2)]
                        r = http.post(f"{url}/search?k=10", files=pair)
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
                images += 1 if i % 2 else 2
        return latencies, statuses, images

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = list(pool.map(one_client, range(CLIENTS)))
    elapsed = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for _, s, _ in runs:
        for k, v in s.items():
            statuses[k] = statuses.get(k, 0) + v
    latency = common.summarize([x for lat, _, _ in runs for x in lat], "s", 0)
    return {"latency": latency, "images_per_s": sum(n for *_, n in runs) / elapsed, "statuses": statuses}


# ------------------------------------------------------------------------------------------ hostile requests


def _raw(url: str, head: bytes, body=(), timeout: float = 120) -> tuple[int | str, float, int]:
    """(status, seconds, bytes sent) of a raw HTTP/1.1 request: ``head``, then ``body`` chunks until answered."""
    host, port = url.removeprefix("http://").split(":")
    start, sent = time.perf_counter(), 0
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(head)
            for chunk in body:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += len(chunk)
            status: int | str = int(s.recv(4096).split(b" ", 2)[1])
    except OSError as e:
        status = type(e).__name__
    return status, time.perf_counter() - start, sent


def _head(kind: str, extra: str) -> bytes:
    return f"POST /search HTTP/1.1\r\nHost: bench\r\nContent-Type: {kind}\r\n{extra}\r\n\r\n".encode()


def _bomb_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _photo(width: int, height: int) -> bytes:
    """A smooth colour gradient as a JPEG: many pixels, few bytes (a well-formed large photo)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1))], 2)
    pixels = np.concatenate([pixels, 255 - pixels[..., :1]], 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def hostile(url: str, jpegs: list[bytes], level: str) -> dict:
    """Every hostile request at once, each on its own connection; {name: {status, seconds, ...}}."""
    side, chunk_mb, total_mb = (12000, 1, 300) if level != "tiny" else (4200, 1, 40)
    bomb, chunk = _bomb_png(side), b"%x\r\n%s\r\n" % (2**20 * chunk_mb, b"\0" * 2**20 * chunk_mb)

    def multipart(files) -> tuple[int | str, float]:
        start = time.perf_counter()
        try:
            status: int | str = httpx.post(f"{url}/search", files=files, timeout=120).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        return status, time.perf_counter() - start

    jobs = {
        f"chunked {total_mb} MB body": lambda: _raw(
            url, _head("image/jpeg", "Transfer-Encoding: chunked"), [chunk] * (total_mb // chunk_mb)
        ),
        f"six {side}^2 1-bit PNGs ({len(bomb) / 1e3:.1f} kB each)": lambda: multipart(
            [("image", (f"{i}.png", bomb)) for i in range(6)]
        ),
        "1,000 images in one request": lambda: multipart(
            [("image", (f"{i}.jpg", jpegs[i % len(jpegs)])) for i in range(1000)]
        ),
        "stalled after its headers": lambda: _raw(url, _head("image/jpeg", "Content-Length: 1000")),
        "JSON nested 100,000 deep": lambda: _raw(
            url, _head("application/json", "Content-Length: 100000"), [b"[" * 100_000]
        ),
    }
    if level != "tiny":
        photo = _photo(8000, 6000)
        jobs[f"48 MP JPEG photo ({len(photo) / 1e6:.1f} MB, well-formed)"] = lambda: multipart(
            [("image", ("photo.jpg", photo))]
        )
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        out = {}
        for name, future in futures.items():
            status, seconds, *sent = future.result()
            out[name] = {"status": status, "seconds": round(seconds, 2)}
            if sent:
                out[name]["mb_sent"] = round(sent[0] / 2**20, 1)
    return out


# ------------------------------------------------------------------------------------------------ the run


def _server(index: Path, log: Path, level: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "retrieval",
        "serve",
        "--index",
        str(index),
        "--port",
        str(port),
        *FLAGS.get(level, []),
    ]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_served(f"{url}/healthz", proc)
    return proc, url


def measure(index: Path, jpegs: list[bytes], level: str, log: Path) -> dict:
    """The two phases against one server; the server's memory sampled throughout."""
    alone_s, attack_s = SECONDS[level]
    proc, url = _server(index, log, level)
    try:
        with RssSampler(proc.pid) as rss:
            clients(url, jpegs, 1)  # warm-up: first forward passes, allocator pools
            alone = clients(url, jpegs, alone_s)
            start_gb, started = rss.now_gb(), time.monotonic()
            with ThreadPoolExecutor(1) as pool:
                attack = pool.submit(hostile, url, jpegs, level)
                under = clients(url, jpegs, attack_s)
                attacks = attack.result()
            time.sleep(3)
            memory = {"start_gb": start_gb, "peak_gb": rss.peak_since(started), "after_gb": rss.now_gb()}
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"alone": alone, "under attack": under, "hostile": attacks, "memory": memory, "server_alive": alive}


def acceptance(m: dict) -> dict[str, bool]:
    well_formed = {**m["alone"]["statuses"], **m["under attack"]["statuses"]}
    hostile_ok = all(
        h["status"] == 200 if "well-formed" in name else isinstance(h["status"], int) and 400 <= h["status"] < 500
        for name, h in m["hostile"].items()
    )
    mem = m["memory"]
    return {
        "zero 5xx (or failed connections) for the well-formed clients": set(well_formed) <= {"200"},
        "every hostile request 4xx (the large photo 200)": hostile_ok,
        f"peak RSS under the start + {PEAK_BOUND_GB} GB bound": mem["peak_gb"] - mem["start_gb"] < PEAK_BOUND_GB,
        "RSS back within 10 % of its start": mem["after_gb"] <= 1.1 * mem["start_gb"],
        "server alive": m["server_alive"],
    }


def run(opts: common.Options) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    work = Path(opts.work) / f"serve-hostile-{opts.level}-{time.time_ns()}"
    work.mkdir(parents=True)
    index, paths = tiny_index(work)
    jpegs = [p.read_bytes() for p in paths]
    m = measure(index, jpegs, opts.level, work / "serve.log")
    checks = acceptance(m)
    results = {f"well-formed {phase}": {"latency": m[phase]["latency"]} for phase in ("alone", "under attack")}
    rates = {phase: round(m[phase]["images_per_s"], 1) for phase in ("alone", "under attack")}
    config = {
        "clients": CLIENTS,
        "seconds (alone, under attack)": SECONDS[opts.level],
        "server": "retrieval serve, default bounds (README)",
        "index": "configs/tiny.yaml at random weights, 200 images 96 px",
        "images_per_s": rates,
        "statuses": {phase: m[phase]["statuses"] for phase in ("alone", "under attack")},
        "hostile": m["hostile"],
        "memory_gb": {k: round(v, 3) for k, v in m["memory"].items()},
        "acceptance": checks,
    }
    ratios = {"images/s under attack / alone": rates["under attack"] / rates["alone"] if rates["alone"] else None}
    notes = [f"{'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
    notes += [f"hostile: {name}: {json.dumps(h)}" for name, h in m["hostile"].items()]
    notes += [f"memory (GB): {json.dumps(config['memory_gb'])}; statuses: {json.dumps(config['statuses'])}"]
    return common.publish("serve-hostile", opts, config, results, ratios, notes)
