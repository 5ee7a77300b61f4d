"""A TUI in a real terminal for tests: a detached tmux session whose screen is read back."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class Terminal:
    """`cmd` running in a detached tmux session of `size` columns x rows; killed on exit."""

    def __init__(
        self, cmd: str, cwd: str | Path | None = None, size: tuple[int, int] = (120, 40)
    ) -> None:
        tmux = shutil.which("tmux")
        assert tmux, "tmux is missing: run `make setup`"
        self.tmux = tmux
        self.name = f"duplex-test-{os.getpid()}-{time.monotonic_ns()}"
        cols, rows = size
        subprocess.run(
            [tmux, "new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows), cmd],
            check=True,
            cwd=cwd,
        )

    def screen(self) -> str:
        return subprocess.run(
            [self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        ).stdout

    def wait_for(self, done: Callable[[str], bool], timeout: float = 90.0) -> str:
        """The screen once `done(screen)` holds, or the last screen after `timeout` s."""
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not done(screen) and time.monotonic() < deadline:
            time.sleep(0.5)
            screen = self.screen()
        return screen

    def press(self, key: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, key], check=True)

    def alive(self) -> bool:
        has = subprocess.run([self.tmux, "has-session", "-t", self.name], capture_output=True)
        return has.returncode == 0

    def wait_closed(self, timeout: float = 20.0) -> bool:
        """True once the command (and so the session) has ended."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.3)
        return not self.alive()

    def close(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], capture_output=True)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
