"""The TUI's commands applied to a remote session of `duplex connect`.

The TUI runs on the main thread and the client on its own event loop (`RemoteFeed`'s thread):
commands cross over in a thread-safe queue, which this task polls on the client's loop, so the
websocket is only ever used from the loop that owns it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from duplex.apps import protocol as P
from duplex.streamer.events import Command, Request

if TYPE_CHECKING:
    from duplex.apps.remote_client import Client


async def steer(client: Client, ws: Any) -> None:
    """Apply the TUI's commands to `client` (polled: the queue is filled from another thread)."""
    while True:
        while not client.commands.empty():
            req: Request = client.commands.get_nowait()
            kind = req.command
            if kind == Command.STOP:
                client.quitting = client.input_done = True
                await ws.close(1000, "client quit")
                return
            if kind == Command.TYPE:
                await ws.send(P.encode(P.Text(req.arg), "client"))
            elif kind == Command.MUTE:
                client.muted = not client.muted
                client.notice("microphone muted" if client.muted else "microphone on")
            elif kind == Command.PAUSE:
                client.paused = not client.paused
                client.notice("paused (nothing is sent)" if client.paused else "resumed")
            elif kind == Command.SAVE:
                client.save_path = req.arg
                await ws.send(P.encode(P.Control(P.Op.SAVE_STATE), "client"))
            elif kind == Command.LOAD:
                try:
                    await client.load_state(ws, req.arg)
                except OSError as e:
                    client.notice(f"could not read {req.arg}: {e}")
            elif kind == Command.RESET:
                await ws.send(P.encode(P.Control(P.Op.RESET), "client"))
        await asyncio.sleep(0.02)
