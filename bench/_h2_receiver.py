"""The ERP simulator's app served by Hypercorn, which speaks HTTP/2 in clear text (prior
knowledge) as well as HTTP/1.1 on one port, for the forwarder benchmark's HTTP/2 figures
(uvicorn, the simulator's own server, speaks only HTTP/1.1). Run as a child process by
`bench/forward.py`: `python bench/_h2_receiver.py DB_PATH`; it prints
`erp-api listening on http://127.0.0.1:PORT` once it serves, like the simulator does.
The leading underscore keeps `bench/run.py` from taking this module for a benchmark.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypercorn.asyncio import serve
from hypercorn.config import Config

from simulators.erp.app import create_app


def main(database: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    config.accesslog = None
    # The forwarder's in-flight requests share one connection under HTTP/2: room for them all.
    config.h2_max_concurrent_streams = 100
    # Hypercorn ends a connection after 1,000 requests by default (a GOAWAY that fails what
    # is in flight on it); the bench keeps one connection for its whole run.
    config.keep_alive_max_requests = 1 << 40

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.call_later(
            0.5, lambda: print(f"erp-api listening on http://127.0.0.1:{port}", flush=True)
        )
        await serve(create_app(database), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main(sys.argv[1])
