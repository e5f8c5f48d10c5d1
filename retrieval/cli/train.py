"""``retrieval train``: fine-tune a timm backbone for retrieval with a metric-learning loss over the global batch.

The same code path runs on one CPU, one GPU, eight GPUs or many nodes; the launcher decides::

    # one process (CPU or one GPU)
    retrieval train --config configs/tiny.yaml --shards shards/out --run-dir runs/tiny
    # 1 node x 8 GPUs, DDP
    accelerate launch --config_file launch/ddp_1node.yaml --num_processes 8 -m retrieval train --config configs/sop_swinv2_base.yaml
    # DeepSpeed ZeRO-2
    accelerate launch --config_file launch/zero2.yaml --num_processes 8 -m retrieval train --config configs/sop_swinv2_base.yaml
    # 2 nodes x 8 GPUs (run on each node with its --machine_rank)
    accelerate launch --config_file launch/ddp_multinode.yaml --num_machines 2 --num_processes 16 --machine_rank R \
        --main_process_ip HOST0 --main_process_port 29500 -m retrieval train --config configs/sop_swinv2_base.yaml
    # Slurm (multi-node, preemptible, requeues itself)
    sbatch --nodes 2 slurm/train.sbatch configs/sop_swinv2_base.yaml --shards /data/sop-shards
    # 2 CPU processes (gloo), as the tests do
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m retrieval train --config configs/tiny.yaml

On SIGUSR1/SIGTERM the trainer runs on to its next log step (``train.log_every``), checkpoints, writes
``<run>/preempted`` and this command exits with code 3 (``--resume auto`` continues from there, at the same position
in the data stream).
One trainer per run folder: rank 0 holds an exclusive lock on it (a second trainer is refused; the OS drops the
lock when the trainer dies), and workers exit when their launcher dies. A resume must use the run's config: only
budgets, logging, checkpoint cadence and execution settings may change (:data:`retrieval.train.resume.MAY_CHANGE`); a
changed model, data, loss or optimizer setting is refused listing the keys (the optimizer and lr schedule come back
from the checkpoint, so a new ``optim.lr`` would otherwise be silently ignored). Each attempt's resolved config is
kept in ``<run>/configs/attempt-N.yaml``. A non-finite loss, gradient norm or weight stops every rank with an error
naming the step; nothing non-finite is ever checkpointed or exported.
The loop itself is :mod:`retrieval.train.trainer`; the run folder's layout is :class:`retrieval.run_folder.RunFolder`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.config.io import config_yaml, load_config
from retrieval.train.trainer import train

PREEMPTED_EXIT = 3  # checkpointed and marked preempted: resume it (slurm/train.sbatch requeues)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "--shards", help="shard folder, URL prefix/ or webdataset URLs (brace, ::, http(s), pipe:); = data.shards"
    )
    p.add_argument("--run-dir", help="output folder (default runs/<train.name>)")
    p.add_argument("--resume", help="auto (latest if present) | latest | path to a checkpoints/step_N folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides anywhere on the line, e.g. train.epochs=3 optim.lr=1e-4"
    )


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.shards={args.shards}"] if args.shards else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    run_dir = Path(args.run_dir or f"runs/{cfg.train.name}")
    result = train(cfg, run_dir, resume=args.resume)
    return PREEMPTED_EXIT if result.get("preempted") else 0
