"""Whether to score in bf16: on CUDA, and on CPUs with native bf16 matrix units (AVX-512 BF16
or AMX), bf16 autocast is several times faster than fp32 for the same rankings; on CPUs
without them (AVX2 only) it is emulated and far slower (experiments/BENCHMARKS.md), so
``auto`` keeps fp32 there."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Set, Tuple, Union

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Optional[str] = None) -> Set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of the given text); empty if unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def resolve_bf16(setting: Union[bool, str], device, flags: Optional[Set[str]] = None) -> Tuple[bool, str]:
    """``(use bf16, why)`` for a ``bf16`` setting of ``true``, ``false`` or ``auto`` on ``device``."""
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        setting = setting.lower() == "true"
    if isinstance(setting, bool):
        return setting, "set explicitly"
    if setting != "auto":
        raise ValueError(f"bf16 must be true, false or auto, got {setting!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return True, "auto: CUDA device"
    if dev.type != "cpu":
        return False, f"auto: {dev.type} device, fp32"
    have = sorted((cpu_flags() if flags is None else flags) & set(NATIVE_BF16_FLAGS))
    if have and flags is None:
        # torch's own CPU kernels may be capped below the hardware (ATEN_CPU_CAPABILITY=avx2, as
        # when emulating an AVX2-only machine): bf16 is then emulated, as on one
        cap = torch.backends.cpu.get_cpu_capability()
        if not cap.upper().startswith(("AVX512", "AMX")):
            return False, f"auto: torch's CPU kernels capped at {cap} (ATEN_CPU_CAPABILITY), bf16 would be emulated"
    if have:
        return True, f"auto: CPU with native bf16 matrix support ({', '.join(have)})"
    return False, "auto: CPU without AVX-512 BF16 or AMX (bf16 would be emulated, slower than fp32)"
