"""A verl platform for machines without an accelerator (registered as ``cpu`` by :mod:`.register`).

verl 0.9.1 ships platforms for NVIDIA, Ascend and ROCm only, and falls back to
CUDA when none is found. This one keeps every tensor on the CPU and every
collective on gloo. Select it with ``VERL_PLATFORM=cpu``; it never claims a
machine by auto-detection.

Workers are counted through Ray's ``GPU`` resource, because verl's resource-pool
manager counts only GPU or NPU resources: on a CPU machine start Ray with
``num_gpus`` = the number of training workers (``ray_kwargs.ray_init.num_gpus``);
those are slots, not devices.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase


def _no_op(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _memory_info(*args, **kwargs) -> tuple[int, int]:
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def _device_module() -> types.ModuleType:
    """``torch.cpu`` plus no-op stand-ins for the ``torch.cuda`` calls verl makes (memory stats, caches, RNG)."""
    module = types.ModuleType("atropos_verl_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.is_available = lambda: True
    module.current_device = lambda: "cpu"
    module.device_count = lambda: 1
    module.get_device_name = lambda *args, **kwargs: "cpu"
    for name in ("set_device", "synchronize", "empty_cache", "ipc_collect", "reset_peak_memory_stats",
                 "set_per_process_memory_fraction"):
        setattr(module, name, _no_op)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, _zero)
    module.mem_get_info = _memory_info
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    return module


_DEVICE_MODULE = _device_module()


class PlatformCPU(PlatformBase):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # chosen only by VERL_PLATFORM=cpu

    def current_device(self):
        # verl moves tensors with .to(get_device_id()): an int would mean cuda:<int>
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
