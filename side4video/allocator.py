"""Host memory that tensors free goes back to the operating system (glibc hosts).

glibc's malloc serves large blocks with mmap and returns them on free, but only above a threshold
that it raises (up to 32 MiB) every time such a block is freed. After the first training step most
activations (a few MiB to tens of MiB each) are therefore carved from the heap, whose free holes
the process keeps: on a CPU host the resident memory of a training step grows well above the
tensors alive (measured in `side4video bench memory`: Side4Video ViT-B/16, 8 frames, 2 clips,
about 0.65 GiB). Fixing the threshold at glibc's initial value keeps every block above it mmapped,
so the resident size follows the live tensors, for a few per cent of step time (page faults).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD


def release_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
