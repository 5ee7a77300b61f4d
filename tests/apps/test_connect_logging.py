"""`duplex connect` logs through `logging` as `duplex serve` does: its warnings are always on
stderr with the command's prefix; -v adds what the client does, with no secret in it."""

from __future__ import annotations

import argparse
import logging
import os
import socket

import pytest

from duplex.apps import connect as connect_cmd
from duplex.apps.connect_config import ConnectConfig


def _closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    connect_cmd.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(autouse=True)
def _quiet_logger():
    """Each test configures the logger afresh; leave it as it was found."""
    logger = logging.getLogger("duplex.connect")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


@pytest.mark.parametrize("verbose", [0, 1])
async def test_warnings_always_details_with_verbose(capsys, verbose: int) -> None:
    port = _closed_port()
    url = f"ws://127.0.0.1:{port}/?token=s3cret"
    args = _args(url, "--output", os.devnull, *(["-v"] * verbose))
    cfg = ConnectConfig(url=url, retries=1, backoff=0.05, max_seconds=0.1)
    assert await connect_cmd._main(cfg, args) == 5
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    # The warnings, exactly as print() wrote them before: prefix, message, one line each.
    assert any(line.startswith("duplex connect: connection lost (") for line in err), err
    assert err[-1].startswith("duplex connect: giving up after 2 tries: "), err
    connecting = [line for line in err if "connecting to" in line]
    if verbose:
        assert len(connecting) == 2, err
        assert connecting[0] == f"duplex connect: connecting to ws://127.0.0.1:{port}/ (wire pcm)"
    else:
        assert connecting == [], err
    assert "s3cret" not in captured.err and "s3cret" not in captured.out


async def test_running_twice_logs_each_line_once(capsys) -> None:
    url = f"ws://127.0.0.1:{_closed_port()}/"
    args = _args(url, "--output", os.devnull)
    for _ in range(2):
        cfg = ConnectConfig(url=url, retries=0, max_seconds=0.1)
        assert await connect_cmd._main(cfg, args) == 5
    err = capsys.readouterr().err
    assert err.count("giving up after 1 tries") == 2, err


def test_verbose_is_in_the_help() -> None:
    p = argparse.ArgumentParser()
    connect_cmd.add_arguments(p)
    assert "--verbose" in p.format_help() and "-v" in p.format_help()
