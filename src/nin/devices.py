"""What this machine can compute in: used by training and by inference alike (so neither imports the other)."""
from __future__ import annotations


def cpu_supports_bf16() -> bool:
    """bf16 autocast only pays on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
