"""A full disk and a pipe that never delivers, made without root, for the tests of what the tool
does when the machine it runs on turns against it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """No file of this process may grow past ``max_bytes`` inside the block (POSIX only), so every
    longer write comes up short as on a full disk (EFBIG instead of ENOSPC: the same short write)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def release_readers(pipe: Path, every_seconds: float = 5.0, for_seconds: float = 120.0) -> threading.Event:
    """Whoever opens the named pipe for reading gets end-of-file within seconds instead of waiting
    forever, so code that should never have opened it fails a test instead of hanging it. Set the
    returned event to stop sooner."""
    stop = threading.Event()

    def open_and_close_the_writing_end() -> None:
        for _ in range(int(for_seconds / every_seconds)):
            if stop.wait(every_seconds):
                return
            with contextlib.suppress(OSError):  # refused at once while nobody reads
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=open_and_close_the_writing_end, daemon=True).start()
    return stop
