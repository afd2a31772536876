"""A Ray cluster of several nodes on this machine, started with Ray's own `ray start`.

Each node is one `ray start --block` process with its own --temp-dir under a private
folder, its own ports and its own CPU count, so the cluster has one raylet per node as on
separate machines. Drivers join it with `env` and `address`.

Stopping never runs `ray stop`, which stops every Ray process of the machine, other users'
included. It sends SIGTERM to the `ray start` processes started here, whose shutdown
stops their raylets and workers, and then kills by PID any process that still carries
this cluster's RAY_AUTH_TOKEN_PATH in its environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Ray puts Unix sockets under <temp-dir>/session_<date>_<pid>/sockets/, and a socket path
# may be at most 107 bytes long, so the root folder must have a short path.
ROOT_PREFIX = "groupim-ray-"
OBJECT_STORE_BYTES = 256 * 1024**2  # per node; Ray's default is 30 % of the machine's memory
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


# Ports handed out in this process. A port released by free_port() may be handed out again
# before the Ray process it was chosen for binds it, so each port is given out only once.
_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago and not returned before."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


@dataclass
class LocalRayCluster:
    """Ray head and worker nodes on this machine; use as a context manager."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=ROOT_PREFIX)))
    port: int = field(default_factory=free_port)  # the GCS port of the head
    extra_env: dict[str, str] = field(default_factory=dict)  # for the nodes, their workers and drivers
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        token_path = self.root / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        # Ray 2.60 enables token authentication for a head that finds ~/.ray/auth_token.
        # A token of our own keeps this cluster independent of that file and of other clusters.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            **self.extra_env,
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start_head(self, *, num_cpus: int = 1, num_gpus: int = 0) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false"], num_cpus, num_gpus)
        _wait_for_port(self.port, START_TIMEOUT_S, self.processes[-1], self.log_path("head"))

    def add_node(self, name: str, *, num_cpus: int = 1, num_gpus: int = 0, private_folder: Path | None = None) -> None:
        """Start a worker node, which finds an empty folder of its own at private_folder if given.

        The private folder is a tmpfs mounted over that path in a mount namespace of the
        node's processes only (util-linux unshare, which needs root). Files that the driver
        writes there are then invisible to this node, as on a separate machine.
        """
        wrap = None
        if private_folder is not None:
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs -o size=16m groupim-private "$0" && exec "$@"', str(private_folder)]
        self._start(name, [f"--address={self.address}"], num_cpus, num_gpus, wrap=wrap)

    def _start(self, name: str, role_args: list[str], num_cpus: int, num_gpus: int, wrap: list[str] | None = None) -> None:
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *role_args,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / name}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--disable-usage-stats",
        ]
        if wrap is not None:
            command = wrap + command
        log = open(self.log_path(name), "w")
        self.processes.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        log.close()

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def wait_for_nodes(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until `count` nodes are alive, checked by a driver that joins the cluster."""
        script = (
            "import sys, time, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
            "    if time.monotonic() > deadline:\n"
            "        sys.exit(f'only {sum(n[\"Alive\"] for n in ray.nodes())} nodes alive')\n"
            "    time.sleep(0.5)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, self.address, str(count), str(timeout_s)],
            env=self.env, capture_output=True, text=True, timeout=timeout_s + 60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"the Ray cluster did not reach {count} nodes: {result.stderr[-2000:]}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Stop the nodes started here and remove the root folder."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.leftover_pids():
            _kill(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """PIDs of live processes that carry this cluster's token path in their environment."""
        marker = f"RAY_AUTH_TOKEN_PATH={self.env['RAY_AUTH_TOKEN_PATH']}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Ray head did not open port {port} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
