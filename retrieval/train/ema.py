"""The weights a run validates, selects and exports: the model's own, or an exponential moving average of them.

With ``train.ema_decay`` set, :class:`RunWeights` keeps timm's ``ModelEmaV3`` of the unwrapped model, updated after
every optimizer step (``ema = decay * ema + (1 - decay) * weights``; the first update copies the weights, and
``train.ema_warmup`` uses timm's warmup ``min(decay, 1 - (1 + step)^-2/3)``). Validation then embeds the EMA
weights, ``best`` is chosen on them, and the ``best``/``final`` exports are the EMA weights; the raw weights keep
training and are what checkpoints' ``model.safetensors`` hold. Without it everything is the model itself.

The EMA is float32 whatever the training precision (a bf16 average would round each ``(1 - decay)`` update away)
and lives on every rank as one full copy: data-parallel ranks hold equal weights, hence equal averages (the run's
``weights_agree`` checks both). Under DeepSpeed ZeRO-2 only gradients and optimizer state are sharded, so the
unwrapped module holds the full parameters and the EMA follows them; ZeRO-3 partitions the parameters themselves
and is refused. The EMA is one of the run's tensor states (:mod:`retrieval.train.checkpoint`), so it is saved with
every checkpoint (rank 0 writes ``ema.safetensors``) and every rank loads it on a resume: a resume is bitwise equal
to an uninterrupted run, and it does not depend on the number of processes (an elastic resume loads it as is).
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from retrieval.config.schema import TrainConfig
from retrieval.errors import UserError
from retrieval.model.network import unwrap
from retrieval.train.checkpoint import TensorStates


class RunWeights:
    """The run's model (as prepared by the accelerator) and, when ``train.ema_decay`` is set, its EMA."""

    def __init__(self, cfg: TrainConfig, accelerator, model: nn.Module, states: TensorStates) -> None:
        self.accelerator, self.model = accelerator, model
        self.ema: ModelEmaV3 | None = None
        if cfg.ema_decay is None:
            return
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise UserError("train.ema_decay: not with DeepSpeed ZeRO-3 (its parameters are partitioned); use ZeRO-2")
        self.ema = ModelEmaV3(unwrap(model), decay=cfg.ema_decay, use_warmup=cfg.ema_warmup, dtype=torch.float32)
        self.ema.requires_grad_(False)
        states.add("ema", _EmaState(self.ema))

    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): fold the new weights into the average."""
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=step)

    def module(self) -> nn.Module:
        """What validation embeds and the exports write: the EMA module, else the unwrapped model."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exported weights. Collective without EMA (DeepSpeed ZeRO-3 gathers its shards): every rank calls it."""
        if self.ema is not None:
            return self.ema.module.state_dict()
        return self.accelerator.get_state_dict(self.model)

    def all(self) -> list[nn.Module]:
        """Every set of weights the run holds (the finite-weights guard and the ranks' agreement check both)."""
        raw = self.accelerator.unwrap_model(self.model)
        return [raw] if self.ema is None else [raw, self.ema.module]


class _EmaState:
    """The EMA as a checkpoint holds it: the averaged module's state dict (no decay or step: those come from the
    config and the trainer's state, which a resume already checks)."""

    def __init__(self, ema: ModelEmaV3) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state, strict=True)
