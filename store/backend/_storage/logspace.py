"""Space reserved ahead of the redo log's write position.

A log segment is written from offset 0 into space reserved with
``posix_fallocate`` rather than by appending to a growing file. Appending
makes every group-commit ``fdatasync`` also commit a new file size and newly
allocated blocks to the file system's journal; writing inside the file's
existing size leaves only the data (and, for reserved blocks, a cheap extent
flag) to flush. Measured on ext4: a 100-byte record plus fdatasync costs
about 200 µs appended and about 135 µs written into reserved space.

The price is a tail of reserved zeros after the last record of the open
segment. A segment that is retired or closed is truncated to its records;
after a crash, replay finds the zeros, knows them for the unused
reservation (no record starts with a zero byte) and cuts them without a
warning. Where the file system cannot reserve space, the log falls back to
plain appends.
"""

from __future__ import annotations

import errno
import os

# Reserved at a time. Each reservation costs one fallocate plus one fdatasync
# (made off the calls' path, see Storage._reserve_ahead), so the step is large
# enough that this happens once per tens of thousands of small records, and
# small enough that a segment that stops early (a crash, a quiet backend) holds
# little unused space: at most one step, cut at the next start.
RESERVE_STEP = 4 * 1024 * 1024

# The next step is reserved when less than this is left ahead of the write
# position: early enough that the writes in flight meanwhile stay inside
# reserved space.
RESERVE_LOW = RESERVE_STEP // 2

# Errors that mean "this file system (or platform) does not reserve space":
# fall back to appends for good.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

_ZEROS = bytes(1 << 20)


def reserve(fd: int, offset: int, length: int) -> bool:
    """Reserve ``length`` bytes of ``fd`` from ``offset`` (the file grows to cover them).

    False when the file system or platform cannot reserve space (the caller
    appends instead); other errors (``ENOSPC``) are raised.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return False
    try:
        fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def zeros_from(data: memoryview, offset: int) -> bool:
    """True when every byte of ``data`` from ``offset`` on is zero (an unused reservation)."""
    end = len(data)
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        if data[offset : offset + n] != _ZEROS[:n]:
            return False
        offset += n
    return True
