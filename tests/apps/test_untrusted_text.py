"""Text from outside (a server's messages, a state file, exception text) is shown as text.

Issue 18 #6 and #7: TUI notices were parsed as Textual markup, so a server (or a state file's
fingerprint echoed in an error) sending `[/x]` crashed the `duplex connect` TUI; and a `?token=`
URL went into the TUI title and recording headers.
"""

from __future__ import annotations

import queue

from textual.widgets import Static

from duplex.apps.connect_config import redact_url
from duplex.apps.tui import DuplexApp, TalkOptions
from duplex.streamer.events import Notice

HOSTILE = "[/x] [b]not bold[/b] [@click=app.quit]quit[/] \x1b[2J"


class FakeFeed:
    """A Feed that only posts what the test gives it."""

    def __init__(self) -> None:
        self.updates: queue.Queue = queue.Queue()
        self.commands: queue.Queue = queue.Queue()
        self.muted = self.paused = self.ended = False
        self.error = None

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def latency(self):
        return None

    def facts(self) -> str:
        return f"session {HOSTILE}"


async def test_notices_and_facts_are_not_markup(tmp_path) -> None:
    feed = FakeFeed()
    app = DuplexApp(feed, TalkOptions(str(tmp_path / "s.dstate")))
    async with app.run_test(size=(120, 40)) as pilot:
        feed.updates.put(Notice(f"could not load state: {HOSTILE}"))
        for _ in range(50):
            await pilot.pause(0.05)
            if "could not load" in str(app.query_one("#notice", Static).render()):
                break
        notice = str(app.query_one("#notice", Static).render())
        facts = str(app.query_one("#facts", Static).render())
        assert app.is_running
        assert "[/x]" in notice and "[b]not bold[/b]" in notice, notice
        assert "[/x]" in facts, facts


def test_token_is_redacted_from_shown_urls() -> None:
    assert redact_url("ws://h:1/?token=s3cret&seed=4") == "ws://h:1/?seed=4"
    assert redact_url("wss://h/path?token=a&token=b") == "wss://h/path"
    assert redact_url("ws://h:1/") == "ws://h:1/"
    assert "s3cret" not in redact_url("ws://h/?seed=1&token=s3cret&tokens=1")
