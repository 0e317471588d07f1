"""The OPC UA machine simulator in a child process, steered line by line through its stdin.

asyncua keeps the structure types it decodes in module-wide registries. A server and a client
in one process share them, so a client loading the server's data type definitions races the
server encoding its values (an OPC 30050 count went out typed `i=0` about half the time).
A real server is another process: this one is too. Each stdin line is a JSON call of a
method of `OpcUaMachineServer` (`{"call": "add_counts", "args": [...], "kwargs": {...}}`);
it answers `ok` or `error: ...` on stdout.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from simulators.opcua_machine import OpcUaMachineServer
from tests.processes import spawn


class MachineProcess:
    """`with MachineProcess(rate=0, model="opc30050") as machine:` then `machine.endpoint`
    and `await machine.call("set_state", "filler-02", "Held")`."""

    def __init__(self, **options: Any) -> None:
        self.process = spawn(
            [sys.executable, "-m", "tests.opcua_child", json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening "):
            self.process.kill()
            raise RuntimeError(f"the OPC UA simulator did not start: {line!r}")
        self.endpoint = line.removeprefix("listening ")

    async def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(
            json.dumps({"call": method, "args": args, "kwargs": kwargs}) + "\n"
        )
        answer = await asyncio.to_thread(self.process.stdout.readline)
        if answer.strip() != "ok":
            raise RuntimeError(f"{method} failed in the simulator: {answer.strip()}")

    def __enter__(self) -> MachineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait(10)


async def _serve(options: dict[str, Any]) -> None:
    async with OpcUaMachineServer("127.0.0.1", 0, **options) as server:
        print(f"listening {server.endpoint}", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            request = json.loads(line)
            try:
                await getattr(server, request["call"])(*request["args"], **request["kwargs"])
            except Exception as exc:  # reported to the test, which fails with it
                print(f"error: {exc!r}", flush=True)
            else:
                print("ok", flush=True)


if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1])))
