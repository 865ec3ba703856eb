"""Size guards: bnaudit checks what an allocation would need before it makes it.

A typo (``-b 50000000``, ``random:100000x100000``, ``--nproc 16`` on a laptop) must end in one line saying
what would be needed and what the limit is, not in an allocation traceback, a swapping machine or the OOM
killer. The limit is one number, ``memory_limit()``: 2 GiB unless the ``BNAUDIT_MEMORY_LIMIT`` environment
variable says otherwise (``8G``, ``512M``, bytes). A batch bnaudit generates itself (``random:SHAPE``,
``--input-shape``) may use an eighth of it, leaving the rest for the model's activations, which are a
multiple of the input. Nothing here imports torch."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from bnaudit.errors import LimitError

ENV = "BNAUDIT_MEMORY_LIMIT"
DEFAULT_LIMIT = 2 << 30
#: The share of the limit one generated input batch may take.
BATCH_SHARE = 8
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_limit() -> int:
    """The memory bnaudit allows itself, in bytes (``BNAUDIT_MEMORY_LIMIT`` or 2 GiB).

    Raises:
        LimitError: the environment variable is not a size such as ``4G``, ``512M`` or ``1000000``.
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_LIMIT
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", text.upper())
    if m is None or float(m.group(1)) <= 0:
        raise LimitError(f"{ENV}={text!r} is not a size; write e.g. 4G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(n: float) -> str:
    """Bytes as ``1.5 GiB`` (three significant digits)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def check_allocation(
    what: str, count: int, shape: Sequence[int], itemsize: int = 4, *, share: int = 1, hint: str = ""
) -> int:
    """Check that ``count`` items of ``shape`` (``itemsize`` bytes per value) fit in ``memory_limit() / share``.

    Args:
        what: what would be allocated, for the message (``random:3x32x32 at batch size 256``).
        count: the leading dimension (a batch size, a number of processes).
        shape: one item's shape.
        itemsize: bytes per value (4 for float32).
        share: the fraction of the limit this allocation may take (``BATCH_SHARE`` for a generated batch).
        hint: what to do instead, appended to the message.

    Returns:
        The bytes it would take.

    Raises:
        LimitError: it would take more, with both numbers in the message.
    """
    need = int(count) * math.prod(int(d) for d in shape) * int(itemsize)  # Python ints: no overflow
    limit = memory_limit()
    allowed = limit // share
    if need > allowed:
        part = f"{human(allowed)}, 1/{share} of bnaudit's {human(limit)} memory limit" if share > 1 else (
            f"bnaudit's {human(limit)} memory limit")
        raise LimitError(
            f"{what} would need {human(need)}, more than {part}; {hint + '; ' if hint else ''}or raise the limit "
            f"with {ENV}=8G"
        )
    return need


def process_memory() -> int:
    """This process's resident memory in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return 0


__all__ = ["BATCH_SHARE", "DEFAULT_LIMIT", "ENV", "check_allocation", "human", "memory_limit", "process_memory"]
