"""Every launch profile in launch/ is accepted by accelerate itself and agrees with the trainer's config.

accelerate validates a profile only when `accelerate launch` runs; these tests call the same code path
(`_validate_launch_command` + the env it would hand to the processes, then `DeepSpeedPlugin`, which is what
the Accelerator builds inside each process) without starting any process. DeepSpeed JSONs, once their
"auto" fields are filled as accelerate fills them, are checked by DeepSpeed's own config parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retrieval.config.io import load_config
from retrieval.config.schema import Config, derived
from retrieval.util import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PROFILES = sorted(LAUNCH.glob("*.yaml"))
DS_JSONS = sorted(LAUNCH.glob("ds_*.json"))
EXPECTED = {"gpu1.yaml", "ddp_1node.yaml", "ddp_multinode.yaml", "zero1.yaml", "zero2.yaml", "cpu_2proc.yaml"}
MIXED_PRECISION = {"no", "fp16", "bf16"}


def _launch_env(profile: Path, flags: list[str]) -> tuple[object, dict[str, str]]:
    """The args and process environment `accelerate launch --config_file PROFILE FLAGS -m retrieval train` builds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(profile), *flags, "-m", "retrieval", "train"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def _flags(name: str) -> list[str]:
    """The command-line flags launch/README.md pairs with each profile (2 nodes x 2 processes for multi-node)."""
    port = str(free_port())
    multinode = [
        "--num_machines",
        "2",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
        "--num_processes",
        "4",
    ]
    return {
        "gpu1.yaml": [],
        "cpu_2proc.yaml": ["--main_process_port", port],
        "ddp_1node.yaml": ["--num_processes", "2"],
        "ddp_multinode.yaml": multinode,
        "zero1.yaml": ["--num_processes", "2", "--main_process_port", port],
        "zero2.yaml": multinode,
    }[name]


def _configs() -> list[Config]:
    """The experiment configs of the repo (defaults if none exist yet)."""
    found = sorted((REPO / "configs").glob("*.yaml"))
    return [load_config(p) for p in found] or [Config()]


def test_every_expected_profile_exists() -> None:
    assert EXPECTED <= {p.name for p in PROFILES}
    assert {"ds_zero1.json", "ds_zero2.json"} <= {p.name for p in DS_JSONS}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_loads_in_accelerate(profile: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(profile))  # rejects unknown keys and bad enum values
    raw = yaml.safe_load(profile.read_text())
    assert raw.get("mixed_precision", "no") in MIXED_PRECISION
    if cfg.distributed_type.value == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert "mixed_precision" not in raw, "with a deepspeed_config_file, precision belongs to the JSON"
        assert ds["deepspeed_multinode_launcher"] == "standard"  # pdsh would give each node its own world
        assert (REPO / ds["deepspeed_config_file"]).is_file()
        assert not Path(ds["deepspeed_config_file"]).is_absolute()
    elif profile.name != "cpu_2proc.yaml":
        assert raw["mixed_precision"] == "bf16", "GPU profiles train in bf16"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_launch_accepts_profile(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # deepspeed_config_file paths are relative to the repo root
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    args, env = _launch_env(profile, _flags(profile.name))
    raw = yaml.safe_load(profile.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).is_file()
        _check_deepspeed_plugin(env, monkeypatch)
    else:
        assert env["ACCELERATE_MIXED_PRECISION"] == raw.get("mixed_precision", "no")
    if raw["distributed_type"] != "NO":
        nodes = int(args.num_machines)
        assert int(args.nproc_per_node) * nodes == args.num_processes
        if nodes > 1:
            assert args.node_rank == 0 and args.rdzv_endpoint.startswith("127.0.0.1:")


def test_profile_without_num_processes_is_refused() -> None:
    """ddp_1node/ddp_multinode leave num_processes out on purpose: accelerate must insist on the flag."""
    for name in ("ddp_1node.yaml", "ddp_multinode.yaml"):
        with pytest.raises(ValueError, match="num_processes"):
            _launch_env(LAUNCH / name, [])


def _check_deepspeed_plugin(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the DeepSpeedPlugin each training process builds from this env (raises on conflicting fields)."""
    from accelerate.utils import DeepSpeedPlugin

    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    stage = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())["zero_optimization"]["stage"]
    assert plugin.zero_stage == stage
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"].endswith(f"ds_zero{stage}.json")


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json(path: Path) -> None:
    ds = json.loads(path.read_text())
    assert "optimizer" not in ds, "the trainer passes a torch AdamW; an optimizer block compiles fused Adam"
    assert "scheduler" not in ds, "the trainer owns the lr schedule"
    assert ds["zero_optimization"]["stage"] == int(path.stem[-1])
    assert ds["bf16"]["enabled"] == "auto"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", f"{path.name}: {key} is filled by accelerate from the trainer config"


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2, 8, 16])
def test_deepspeed_batch_arithmetic(path: Path, world: int) -> None:
    """Fill "auto" as accelerate does from each experiment config; DeepSpeed's parser must accept the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    for cfg in _configs():
        d = derived(cfg, world, train_samples=None if cfg.data.steps_per_epoch else 10**6)
        filled = _fill_auto(
            raw, micro=d.per_rank_batch, accum=cfg.optim.grad_accum, world=world, clip=cfg.optim.grad_clip or 0.0
        )
        assert filled["train_batch_size"] == d.global_batch
        assert filled["train_batch_size"] == (
            filled["train_micro_batch_size_per_gpu"] * filled["gradient_accumulation_steps"] * world
        )
        # DeepSpeedConfig sees world size 1 without a process group: validate the per-rank view.
        one = dict(filled, train_batch_size=filled["train_batch_size"] // world)
        parsed = DeepSpeedConfig(one)
        assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
        assert parsed.gradient_accumulation_steps == cfg.optim.grad_accum


def _fill_auto(ds: dict, micro: int, accum: int, world: int, clip: float) -> dict:
    out = json.loads(json.dumps(ds))
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": clip,
    }
    for key, value in values.items():
        if out.get(key) == "auto":
            out[key] = value
    out["bf16"] = {"enabled": False}
    return out


def test_readme_names_every_profile() -> None:
    text = (LAUNCH / "README.md").read_text()
    for p in PROFILES:
        assert f"launch/{p.name}" in text, f"launch/README.md does not mention {p.name}"
    assert "ACCELERATE_USE_CPU=1" in text


def test_cpu_profile_needs_cpu_env() -> None:
    """On CPU the multi-process launcher needs ACCELERATE_USE_CPU=1 (ENV-NOTES): the profile must say so."""
    text = (LAUNCH / "cpu_2proc.yaml").read_text()
    assert "ACCELERATE_USE_CPU=1" in text


# The ZeRO-2 train/resume/export run lives in tests/test_train_dist.py.
