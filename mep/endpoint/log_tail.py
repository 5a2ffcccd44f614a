"""The last lines of an endpoint's log, read as the account: ``python -I -m mep.endpoint.log_tail PATH LINES BYTES``.

The root spawner starts this through its checked drop (``privdrop.read_log_tail``)
when an endpoint exited with an error, so root itself never opens a file in the
researcher's home: a link the researcher planted reaches only what the account
could read anyway. It writes the last ``LINES`` whole lines found in the last
``BYTES`` bytes of ``PATH`` to fd 3, and nothing if the file can't be read.
"""

from __future__ import annotations

import os
import sys

ANSWER_FD = 3


def log_tail(path: str, max_lines: int, max_bytes: int) -> str:
    """The last ``max_lines`` whole lines of the last ``max_bytes`` bytes of ``path``."""
    # O_NONBLOCK: a FIFO planted as the log opens at once (and pread refuses it) instead of hanging the reader.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            # One byte more than the window: if it is a newline, the first line is whole.
            data = os.pread(fd, max_bytes + 1, size - max_bytes - 1).partition(b"\n")[2]
        else:
            data = os.pread(fd, max_bytes, 0)
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[max(0, len(lines) - max_lines) :])


def main(argv: list[str]) -> int:
    path, max_lines, max_bytes = argv[0], int(argv[1]), int(argv[2])
    try:
        tail = log_tail(path, max_lines, max_bytes)
    except OSError:
        return 1  # missing, not the account's to read, or no file with an end (a FIFO, a terminal)
    with os.fdopen(ANSWER_FD, "wb") as answer:
        answer.write(tail.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
