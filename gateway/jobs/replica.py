"""Who this process is among the replicas sharing a journal: `host:port.slot/instance`.

`instance` is new for every process. `slot` is the first of this host and port's slot locks
(`flock` on a file in the temporary folder) that no live process holds; the kernel lets go
of it when its holder dies, even by SIGKILL. So a process that gets slot K knows that the
last holder of K is gone, and takes over the jobs it held at once instead of waiting for
their leases to run out (a restarted container, a replaced gunicorn worker), while the
workers of one gunicorn, which share the host and the port, never mistake each other for
a dead predecessor.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
MAX_SLOTS = 256


class ReplicaIdentity:
    def __init__(self, port: int, folder: str | None = None) -> None:
        self._fd: int | None = None
        slot = self._take_slot(port, Path(folder or tempfile.gettempdir()))
        where = f"{socket.gethostname()}:{port}" + (f".{slot}" if slot is not None else "")
        self.name = f"{where}/{secrets.token_hex(4)}"

    def _take_slot(self, port: int, folder: Path) -> int | None:
        for slot in range(MAX_SLOTS):
            try:
                fd = os.open(folder / f"gateway-replica-{port}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.warning("no replica slot (%s): a restart waits for its jobs' leases to run out", exc)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                os.close(fd)
                continue
            self._fd = fd
            return slot
        return None  # all taken: an instance of its own, which nobody takes over early

    def release(self) -> None:
        """Let the slot go (a graceful stop: this process's claims are released already)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
