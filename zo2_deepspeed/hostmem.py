"""Host memory as the kernel reports it (/proc/meminfo): what a whole-model gather can count on."""
from __future__ import annotations

from typing import Optional


def meminfo_bytes(field: str) -> Optional[int]:
    """A /proc/meminfo field ("MemTotal", "MemAvailable", ...) in bytes; None where there is no such file or field."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0]) * 1024
    except OSError:
        return None
    return None


def available_host_bytes() -> Optional[int]:
    """Memory a new allocation can get without swapping (MemAvailable); None where it is not reported."""
    return meminfo_bytes("MemAvailable")
