"""Typed experiment configuration: dataclasses are the schema, YAML holds experiments.

The dataclasses below are the schema and validate themselves (``__post_init__``, errors name the field);
:mod:`retrieval.config.io` loads them from YAML with dotted overrides and saves the resolved config.
Derived values (per-rank batch, steps per epoch) are computed in exactly one place: :func:`derived`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrieval.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the dotted field."""


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass
class DataConfig:
    shards: str = "shards/out"  # folder, URL prefix/, or webdataset URLs (brace, ::, http(s), pipe:); README
    train_split: str = "train"  # shard split names (the builder writes train, val, test)
    val_split: str = "val"  # validated every train.eval_every epochs; selects the best checkpoint
    test_split: str = "test"  # the official SOP test file; never used for selection
    classes_per_batch: int = 32  # P: classes in one per-rank batch
    images_per_class: int = 4  # K: images of each class in a batch
    small_class: str = "repeat"  # classes with < K images: "repeat" (sample with replacement) or "drop"
    class_pool: int = 256  # classes buffered per loader worker to draw P from; >= its classes: all kept, read once
    steps_per_epoch: int | None = None  # per-rank batches per epoch; None = train samples // global batch
    num_workers: int = 4  # DataLoader workers per rank (shards are split across them)
    eval_batch_size: int = 128  # images per batch when embedding val/test
    val_cache_mb: int = 512  # per rank: keep the val split's prepared images between validations when they fit
    # (validations then run the model only); 0 = decode them at every validation
    shard_cache_mb: int = 256  # per loader worker: keep its shards' samples (undecoded) after their first read in
    # an epoch, so a pool smaller than its classes re-reads them from memory; 0 = read the tars again every pass
    img_size: int | None = None  # None = the model's pretrained input size
    scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5  # horizontal flip probability (train)
    color_jitter: float = 0.0  # 0 disables; else brightness/contrast/saturation strength
    rand_augment: str | None = None  # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1; None = off
    random_erasing: float = 0.0  # timm RandomErasing probability (train); 0 = off
    random_erasing_mode: str = "pixel"  # erased area filled with: pixel (per-pixel noise) | rand | const
    interpolation: str = "bicubic"  # resize filter: bicubic | bilinear
    seed: int = 0  # data order is a pure function of (seed, epoch, rank, worker)
    allow_incomplete: bool = False  # train/validate although shards are missing or differ from stats.json (warns)
    max_skipped_fraction: float = 0.01  # stop when more of the samples read than this were undecodable/incomplete
    label_key: str | None = None  # cls | txt | json:FIELD (e.g. json:product_id); None = the index's, else cls
    # let the shard URLs a stats.json lists run programs: `pipe:` shell commands, gs:// s3:// hf:// ... (they run
    # as you); only for an index you wrote yourself. Off: such URLs read from data files are refused (README)
    allow_listed_commands: bool = False
    hard_negatives: str | None = None  # class pairs users judged "not the same" (`retrieval feedback export`): a
    # P x K batch holding one holds the other when the worker's class pool has it (retrieval.data.negatives)

    def __post_init__(self) -> None:
        if self.label_key is not None and not (
            self.label_key in ("cls", "txt") or (self.label_key.startswith("json:") and len(self.label_key) > 5)
        ):
            raise ConfigError(f"data.label_key: expected cls, txt or json:FIELD, got {self.label_key!r}")
        _positive("data.classes_per_batch", self.classes_per_batch)
        _positive("data.images_per_class", self.images_per_class)
        _positive("data.class_pool", self.class_pool)
        _positive("data.shard_cache_mb", self.shard_cache_mb, allow_zero=True)
        _positive("data.steps_per_epoch", self.steps_per_epoch)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.val_cache_mb", self.val_cache_mb, allow_zero=True)
        _positive("data.img_size", self.img_size)
        _choice("data.small_class", self.small_class, ("repeat", "drop"))
        _choice("data.interpolation", self.interpolation, ("bilinear", "bicubic"))
        if self.images_per_class < 2:
            raise ConfigError(
                f"data.images_per_class: expected >= 2 (a triplet needs a positive), got {self.images_per_class}"
            )
        if self.class_pool < self.classes_per_batch:
            raise ConfigError(
                f"data.class_pool: expected >= data.classes_per_batch ({self.classes_per_batch}), got {self.class_pool}"
            )
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"data.scale: expected 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(
                f"data.max_skipped_fraction: expected a fraction in [0, 1], got {self.max_skipped_fraction}"
            )
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"data.hflip: expected a probability in [0, 1], got {self.hflip}")
        if not 0 <= self.random_erasing <= 1:
            raise ConfigError(f"data.random_erasing: expected a probability in [0, 1], got {self.random_erasing}")
        _choice("data.random_erasing_mode", self.random_erasing_mode, ("pixel", "rand", "const"))
        _check_rand_augment(self.rand_augment)


def _check_rand_augment(value: str | None) -> None:
    """timm parses the string itself (an unknown section raises); imported only when the option is set."""
    if value is None:
        return
    if not isinstance(value, str) or not (value == "rand" or value.startswith("rand-")):
        raise ConfigError(f"data.rand_augment: expected a timm RandAugment string like rand-m9-mstd0.5, got {value!r}")
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(value, {})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"data.rand_augment: timm cannot parse {value!r} ({type(e).__name__}: {e})") from None


@dataclass
class ModelConfig:
    name: str = "swinv2_base_window16_256"  # any timm model name
    pretrained: bool = False  # timm/HF hub weights (online or from the local HF cache)
    pretrained_file: str | None = None  # local .safetensors/.pth: offline pretrained weights
    embed_dim: int | None = None  # linear projection size; None = raw pooled features (the seed)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (tiny test models)
    normalize: bool = True  # L2-normalise embeddings (False only for the seed recipe: margin 1 on raw features)
    drop_path_rate: float = 0.0  # stochastic depth (timm)
    grad_checkpointing: bool = False  # trade compute for activation memory (timm set_grad_checkpointing)
    channels_last: bool = False  # NHWC memory format (faster convs/patch embed on GPU)
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # a trained run folder or export folder: a NEW run starts from its weights (backbone,
    # head; proxy_anchor's proxies for the labels both have), with a fresh optimizer and schedule; not a resume
    init_sha256: str | None = None  # the init_from weights' sha256: recorded at the start; if set, they must match

    def __post_init__(self) -> None:
        _positive("model.embed_dim", self.embed_dim)
        if self.init_sha256 is not None and not self.init_from:
            raise ConfigError("model.init_sha256: names the weights of model.init_from, which is not set")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"model.drop_path_rate: expected a value in [0, 1), got {self.drop_path_rate}")


LOSS_NAMES = ("triplet", "multi_similarity", "proxy_anchor", "contrastive", "supcon")
XBM_LOSSES = ("triplet", "multi_similarity", "contrastive", "supcon")  # pair/triplet losses: a memory adds pairs


@dataclass
class LossConfig:
    name: str = "triplet"  # triplet | multi_similarity | proxy_anchor | contrastive | supcon (retrieval.losses)
    miner: str = "batch_hard"  # triplet only: batch_hard | semi_hard | all | seed
    distance: str = "cosine"  # cosine | squared_l2 (both on L2-normalised embeddings); triplet and contrastive
    margin: float = 0.1  # triplet margin (in the chosen distance)
    ms_alpha: float = 2.0  # multi_similarity: positive-pair scale (pml's default)
    ms_beta: float = 50.0  # multi_similarity: negative-pair scale
    ms_base: float = 0.5  # multi_similarity: similarity offset
    pa_margin: float = 0.1  # proxy_anchor: margin delta (pml's default)
    pa_alpha: float = 32.0  # proxy_anchor: scale alpha
    num_classes: int | None = None  # proxy_anchor: proxies, one per label in [0, num_classes) (SOP: 11319)
    proxy_lr_mult: float = 100.0  # proxy_anchor: the proxies' lr is optim.lr times this (the paper's 100x)
    pos_margin: float = 1.0  # contrastive: positives are pulled up to it (cosine; squared_l2: 0)
    neg_margin: float = 0.5  # contrastive: negatives are pushed past it (cosine; squared_l2: 1, pml's default)
    temperature: float = 0.1  # supcon: softmax temperature (pml's default)
    xbm_size: int = 0  # cross-batch memory, in embeddings (0 = off); >= one gathered batch (ranks x P x K)
    xbm_start_step: int = 0  # optimizer steps of the plain loss before the memory fills and is used
    xbm_weight: float = 1.0  # loss = in-batch loss + xbm_weight x loss against the memory (XBM paper)

    def __post_init__(self) -> None:
        _choice("loss.name", self.name, LOSS_NAMES)
        _choice("loss.miner", self.miner, ("batch_hard", "semi_hard", "all", "seed"))
        _choice("loss.distance", self.distance, ("cosine", "squared_l2"))
        for key in ("margin", "ms_alpha", "ms_beta", "pa_margin", "pa_alpha", "proxy_lr_mult", "temperature"):
            _positive(f"loss.{key}", getattr(self, key), allow_zero=key in ("margin", "pa_margin"))
        for key in ("xbm_size", "xbm_start_step", "xbm_weight"):
            _positive(f"loss.{key}", getattr(self, key), allow_zero=True)
        _positive("loss.num_classes", self.num_classes)
        if self.name in ("multi_similarity", "proxy_anchor", "supcon") and self.distance != "cosine":
            raise ConfigError(f"loss.distance: loss.name={self.name} uses cosine similarity, got {self.distance!r}")
        if self.name == "proxy_anchor" and self.num_classes is None:
            raise ConfigError("loss.num_classes: loss.name=proxy_anchor needs it (one proxy per label, > the largest)")
        if self.name == "contrastive" and (self.pos_margin > self.neg_margin) != (self.distance == "cosine"):
            want = "above" if self.distance == "cosine" else "below"
            raise ConfigError(
                f"loss.pos_margin: must lie {want} loss.neg_margin for distance {self.distance} "
                f"(got {self.pos_margin} and {self.neg_margin})"
            )
        if self.xbm_size and self.name not in XBM_LOSSES:
            raise ConfigError(f"loss.xbm_size: the memory works with {list(XBM_LOSSES)}, not {self.name}")
        if self.xbm_size and self.name == "triplet" and self.miner != "batch_hard":
            # pml enumerates a batch x memory x memory tensor for the other miners: 68 GB at 1024 x 8192
            raise ConfigError(
                f"loss.xbm_size: with the triplet loss the memory needs loss.miner=batch_hard, got {self.miner}"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-3  # head (projection) learning rate; the backbone uses backbone_lr
    backbone_lr: float = 1e-4  # learning rate of the pretrained backbone
    weight_decay: float = 0.05  # not applied to norms, biases, position tables
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # linear warmup in optimizer steps, then cosine
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of the peak lr
    grad_clip: float | None = 1.0  # max global gradient norm; null disables
    grad_accum: int = 1  # micro-batches per optimizer step
    layer_decay: float | None = None  # layer-wise lr decay of the backbone (e.g. 0.75): its last layer at
    # backbone_lr, each earlier one x layer_decay (timm's group_matcher); null or 1 = off
    implementation: str = "auto"  # AdamW's kernels (torch): auto = fused (one kernel over all tensors; CUDA and
    # CPU) | foreach | for_loop (torch's CPU default: a Python loop over the tensors; foreach: its numbers bitwise)

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.backbone_lr", self.backbone_lr, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip)
        _positive("optim.grad_accum", self.grad_accum)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        _choice("optim.implementation", self.implementation, ("auto", "fused", "foreach", "for_loop"))
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay: expected a value in (0, 1], got {self.layer_decay}")


@dataclass
class TrainConfig:
    name: str = "run"  # run folder is runs/<name> unless --run-dir is given
    epochs: int = 10  # each epoch is data.steps_per_epoch P x K batches per rank
    seed: int = 0  # model init and the seed miner
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; or no | bf16 | fp16
    log_every: int = 10  # optimizer steps between log lines; also where a stop (signal, max_minutes) is agreed
    eval_every: int = 1  # epochs between validations (0 = never)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0 = end of epoch only)
    keep_checkpoints: int = 2  # newest step_N folders kept (best is always kept)
    select_metric: str = "recall@1"  # metric in metrics.json that picks `best`; last = the last validated weights
    early_stop_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in all; the lr
    # schedule still spans train.epochs, so a capped run continues exactly when resumed with a higher cap
    max_minutes: float | None = None  # wall-time budget of this invocation: past it, stop as train.max_steps
    # does (checkpoint, export, exit 0), at a step boundary all ranks agree on; resume continues the schedule
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume tests on CPU)
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.9998): validated, selected and exported
    # instead of the raw weights; null = off
    ema_warmup: bool = False  # timm's EMA warmup: decay min(ema_decay, 1 - (1 + step)^-2/3) early on

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.log_every", self.log_every)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _positive("train.early_stop_patience", self.early_stop_patience, allow_zero=True)
        _positive("train.max_steps", self.max_steps)
        _positive("train.max_minutes", self.max_minutes)
        _choice("train.precision", self.precision, ("auto", "no", "bf16", "fp16"))
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: expected a value in (0, 1), got {self.ema_decay}")


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (1, 10, 100, 1000)  # Recall@K cut-offs (SOP protocol)
    backend: str = "auto"  # auto | faiss | torch
    chunk: int = 4096  # queries per chunk: memory is O(chunk x N), never N x N
    dtype: str = "fp32"  # torch backend ranking precision: fp32 | tf32 | bf16 | bf16x3 (CUDA, ~1e-5 of fp32)

    def __post_init__(self) -> None:
        _choice("eval.backend", self.backend, ("auto", "faiss", "torch"))
        _choice("eval.dtype", self.dtype, ("fp32", "tf32", "bf16", "bf16x3"))
        _positive("eval.chunk", self.chunk)
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks: expected positive integers, got {list(self.ks)}")


TRACKERS = ("wandb", "tensorboard", "mlflow")


@dataclass
class LogConfig:
    trackers: tuple[str, ...] | None = None  # wandb | tensorboard | mlflow (accelerate's log_with), one or several;
    # null = wandb unless log.wandb=disabled (the setting before log.trackers, kept for one release)
    wandb: str = "offline"  # wandb's mode when WANDB_MODE is unset: online | offline | disabled (offline: run folder)
    project: str | None = None  # project / experiment; null = WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME, else retrieval
    entity: str | None = None  # wandb entity (team); None = WANDB_ENTITY or your default

    def __post_init__(self) -> None:
        _choice("log.wandb", self.wandb, ("online", "offline", "disabled"))
        for name in self.trackers or ():
            _choice("log.trackers", name, TRACKERS)
        if self.trackers is not None and len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"log.trackers: each tracker once, got {list(self.trackers)}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        known = [*metric_names(self.eval.ks), "last"]
        if self.train.select_metric not in known:
            raise ConfigError(f"train.select_metric: expected one of {known}, got {self.train.select_metric!r}")
        if self.train.select_metric == "last" and self.train.early_stop_patience:
            raise ConfigError("train.early_stop_patience: needs a metric to improve; train.select_metric=last has none")
        if self.data.classes_per_batch < 2 and self.loss.name != "proxy_anchor":
            raise ConfigError(
                f"data.classes_per_batch: expected >= 2 for loss.name={self.loss.name} (a batch of one class has no "
                "negative: the loss is 0 every step), got 1; proxy_anchor, whose proxies are the negatives, allows 1"
            )


def metric_names(ks: tuple[int, ...] | list[int]) -> list[str]:
    """Every metric the retrieval protocol reports for cut-offs ``ks``, in display order: the one list of them."""
    return [f"recall@{k}" for k in ks] + ["map@r", "r_precision", "seed_map", f"map@{max(ks)}"]


def metric_label(name: str) -> str:
    """How a metric is titled in tables and plots: ``recall@10`` -> ``Recall@10``, ``map@r`` -> ``MAP@R``."""
    fixed = {"map@r": "MAP@R", "r_precision": "R-Precision", "seed_map": "seed-MAP"}
    if name in fixed:
        return fixed[name]
    head, _, k = name.partition("@")
    return f"{'Recall' if head == 'recall' else head.upper()}@{k}"


# ---------------------------------------------------------------------------------------------
# Derived values: computed here and nowhere else.


@dataclass(frozen=True)
class Derived:
    per_rank_batch: int  # images per rank per micro-batch (P x K)
    global_batch: int  # images per optimizer step across ranks and accumulation
    steps_per_epoch: int  # per-rank micro-batches per epoch
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int  # length of the lr schedule (train.epochs)
    stop_at_step: int  # where this invocation stops: train.max_steps caps it, the schedule is unchanged


def derived(cfg: Config, world_size: int, train_samples: int | None) -> Derived:
    """Batch and schedule arithmetic from the config, the world size and the train split size."""
    per_rank = cfg.data.classes_per_batch * cfg.data.images_per_class
    global_batch = per_rank * world_size * cfg.optim.grad_accum
    if cfg.data.steps_per_epoch is not None:
        steps = cfg.data.steps_per_epoch
    else:
        if not train_samples:
            raise ConfigError("data.steps_per_epoch: not set and the train split size is unknown (no stats.json)")
        steps = train_samples // (per_rank * world_size)
        if steps < 1:
            raise ConfigError(
                f"data.steps_per_epoch: the train split ({train_samples} images) is smaller than one "
                f"global batch ({per_rank * world_size}); lower data.classes_per_batch or set "
                "data.steps_per_epoch"
            )
    if steps < cfg.optim.grad_accum:
        raise ConfigError(
            f"optim.grad_accum: {cfg.optim.grad_accum} micro-batches per step, but an epoch has only {steps} per rank"
        )
    _check_memory(cfg, per_rank * world_size)
    # whole optimizer steps per epoch: accelerate's accumulation counter would otherwise straddle epoch ends
    steps -= steps % cfg.optim.grad_accum
    opt_steps = steps // cfg.optim.grad_accum
    total = opt_steps * cfg.train.epochs
    stop_at = total if cfg.train.max_steps is None else min(total, cfg.train.max_steps)
    return Derived(per_rank, global_batch, steps, opt_steps, total, stop_at)


def _check_memory(cfg: Config, gathered: int) -> None:
    """A cross-batch memory must hold at least one gathered batch: one call of the loss enqueues every rank's
    micro-batch (``gathered``)."""
    if cfg.loss.xbm_size and cfg.loss.xbm_size < gathered:
        raise ConfigError(
            f"loss.xbm_size: {cfg.loss.xbm_size} embeddings hold less than one gathered batch ({gathered} = processes "
            "x data.classes_per_batch x data.images_per_class); raise it or set 0 (off)"
        )
