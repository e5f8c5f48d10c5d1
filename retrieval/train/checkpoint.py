"""A checkpoint's own tensors (the EMA, the cross-batch memory) and what of a checkpoint folder may be read at all.

**Tensors, not pickles.** The run's extra states are tensors: :class:`TensorStates` saves each as
``<name>.safetensors`` in the checkpoint folder (rank 0; ``ema.safetensors``, ``memory.safetensors``) and every
rank loads them on a resume, bit for bit. They used to be accelerate custom states (``custom_checkpoint_N.pkl``,
which accelerate loads with ``torch.load(weights_only=False)``: a replaced file ran code on ``--resume``); a
checkpoint holding one is refused with one line (:func:`check_loadable`), never loaded.

**What accelerate and DeepSpeed still unpickle.** ``accelerator.load_state`` reads ``optimizer.bin``,
``scheduler.bin``, ``random_states_N.pkl`` (and ``scaler.pt``, ``sampler.bin`` when present) with
``torch.load(weights_only=True)``; DeepSpeed reads its ``pytorch_model/*.pt`` with ``weights_only=False``. Before
any of that, :func:`check_loadable` reads every such file's pickle with :mod:`pickletools` (nothing is executed)
and refuses a file that names any callable outside :data:`SAFE_GLOBALS`: tensor and storage rebuilders, ordered
dicts, numpy arrays (the RNG states) and the three data-only classes of DeepSpeed's optimizer states. A pickle can
only run code by naming a callable, so a checkpoint that passes can set weights and optimizer state (train
garbage), never run a command. Files that are not torch's zip format (legacy pickles) are refused too.
"""

from __future__ import annotations

import logging
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrieval.errors import UserError

log = logging.getLogger(__name__)

PICKLED = (".pkl", ".bin", ".pt", ".pth")  # what accelerate and DeepSpeed may torch.load from a checkpoint
OLD_CUSTOM_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")
SAFE_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.Size",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
        "_codecs.encode",  # numpy's RNG state bytes as pickled by protocol 2
        # DeepSpeed ZeRO optimizer states: its loss scaler, the stage enum, parameter fragment addresses
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class TensorStates:
    """Named parts of the run whose state dicts are tensors only, saved beside accelerate's files in a checkpoint."""

    def __init__(self, main_process: bool) -> None:
        self.main_process = main_process  # rank 0 writes (every rank holds equal states: see save)
        self.parts: dict[str, Stateful] = {}

    def add(self, name: str, part: Stateful) -> None:
        self.parts[name] = part

    def save(self, folder: Path) -> None:
        """Rank 0 writes ``<name>.safetensors`` for every part (all ranks hold equal states: the EMA of equal
        weights, a memory fed the gathered batch); the other ranks return."""
        if not self.main_process:
            return
        for name, part in self.parts.items():
            # clone: safetensors refuses tensors that share storage
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in part.state_dict().items()}
            save_file(tensors, str(Path(folder) / f"{name}.safetensors"))

    def load(self, folder: Path) -> None:
        for name, part in self.parts.items():
            path = Path(folder) / f"{name}.safetensors"
            if not path.is_file():
                raise UserError(
                    f"checkpoint {folder} has no {path.name}: this run keeps a {name} state and the checkpoint was "
                    "written without it (or by an older retrieval); resume from another checkpoint or start a new "
                    "--run-dir"
                )
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{path}: not a readable safetensors file ({e}); the checkpoint is damaged") from None
            part.load_state_dict(state)


def check_loadable(folder: Path) -> None:
    """Refuse (one :class:`UserError` line) a checkpoint whose files would unpickle anything but data."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in PICKLED):
        if OLD_CUSTOM_STATE.fullmatch(path.name):
            raise UserError(
                f"checkpoint {folder} holds {path.name}, a pickled EMA/cross-batch-memory state of an older "
                "retrieval: pickles from a run folder can run code and are never loaded. Resume from a checkpoint "
                "written since, or start a new --run-dir (the run's exported model.safetensors stay usable)"
            )
        unsafe = _unsafe_global(path)
        if unsafe:
            raise UserError(
                f"{path}: its pickle names {unsafe}, which is not tensor, array or optimizer data (only "
                f"{len(SAFE_GLOBALS)} known names are); a checkpoint could run code through it, so it is not loaded"
            )


def _unsafe_global(path: Path) -> str | None:
    """The first callable the file's pickles name outside :data:`SAFE_GLOBALS` (None: data only)."""
    if not zipfile.is_zipfile(path):
        return "a legacy (non-zip) pickle format"
    try:
        with zipfile.ZipFile(path) as archive:
            for member in (m for m in archive.namelist() if m.endswith(".pkl")):
                with archive.open(member) as f:
                    for op, arg, _ in pickletools.genops(f):
                        name = _global_name(op.name, arg)
                        if name is not None and not _safe(name):
                            return repr(name)
    except (zipfile.BadZipFile, ValueError, OSError) as e:  # genops raises ValueError on a broken pickle
        raise UserError(f"{path}: not a readable checkpoint file ({e}); the checkpoint is damaged") from None
    return None


def _global_name(opcode: str, arg: Any) -> str | None:
    if opcode in ("GLOBAL", "INST"):
        return str(arg).replace(" ", ".")
    if opcode in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):  # torch.save writes protocol 2: never these
        return f"<{opcode}>"
    return None


def _safe(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if name in SAFE_GLOBALS:
        return True
    if module == "torch" and attr.isidentifier():  # storages (torch.FloatStorage) and dtypes (torch.bfloat16)
        return attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype)
    return module == "numpy.dtypes" and attr.endswith("DType")
