#!/usr/bin/env bash
# The one-shot GPU check: every GPU figure the project reports, in one run of about 10 minutes.
#
#   pip install -e . --no-deps && bash bench/gpu_check.sh     # on the GPU host, from the repo root
#   WHEELS=/path/to/wheels bash bench/gpu_check.sh             # a host without network: install the data stack from there
#   bash bench/gpu_check.sh --cpu-smoke                        # this script's flow on CPU, tiny sizes, no GPU figures
#   bash bench/gpu_check.sh --only=search,train                # a subset of the checks below
#
# Needs torch, torchvision (matching torch), timm and accelerate. The data stack (faiss-cpu, webdataset,
# pytorch-metric-learning: ordinary wheels) is installed with pip when it is missing, from $WHEELS when set
# (--no-index). CUDA 13 hosts have no Faiss GPU wheel: search is timed with retrieval.knn.torch_search.
#
# Prints versions first and stops at once (exit 3) when a required package is missing or cannot be installed,
# (exit 4) when there is no CUDA device and --cpu-smoke was not given. Writes bench-{search-gpu,train,embed}.json,
# the demo's demo-results.json, demo-metrics.jsonl, demo-search-queries.json and report.html under $OUT when it is
# set (else ./bench-gpu-out). Most important first, each check time-boxed:
#   1. search: 60,502 x 60,502 x 1024 random unit vectors, top 1000 others, torch CUDA every precision vs the floor
#   2. demo: synthetic catalogue (4,000 classes) -> shards -> train configs/demo_gpu.yaml (2 min budget) ->
#      embed -> index -> eval -> `retrieval search --queries` with new photos of the test products -> report
#   3. train: the real `retrieval train` (figures from its metrics.jsonl) vs raw timm fwd+bwd+AdamW, both
#      SwinV2-B recipes from scratch, bf16, on synthetic shards built by the product's commands
#   4. embed: the real `retrieval embed` (its meta.json) vs raw timm inference, both recipes, bf16
#   5. pytest -m gpu
set -euo pipefail

SMOKE=0
ONLY="search,demo,train,embed,pytest"
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --only=*) ONLY="${arg#--only=}" ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --cpu-smoke, --only=search,demo,...)" >&2; exit 2 ;;
  esac
done
[[ "${GPU_CHECK_CPU_SMOKE:-0}" == "1" ]] && SMOKE=1

PY="${PYTHON:-python}"
OUT_DIR="${OUT:-bench-gpu-out}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
START=$(date +%s)
elapsed() { echo "$(( $(date +%s) - START )) s"; }

echo "== versions"
"$PY" - <<'PY'
import importlib, platform, sys
print(f"python      {platform.python_version()} ({sys.executable})")
missing = []
for name in ("torch", "torchvision", "timm", "accelerate", "numpy", "PIL", "retrieval"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<11} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # any import failure counts as missing
        missing.append(f"{name}: {type(e).__name__}: {e}")
for name in ("faiss", "webdataset", "pytorch_metric_learning", "deepspeed"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<11} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{name:<11} absent ({type(e).__name__}){'' if name == 'deepspeed' else ': installed next'}")
if "torch" not in " ".join(missing):
    import torch
    print(f"torch CUDA  {torch.version.cuda}; devices: {torch.cuda.device_count()}"
          + "".join(f"; {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())))
if missing:
    print("MISSING required package(s):\n  " + "\n  ".join(missing)
          + "\n(`retrieval` missing: run `pip install -e . --no-deps` from the repo root first)", file=sys.stderr)
    sys.exit(3)
PY
if ! "$PY" -c "import faiss, webdataset, pytorch_metric_learning" 2>/dev/null; then
  echo "== installing the data stack (faiss-cpu, webdataset, pytorch-metric-learning)${WHEELS:+ from $WHEELS}"
  "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} faiss-cpu webdataset pytorch-metric-learning \
    || { echo "gpu_check.sh: could not install the data stack; carry the wheels in and set WHEELS=DIR" >&2; exit 3; }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

if [[ "$SMOKE" == "1" ]]; then
  echo "== CPU smoke mode: tiny model, tiny search; no GPU figures"
  LEVEL=(--tiny)
  DEMO=(--classes 200 --size 64 data.steps_per_epoch=4 train.epochs=2 data.classes_per_batch=8 data.num_workers=1)
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 4)" \
    || { echo "gpu_check.sh: no CUDA device visible; run with --cpu-smoke to test the flow on CPU" >&2; exit 4; }
  LEVEL=(--quick)
  DEMO=(--classes 4000)
fi

FAILED=()  # a failed or timed-out check is reported at the end; the next check still runs
want() { [[ ",$ONLY," == *",$1,"* ]]; }

BENCH=("$PY" -m bench)  # the top-level bench/ package of this checkout (run from the repo root)
WORK="${TMPDIR:-/tmp}/gpu-check-work"  # synthetic shards built once for train and embed

echo "== 1/5 search: torch exact top-k, every precision, against the matmul+topk floor ($(elapsed))"
SEARCH_LEVEL=(); [[ "$SMOKE" == "1" ]] && SEARCH_LEVEL=(--tiny)
want search && { timeout -k 15 90 "${BENCH[@]}" search-gpu --out "$OUT_DIR" ${SEARCH_LEVEL[@]+"${SEARCH_LEVEL[@]}"} || FAILED+=("search ($?)"); }

echo "== 2/5 demo: the whole product, train to search ($(elapsed))"
if want demo; then
  DEMO_DIR="${TMPDIR:-/tmp}/gpu-check-demo"
  timeout -k 15 300 "$PY" -m retrieval demo --fresh --config configs/demo_gpu.yaml --out "$DEMO_DIR" \
    "${DEMO[@]}" log.wandb=disabled || FAILED+=("demo ($?)")
  for f in results.json run/metrics.jsonl run/search-queries.json run/report.html; do
    [[ -f "$DEMO_DIR/$f" ]] && cp "$DEMO_DIR/$f" "$OUT_DIR/$(basename "$f" | sed 's/^\(results\|metrics\|search\)/demo-\1/')"
  done
fi

echo "== 3/5 train: the real trainer (metrics.jsonl) vs raw timm ($(elapsed))"
want train && { timeout -k 15 300 "${BENCH[@]}" train --out "$OUT_DIR" --work "$WORK" "${LEVEL[@]}" || FAILED+=("train ($?)"); }

echo "== 4/5 embed: retrieval embed (meta.json) vs raw timm inference ($(elapsed))"
want embed && { timeout -k 15 180 "${BENCH[@]}" embed --out "$OUT_DIR" --work "$WORK" "${LEVEL[@]}" || FAILED+=("embed ($?)"); }

echo "== 5/5 pytest -m gpu ($(elapsed))"
if want pytest && "$PY" -c "import pytest" 2>/dev/null; then
  timeout -k 10 40 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_knn.py || FAILED+=("pytest gpu ($?)")
fi

echo "== summary ($(elapsed) in all; JSON in $OUT_DIR)"
"$PY" - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
from bench.common import report
for name in ("search-gpu", "train", "embed"):
    path = Path(sys.argv[1]) / f"bench-{name}.json"
    print(report(json.loads(path.read_text())) if path.is_file() else f"{name}: no JSON")
out = Path(sys.argv[1])
if (out / "demo-results.json").is_file():
    for row in json.loads((out / "demo-results.json").read_text()):
        print(f"demo       {row['training']:<10} test R@1 {100 * row['recall@1']:6.2f}  R@10 {100 * row['recall@10']:6.2f}  "
              f"MAP@R {100 * row['map@r']:6.2f}  ({row['num_queries']} queries)")
if (out / "demo-metrics.jsonl").is_file():
    rows = [json.loads(x) for x in (out / "demo-metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["images_per_s_per_gpu"] for r in rows if r["kind"] == "train")[1:]  # the first holds start-up
    val = [r for r in rows if r["kind"] == "val"]
    if rates:
        print(f"demo       train median {rates[len(rates) // 2]:.0f} images/s per GPU over {len(rates)} log intervals; "
              f"last step {rows[-1].get('step')}; val R@1 by epoch " + " ".join(f"{100 * r['recall@1']:.1f}" for r in val))
if (out / "demo-search-queries.json").is_file():
    s = json.loads((out / "demo-search-queries.json").read_text())["summary"]
    print(f"demo       search: {s['queries']} new photos of test products: top hit of the same product "
          f"{100 * s['top1_same_class']:.2f}%, one of the top 10 {100 * s['topk_any_same_class']:.2f}%")
PY
if (( ${#FAILED[@]} )); then
  echo "gpu_check.sh: FAILED: ${FAILED[*]} (124 = timed out)" >&2
  exit 1
fi
