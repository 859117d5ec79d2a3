"""Parameter directions and failure policies, as PyCOMPSs spells them.

A direction says what a task does with an argument:

========================  ===========================================================
``IN`` (default)          reads it; readers of the same object run in parallel
``INOUT``                 reads and changes it; runs after earlier readers and
                          writers of the object, and later tasks wait for it
``OUT``                   overwrites it; ordered like ``INOUT``
``COLLECTION_IN``         a list (or tuple) whose items are each ``IN``
``COLLECTION_INOUT``      a list (or tuple) whose items are each ``INOUT``
``FILE_IN``               a path the task reads
``FILE_OUT``              a path the task writes (a new version of the file)
``FILE_INOUT``            a path the task reads and rewrites (a new version)
``FILE_OUT_STDOUT``       a path that receives a ``@binary``/``@mpi`` task's stdout
``FILE_OUT_STDERR``       a path that receives its stderr
``DIRECTORY_IN``          a directory the task reads (its whole tree travels)
``DIRECTORY_OUT``         a directory the task fills (a new version)
``DIRECTORY_INOUT``       a directory the task reads and changes (a new version)
========================  ===========================================================

Files are versioned like PyCOMPSs renames them: each writer makes a new
version, a reader waits only for the writer of the version it reads, and a
writer never waits for readers of an older version (they keep reading
theirs). See :mod:`runtime._files`.

Only persistent objects (``StorageObject`` instances) carry dependencies of
their own; futures always do, whatever the direction.
"""

from __future__ import annotations

import enum


class Direction(enum.Enum):
    """What a task does with one of its arguments (see the module docstring)."""

    IN = "IN"
    INOUT = "INOUT"
    OUT = "OUT"
    COLLECTION_IN = "COLLECTION_IN"
    COLLECTION_INOUT = "COLLECTION_INOUT"
    FILE_IN = "FILE_IN"
    FILE_OUT = "FILE_OUT"
    FILE_INOUT = "FILE_INOUT"
    FILE_OUT_STDOUT = "FILE_OUT_STDOUT"
    FILE_OUT_STDERR = "FILE_OUT_STDERR"
    DIRECTORY_IN = "DIRECTORY_IN"
    DIRECTORY_OUT = "DIRECTORY_OUT"
    DIRECTORY_INOUT = "DIRECTORY_INOUT"

    @property
    def writes(self) -> bool:
        """True when the task may change the argument (or the collection's items)."""
        return self in (
            Direction.INOUT,
            Direction.OUT,
            Direction.COLLECTION_INOUT,
            Direction.FILE_OUT,
            Direction.FILE_INOUT,
            Direction.FILE_OUT_STDOUT,
            Direction.FILE_OUT_STDERR,
            Direction.DIRECTORY_OUT,
            Direction.DIRECTORY_INOUT,
        )

    @property
    def file(self) -> bool:
        """True when the argument is a path whose file (or directory) the task reads or writes."""
        return self.value.startswith(("FILE_", "DIRECTORY_"))

    @property
    def directory(self) -> bool:
        """True when the path is a directory (it travels as one tar archive)."""
        return self.value.startswith("DIRECTORY_")

    @property
    def reads_file(self) -> bool:
        """True for a file direction whose current contents the task needs."""
        return self in (Direction.FILE_IN, Direction.FILE_INOUT, Direction.DIRECTORY_IN, Direction.DIRECTORY_INOUT)

    @property
    def collection(self) -> bool:
        """True when the argument is a collection whose items are tracked one by one."""
        return self in (Direction.COLLECTION_IN, Direction.COLLECTION_INOUT)


IN = Direction.IN
INOUT = Direction.INOUT
OUT = Direction.OUT
COLLECTION_IN = Direction.COLLECTION_IN
COLLECTION_INOUT = Direction.COLLECTION_INOUT
FILE_IN = Direction.FILE_IN
FILE_OUT = Direction.FILE_OUT
FILE_INOUT = Direction.FILE_INOUT
FILE_OUT_STDOUT = Direction.FILE_OUT_STDOUT
FILE_OUT_STDERR = Direction.FILE_OUT_STDERR
DIRECTORY_IN = Direction.DIRECTORY_IN
DIRECTORY_OUT = Direction.DIRECTORY_OUT
DIRECTORY_INOUT = Direction.DIRECTORY_INOUT


class OnFailure(enum.Enum):
    """What happens when a task raises (after its retries, for ``RETRY``).

    - ``FAIL`` (default): the task's future holds the error, its successors are
      cancelled (``TaskCancelled`` naming it), and the next ``barrier()`` raises.
    - ``RETRY``: run the task again, up to ``retries`` more times; if it still
      fails, behave as ``FAIL``.
    - ``CANCEL_SUCCESSORS``: like ``FAIL``, but ``barrier()`` does not raise:
      the rest of the graph goes on.
    - ``IGNORE``: the task's value is ``None`` and its successors run.
    """

    FAIL = "FAIL"
    RETRY = "RETRY"
    CANCEL_SUCCESSORS = "CANCEL_SUCCESSORS"
    IGNORE = "IGNORE"

    @classmethod
    def parse(cls, value: "str | OnFailure") -> "OnFailure":
        """The policy named ``value`` (case-insensitive), or a clear ValueError."""
        if isinstance(value, OnFailure):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            raise ValueError(f"on_failure must be one of {[p.value for p in cls]}, not {value!r}") from None
