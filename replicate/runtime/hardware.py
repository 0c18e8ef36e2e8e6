"""What the machine is: the CPU's model name and feature flags (provenance, precision choice, the bench)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_info() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); else the platform's name and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    field = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}
    return field.get("model name", platform.machine()), set(field.get("flags", "").split())
