"""``retrieval bench train``: our training throughput against a raw timm loop of the same model.

Three figures per model, measured in one process, one after the other:

- ``raw_timm``: ``timm.create_model`` (same name, kwargs, precision, channels_last), forward + backward +
  ``torch.optim.AdamW`` on a fixed synthetic batch of the same size: what the hardware gives.
- ``our_step_in_memory``: our model (backbone + head + L2 norm), our criterion (mining over the gathered
  batch), the accelerate-prepared model and AdamW groups, grad clipping and the lr schedule, i.e.
  ``retrieval.trainer.Trainer._step``, on in-memory batches: the model-side overhead, no data loading.
- ``trainer``: the real ``retrieval.trainer.train()`` on synthetic shards (``retrieval synth-sop`` +
  ``retrieval shards build`` in a temp folder): streaming shards, P×K batches, decode + augment in
  loader workers, mining, loss, backward, AdamW, logging; images/s read from the run's
  ``metrics.jsonl`` (one value per log interval, the first intervals skipped as warm-up).

Ratios ``trainer/raw`` and ``step/raw`` are ours over raw (1.0 = no overhead; goal >= 0.9 on CPU with the
tiny model). On CUDA both SwinV2-B recipes (``configs/sop_swinv2_base.yaml``: window16 at 256 px,
``configs/sop_swinv2_fast.yaml``: window12 at 192 px, ``pretrained=false``) run in their configured
precision (bf16). The trainer module imports its data stack, losses and evaluation at the top, so both
of our figures need the full install (webdataset, pytorch-metric-learning, faiss); ``TorchBatchHard`` is the
pure-torch batch-hard criterion kept for a host without pytorch-metric-learning.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from retrieval import dist
from retrieval.bench import common
from retrieval.config import Config
from retrieval.config_io import config_from_dict, load_config, to_dict
from retrieval.errors import UserError

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU_RECIPES = ("sop_swinv2_base.yaml", "sop_swinv2_fast.yaml")
# (trainer steps, steps per timed block = train.log_every, blocks skipped as warm-up)
CPU_SIZES = {"tiny": (8, 2, 1), "quick": (30, 5, 1), "full": (120, 10, 2)}
GPU_SIZES = {"tiny": (6, 2, 1), "quick": (16, 4, 1), "full": (35, 5, 2)}
GOAL_CPU = 0.9


def run_bench(
    quick: bool,
    out_dir: Path,
    *,
    tiny: bool = False,
    config: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    work: Path | None = None,
    trainer: bool = True,
) -> dict[str, Any]:
    """Measure every case, write ``out_dir/bench-train.json`` and return its payload."""
    level = common.level_of(quick, tiny)
    device = common.default_device()
    cuda = device.type == "cuda"
    steps, block, warm = (GPU_SIZES if cuda else CPU_SIZES)[level]
    reps = common.Repeats(warmup=warm, repeats=max(1, steps // block - warm), block=block)
    missing = common.data_stack_missing()
    notes = [f"{reps.repeats} timed blocks of {block} steps after {warm} warm-up block(s), the same for all three"]
    if not trainer:
        notes.append("trainer figure not run (--no-trainer): model-side figures only")
    elif missing:
        notes.append(f"trainer figure skipped: {missing} is not installed (the shard readers/trainer need it)")
    results: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    configs: dict[str, Any] = {}
    with _workdir(work) as wd:
        for cfg, source in cases(config, overrides, cuda):
            label = case_label(cfg)
            configs[label] = {"file": source, "resolved": to_dict(cfg)}
            try:
                res = _measure_case(cfg, device, reps, wd, level, run_trainer=trainer and not missing)
            except torch.cuda.OutOfMemoryError as e:  # report the case, keep the others
                res = {"error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
                notes.append(f"{label}: out of memory; lower data.classes_per_batch")
            finally:
                _free(device)
            results[label] = res
            ratios[f"{label} trainer/raw"] = common.ratio(res.get("trainer"), res.get("raw_timm"))
            ratios[f"{label} step/raw"] = common.ratio(res.get("our_step_in_memory"), res.get("raw_timm"))
    ratios = {k: v for k, v in ratios.items() if v is not None}
    goals = {} if cuda else {k: GOAL_CPU for k in ratios if k.endswith("trainer/raw")}
    payload = common.envelope(
        "train",
        level,
        device,
        configs,
        results,
        ratios,
        notes,
        goals,
        sizes={"steps": steps, "block": block, "warmup_blocks": warm},
    )
    return common.publish(out_dir, payload)


def cases(config: str | None, overrides, cuda: bool) -> list[tuple[Config, str]]:
    """The configured model (default ``configs/tiny.yaml`` on CPU) and, on CUDA, both SwinV2-B recipes."""
    out: list[tuple[Config, str]] = []
    if config or not cuda:
        path = Path(config) if config else CONFIGS / "tiny.yaml"
        out.append((load_config(path, list(overrides)), str(path)))
    if cuda:
        for name in GPU_RECIPES:
            path = CONFIGS / name
            if not path.is_file():
                raise UserError(f"{path}: missing; run from a source checkout (pip install -e .)")
            cfg = load_config(path, ["model.pretrained=false", "model.pretrained_file=null", *overrides])
            if all(case_label(cfg) != case_label(c) for c, _ in out):
                out.append((cfg, str(path)))
    return out


def img_size(cfg: Config) -> int:
    """What the trainer feeds the model: ``data.img_size``, else the model's own input size."""
    if cfg.data.img_size:
        return cfg.data.img_size
    size = cfg.model.kwargs.get("img_size")
    if size:
        return int(size if isinstance(size, int) else size[-1])
    import timm

    pretrained_cfg = timm.get_pretrained_cfg(cfg.model.name)
    if pretrained_cfg is None:
        raise UserError(f"model.name {cfg.model.name!r}: timm knows no input size for it; set data.img_size")
    return int(pretrained_cfg.input_size[-1])


def case_label(cfg: Config) -> str:
    return f"{cfg.model.name}@{img_size(cfg)}"


@contextlib.contextmanager
def _workdir(work: Path | None):
    if work is not None:
        yield Path(work)
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        yield Path(tmp)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    from retrieval.runlog import peak_memory_gb

    return round(peak_memory_gb(device), 3)


def _measure_case(
    cfg: Config, device: torch.device, reps: common.Repeats, work: Path, level: str, run_trainer: bool
) -> dict[str, Any]:
    batch = cfg.data.classes_per_batch * cfg.data.images_per_class
    precision = dist.resolve_precision(cfg.train.precision, device.type == "cuda")
    res: dict[str, Any] = {"batch": batch, "img_size": img_size(cfg), "precision": precision}
    _reset_peak(device)
    res["raw_timm"] = raw_timm_train(cfg, device, precision, reps)
    _free(device)
    _reset_peak(device)
    res["our_step_in_memory"] = our_step_in_memory(cfg, reps, work)
    _free(device)
    if run_trainer:
        _reset_peak(device)
        px = 256 if device.type == "cuda" else None
        shards = common.synthetic_shards(work, "gpu" if device.type == "cuda" else level, px)
        steps = reps.block * (reps.warmup + reps.repeats)
        res["trainer"] = trainer_rate(cfg, shards, work / f"run-{case_label(cfg)}", steps, reps.block, reps.warmup)
    return res


# ---------------------------------------------------------------------------------------------
# Raw timm


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def raw_timm_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The bare timm backbone our model wraps: same name, kwargs, drop path, memory format, checkpointing."""
    import timm

    model = timm.create_model(
        cfg.model.name, pretrained=False, num_classes=0, drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs
    ).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return torch.compile(model) if cfg.model.compile else model


def synthetic_images(cfg: Config, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = img_size(cfg)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.model.channels_last else x


def raw_timm_train(cfg: Config, device: torch.device, precision: str, reps: common.Repeats) -> dict[str, Any]:
    """Forward + backward + AdamW of the bare timm model on one fixed synthetic batch."""
    batch = cfg.data.classes_per_batch * cfg.data.images_per_class
    torch.manual_seed(cfg.train.seed)
    model = raw_timm_model(cfg, device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.backbone_lr or 1e-4, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
    )
    x = synthetic_images(cfg, batch, device)

    def step() -> None:
        with autocast(device, precision):
            feats = model(x)
        feats.float().pow(2).mean().backward()  # a trivial loss: the backbone's backward is what costs
        opt.step()
        opt.zero_grad(set_to_none=True)

    stats = common.time_rate(step, batch, reps, device)
    stats["peak_mem_gb"] = _peak_gb(device)
    stats["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return stats


# ---------------------------------------------------------------------------------------------
# Our step on in-memory batches


def our_step_in_memory(cfg: Config, reps: common.Repeats, work: Path) -> dict[str, Any]:
    """``retrieval.trainer.Trainer._step`` on pre-made P×K batches already on the device."""
    from retrieval.schedule import StopFlag

    stop = StopFlag()  # the Trainer holds one; given back below so this process keeps its own signal handling
    try:
        trainer, loss_impl = _trainer(cfg, work, stop)
        device = trainer.accelerator.device
        P, K = cfg.data.classes_per_batch, cfg.data.images_per_class
        labels = torch.arange(P, device=device).repeat_interleave(K)
        batches = [{"image": synthetic_images(cfg, P * K, device, seed=i), "label": labels + P * i} for i in range(2)]
        feed = itertools.cycle(batches)
        trainer.model.train()

        def one() -> None:
            trainer._step(next(feed))
            trainer.state.global_step += 1

        stats = common.time_rate(one, P * K, reps, device)
        stats.update(peak_mem_gb=_peak_gb(device), step_impl=STEP_IMPL, loss_impl=loss_impl)
        trainer.accelerator.end_training()
    finally:
        stop.restore()
    return stats


STEP_IMPL = "retrieval.trainer.Trainer._step"


def _trainer(cfg: Config, work: Path, stop) -> tuple[Any, str]:
    """What ``retrieval.trainer.Trainer.create`` builds, minus the shards: accelerator, model, AdamW groups,
    schedule, loss."""
    from retrieval.config import derived
    from retrieval.models import InputSpec, build_model, maybe_compile, param_groups
    from retrieval.runs import RunFolder
    from retrieval.trainer import Trainer

    acc = dist.make_accelerator(cfg.train.precision, cfg.optim.grad_accum, str(work))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    spec = InputSpec.of(model, cfg.data)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=cfg.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    model = maybe_compile(model, cfg.model)
    criterion, loss_impl = _criterion(cfg)
    d = derived(cfg, acc.num_processes, train_samples=10**9)  # no shards here: any size that fills an epoch
    parts = (acc, model, criterion.to(acc.device), optimizer, scheduler, spec, d, stop)
    return Trainer(cfg, RunFolder(work), *parts), loss_impl


def _criterion(cfg: Config) -> tuple[torch.nn.Module, str]:
    try:
        from retrieval.losses import build_loss
    except ImportError as e:  # GPU check hosts: no pytorch-metric-learning
        return TorchBatchHard(cfg.loss.margin), f"bench stand-in: pure-torch batch-hard cosine ({e.name} missing)"
    return build_loss(cfg.loss, seed=cfg.train.seed), f"retrieval.losses ({cfg.loss.miner}, {cfg.loss.distance})"


class TorchBatchHard(torch.nn.Module):
    """Batch-hard triplet loss on cosine similarity over the gathered batch, pure torch: the stand-in for
    ``retrieval.losses`` where pytorch-metric-learning is absent (same work: one B×B similarity, two reductions,
    mean over active triplets, the ``* world_size`` factor, one host sync for the stats)."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int | None = None, with_stats: bool = True):
        emb_all = dist.all_gather_cat(emb.float())
        labels_all = dist.all_gather_cat(labels)
        sim = emb_all @ emb_all.T
        same = labels_all[:, None] == labels_all[None, :]
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        hardest_pos = sim.masked_fill(~same | eye, float("inf")).amin(1)
        hardest_neg = sim.masked_fill(same, float("-inf")).amax(1)
        viol = (hardest_neg - hardest_pos + self.margin).clamp_min(0)
        active = viol > 0
        loss = viol.sum() / active.sum().clamp_min(1)
        return loss * dist.world_size(), {"active_fraction": float(active.float().mean()), "num_triplets": len(sim)}


# ---------------------------------------------------------------------------------------------
# The real trainer


def trainer_rate(cfg: Config, shards: Path, run_dir: Path, steps: int, block: int, warm: int) -> dict[str, Any]:
    """Run ``retrieval.trainer.train`` for ``steps`` steps, logging every ``block``; images/s per log interval."""
    from retrieval.trainer import train

    run_cfg = config_from_dict(
        to_dict(cfg),
        [
            f"data.shards={shards}",
            "train.epochs=1",
            f"data.steps_per_epoch={steps}",
            f"train.log_every={block}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.max_steps=null",
            "log.wandb=disabled",
            f"train.name=bench-{cfg.train.name}",
        ],
    )
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train(run_cfg, run_dir)
    finally:  # the trainer's preemption handlers would outlive it and make this process ignore SIGTERM
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return trainer_stats(run_dir / "metrics.jsonl", warm)


def trainer_stats(metrics: Path, warm: int) -> dict[str, Any]:
    """Median/spread of ``images_per_s`` over the train lines of ``metrics.jsonl``, the first ``warm`` skipped."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train_lines = [x for x in lines if x.get("kind") == "train"]
    if not train_lines:
        raise RuntimeError(f"{metrics}: no train lines; the trainer logged nothing")
    measured = train_lines[warm:] or train_lines
    stats = common.summarize([x["images_per_s"] for x in measured], "images/s", warmup=len(train_lines) - len(measured))
    per_gpu = common.summarize([x["images_per_s_per_gpu"] for x in measured], "images/s", warmup=0)
    stats.update(
        images_per_s_per_gpu=per_gpu["median"],
        data_wait=common.summarize([x["data_wait"] for x in measured], "fraction", 0)["median"],
        peak_mem_gb=max(x["peak_mem_gb"] for x in measured),
        source=str(metrics),
    )
    return stats
