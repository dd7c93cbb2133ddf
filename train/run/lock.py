"""One training at a time per run directory: RUN_DIR/train.lock.

The lock is an exclusive `flock` on the file, which the kernel releases when its holder exits in
any way (SIGKILL included), so a lock is never left held by a process that is gone. The file also
says who holds it (pid, host, start time, command): a second training refuses to start with that in
its one-line error, and a training that finds the description of a holder that is gone (it was
killed before it could clear it) takes the lock over with a notice. Read-only commands (sample,
eval, score, ...) never take it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from plutao.train.config.errors import UserError

LOCK_FILE = "train.lock"


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {started})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`acquire()` holds the run directory for one training until `release()`."""

    def __init__(self, run_dir: Path, log=print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.log = log
        self._fd: int | None = None
        self._created_dir = False

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {"pid": "?", "host": "?"}

    def _in_use(self, holder: dict) -> UserError:
        return UserError(f"{self.run_dir} is in use: {_describe(holder)} is training in it; wait for it to finish "
                         "or stop it, or use another --workdir")

    def acquire(self) -> None:
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise self._in_use(holder) from None
        except OSError as e:  # a filesystem without locks: fall back to the recorded holder
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            holder = self._read(fd)
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and holder["pid"] != os.getpid() and _pid_alive(holder["pid"]):
                os.close(fd)
                raise self._in_use(holder) from None
        previous = self._read(fd)
        if previous:
            self.log(f"{self.path}: taking over the lock of {_describe(previous)}, which is gone "
                     "(it ended without releasing it)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder and unlock. The file stays (removing it would race with a process that
        has it open); a new directory that holds nothing but the lock is removed again."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.run_dir.rmdir()
