"""A long-running child process whose output a test waits on, line by line (the dev commands)."""

from __future__ import annotations

import subprocess
import threading
import time


class Output:
    """A child's merged stdout and stderr, read by a thread, waited on line by line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    def wait_for(self, text: str, timeout: float = 90, start: int = 0) -> int:
        """The index of the first line from ``start`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self.lines)):
                    if text in self.lines[index]:
                        return index
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line with {text!r} after {timeout} s:\n{self.tail()}"
                self._changed.wait(remaining)
