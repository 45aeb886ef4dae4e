"""The mocker engine's frozen config and its command-line flags (defaults from the dataclass)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from kvflow.engines.core.scheduler import SchedulerConfig
from kvflow.engines.mocker.outputs import output_names


@dataclass(frozen=True)
class MockerConfig:
    """Everything one simulated engine needs; checked once, never mutated."""

    num_gpu_blocks: int = 16384  # ~27k fit an 8B model's KV on an 80 GB H100; 16k is safe
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # None: limited by num_gpu_blocks * block_size
    speedup_ratio: float = 1.0  # simulated time / wall time; 0 = never sleep
    seed: int = 0
    output: str = "random"  # a name registered in kvflow.engines.mocker.outputs
    vocab_size: int = 32000
    num_host_blocks: int = 0  # CPU tier for blocks evicted from the GPU; 0 = none
    host_bandwidth: float = 25e9  # bytes/s, host -> GPU (PCIe 5 x16, effective)
    kv_transfer_bandwidth: float = 25e9  # bytes/s, prefill worker -> decode worker (modelled)
    profile: str | None = None  # JSON file overriding kvflow.engines.mocker.timing params
    # Simulated lower KV tiers (sim_tiers.py): with either set, the host tier above joins them.
    num_disk_blocks: int = 0  # G3 capacity in blocks; 0 = no disk tier
    disk_bandwidth: float = 7e9  # bytes/s, disk -> GPU (one PCIe 4 NVMe)
    object_store: bool = False  # G4, shared by the engines of this process
    object_bandwidth: float = 12.5e9  # bytes/s, object store -> GPU (100 GbE)

    def __post_init__(self) -> None:
        if self.output not in output_names():
            raise ValueError(
                f"unknown mocker output {self.output!r}; use one of {', '.join(output_names())}"
            )
        if self.speedup_ratio < 0:
            raise ValueError(
                f"speedup_ratio must be >= 0 (0 = no delays), got {self.speedup_ratio}"
            )
        if self.num_host_blocks < 0 or self.vocab_size < 1:
            raise ValueError("num_host_blocks must be >= 0 and vocab_size >= 1")
        if self.num_host_blocks and not self.enable_prefix_caching:
            raise ValueError("a host tier (num_host_blocks > 0) needs prefix caching enabled")
        if self.num_disk_blocks < 0 or min(self.disk_bandwidth, self.object_bandwidth) <= 0:
            raise ValueError("num_disk_blocks must be >= 0 and tier bandwidths positive")
        if min(self.host_bandwidth, self.kv_transfer_bandwidth) <= 0:
            raise ValueError("host_bandwidth and kv_transfer_bandwidth must be positive")
        self.scheduler_config()  # checks the scheduler limits now, not at start

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
            enable_chunked_prefill=self.enable_chunked_prefill,
            max_model_len=self.max_model_len,
        )


# flag -> config field; argparse defaults come from the dataclass.
_FLAGS = {
    "--num-gpu-blocks": "num_gpu_blocks",
    "--block-size": "block_size",
    "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--speedup-ratio": "speedup_ratio",
    "--mocker-seed": "seed",
    "--num-host-blocks": "num_host_blocks",
    "--mocker-output": "output",
    "--mocker-profile": "profile",
    "--kv-transfer-bandwidth": "kv_transfer_bandwidth",
    "--num-disk-blocks": "num_disk_blocks",
    "--mocker-object-store": "object_store",
}

_HELP = {
    "num_gpu_blocks": "KV blocks in the simulated GPU cache",
    "block_size": "tokens per KV block",
    "max_num_seqs": "most sequences running at once",
    "max_num_batched_tokens": "token budget of one engine step",
    "speedup_ratio": "simulated seconds per wall second; 0 runs with no delays at all",
    "seed": "seed of the random output tokens",
    "num_host_blocks": "CPU-tier KV blocks that catch GPU evictions (0 = no host tier)",
    "output": "output tokens: 'random' (seeded) or 'echo' (repeat the prompt)",
    "profile": "JSON file overriding the timing model's coefficients",
    "kv_transfer_bandwidth": "modelled bytes/s of KV moved from a prefill worker (--role decode)",
    "num_disk_blocks": "simulated disk-tier KV blocks (G3; 0 = none)",
    "object_store": "simulated object-store tier (G4) shared by this process's engines",
}


def add_mocker_args(parser: argparse.ArgumentParser) -> None:
    """Add the mocker's flags to a worker's parser."""
    defaults = MockerConfig()
    types = {f.name: f.type for f in fields(MockerConfig)}
    group = parser.add_argument_group("mocker engine")
    for flag, name in _FLAGS.items():
        kind = {"int": int, "float": float, "bool": _yes}.get(str(types[name]), str)
        choices = {"output": output_names()}.get(name)
        group.add_argument(
            flag,
            dest=f"mocker_{name}",
            type=kind,
            default=getattr(defaults, name),
            choices=choices,
            metavar=name.upper(),
            help=f"{_HELP[name]} (default: %(default)s)",
        )


def config_from_args(ns: argparse.Namespace) -> MockerConfig:
    return MockerConfig(**{name: getattr(ns, f"mocker_{name}") for name in _FLAGS.values()})


def _yes(text: str) -> bool:
    """A boolean flag value: 1/true/yes/on (any case) or 0/false/no/off."""
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("1", "true", "yes", "on")
