"""User-facing programs: the `duplex` command line, TUI, websocket server and client."""
