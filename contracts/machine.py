"""Which machine a figure or a choice belongs to: the CPU model, the ISA flags that decide which runtime and
precision win, and the core count. A measured choice (`bert-recsys tune`) and an export's recorded outcome are
valid only on the machine they were made on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The ISA extensions that decide which runtime and precision win on a CPU (INT8 needs VNNI or AMX to pay off).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_int8", "amx_bf16")


def cpu_model_and_flags(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS it has, from /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # every core repeats the same block: the first one says it all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return fields.get("model name") or platform.processor() or "cpu", [f for f in ISA_FLAGS if f in flags]


def machine_identity() -> dict:
    """This machine's CPU model, ISA flags and core count: what a measured choice (tune) is valid for."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model, flags = cpu_model_and_flags(cpuinfo)
    return {"cpu": model, "flags": flags, "cores": os.cpu_count()}


def machine() -> str:
    """What every benchmark figure is quoted with: CPU model, its ISA flags, cores, OS."""
    m = machine_identity()
    return f"{m['cpu']} ({' '.join(m['flags']) or 'no AVX2'}), {m['cores']} cores, {platform.system()} {platform.release()}"
