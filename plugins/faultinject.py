"""A copy engine that fails on purpose, for testing a site's retry and hold settings.

Any source file with a sibling named `<file>.hpcmove-fault` fails to read with a
transient I/O error (as a flaky storage target would) until that marker is removed,
which is what "fixing" the file means to it. Everything else is copied exactly as
the copy engine does. Select it with `--engine faultinject`.
"""
import errno
import os

from hpcmove.errors import TransferError
from hpcmove_plugins.copy import CopyEngine

MARKER = b".hpcmove-fault"


class FaultInjectEngine(CopyEngine):
    name = "faultinject"

    def copy_slice(self, work):
        if os.path.exists(work.src + MARKER):
            raise TransferError(f"{os.strerror(errno.EIO)} (injected): {os.fsdecode(work.src)}",
                                transient=True)
        return super().copy_slice(work)
