"""A TUI in a real terminal for tests: a private tmux server whose screen is read back.

The command runs `python -m duplex` from this checkout: its own tmux server (a private socket,
no user config), started in the repository root with an environment passed explicitly, so
neither a tmux server already running nor an editable install pointing at another checkout
decides which code runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def duplex_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with this checkout first on the import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra or {})
    return env


class Terminal:
    """`duplex ARGS...` in a detached tmux session of `size` columns x rows; killed on exit."""

    def __init__(
        self,
        args: Sequence[str],
        size: tuple[int, int] = (120, 40),
        env: dict[str, str] | None = None,
    ) -> None:
        tmux = shutil.which("tmux")
        assert tmux, "tmux is missing: run `make setup`"
        self.env = duplex_env(env)
        where = subprocess.run(
            [sys.executable, "-c", "import duplex; print(duplex.__file__)"],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert Path(where).is_relative_to(REPO / "duplex"), f"duplex imports from {where}"
        socket = f"duplex-test-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux = [tmux, "-L", socket, "-f", "/dev/null"]
        # The command's exit status lands in a file once it ends (then the session closes).
        self.folder = Path(tempfile.mkdtemp(prefix="duplex-terminal-"))
        self.status_file = self.folder / "status"
        cmd = shlex.join([sys.executable, "-m", "duplex", *args])
        shell = f"{cmd}; echo $? > {shlex.quote(str(self.status_file))}"
        cols, rows = size
        new = ["new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows), "-c", str(REPO)]
        subprocess.run([*self.tmux, *new, shell], check=True, cwd=REPO, env=self.env)
        self.socket = subprocess.run(
            [*self.tmux, "display-message", "-p", "#{socket_path}"],
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout.strip()

    def screen(self) -> str:
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True
        ).stdout

    def wait_for(self, done: Callable[[str], bool], timeout: float = 90.0) -> str:
        """The screen once `done(screen)` holds, or the last screen after `timeout` s."""
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not done(screen) and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = self.screen()
        return screen

    def press(self, key: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", key], check=True)

    def exit_status(self) -> int | None:
        """The command's exit status once it has ended, else None."""
        try:
            text = self.status_file.read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.strip() else None

    def wait_closed(self, timeout: float = 20.0) -> int | None:
        """The command's exit status once it has ended; None if it still runs after `timeout`."""
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return status

    def quit(self, timeout: float = 20.0) -> tuple[int | None, float]:
        """Press Ctrl+Q: (the exit status or None, seconds until the process ended)."""
        t0 = time.monotonic()
        self.press("C-q")
        status = self.wait_closed(timeout)
        return status, time.monotonic() - t0

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)
        # tmux leaves its socket file behind.
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
