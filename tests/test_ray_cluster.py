"""A real Ray cluster: a head and a second node started with `ray start` on this machine, each
with its own resources, ports and address, as two machines would be; `inspect --engine ray --address` runs
across both, and the second node is killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from defectlens import Inspector
from defectlens.batch.engines import inspect_stream
from defectlens.cli import main
from defectlens.data.images import flatten_inputs

from .conftest import ray_worker_pids
from .servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
RAY = Path(sys.executable).parent / "ray"
# the head notices a dead node in about 2 s instead of Ray's default 30 s, so the test stays short
FAST_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                     "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


class RayCluster:
    """Two Ray nodes on this machine, each started by `ray start` on ports of its own."""

    def __init__(self) -> None:
        # Ray's token authentication, as a cluster across machines should have it: every node and
        # the driver (`inspect`) hold the same token, here Ray's own file ~/.ray/auth_token
        self.env = {"RAY_AUTH_MODE": "token"}
        self.root = Path(tempfile.mkdtemp(prefix="dl-ray-"))  # short: Ray's socket paths must fit in 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ports: dict[str, int] = {}

    def _start(self, name: str, ip: str, *role: str) -> None:
        ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                                "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")}
        low = 20000 + 200 * len(self.node_ports)  # worker ports of the node's own, so the two nodes never ask for the same one
        self.node_ports[name] = ports["--node-manager-port"]
        done = subprocess.run([str(RAY), "start", *role, "--node-ip-address", ip, "--num-cpus", "2", "--object-store-memory", str(100 << 20),
                               "--disable-usage-stats", *(str(x) for kv in ports.items() for x in kv),
                               "--min-worker-port", str(low), "--max-worker-port", str(low + 199)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **self.env, **FAST_HEALTH_CHECK})
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> RayCluster:
        # the token file, made as a local `ray.init` makes it, if no earlier Ray run left one
        subprocess.run([str(RAY), "get-auth-token", "--generate"], capture_output=True, timeout=60, check=True)
        self._start("head", "127.0.0.1", "--head", "--port", str(self.port), "--include-dashboard", "false", "--temp-dir", str(self.root))
        # an address of its own, as another machine has: the driver (this process) attaches to the
        # head's node, so what it put in the object store (the model's bytes) outlives the second
        self._start("second", "127.0.0.2", "--address", self.address)
        return self

    def raylet(self, name: str) -> int:
        found = subprocess.run(["pgrep", "-f", f"raylet.*--node_manager_port={self.node_ports[name]}"], capture_output=True, text=True).stdout.split()
        assert len(found) == 1, found
        return int(found[0])

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet and every process it started (its workers and agents): the machine is gone."""
        raylet = self.raylet(name)
        subprocess.run(["pkill", "-KILL", "-P", str(raylet)])
        os.kill(raylet, signal.SIGKILL)

    def stop(self) -> None:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env={**os.environ, **self.env})
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture()
def cluster(monkeypatch):
    c = RayCluster()
    for name, value in c.env.items():
        monkeypatch.setenv(name, value)  # this process is the driver; set before Ray reads its configuration
    pytest.importorskip("ray")
    try:
        yield c.start()
    finally:
        c.stop()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _workers_by_node(cluster: RayCluster, n: int) -> dict[str, list[int]]:
    """The inspection actors' processes, grouped by the node whose raylet started them."""
    raylets = {cluster.raylet(name): name for name in cluster.node_ports}
    grouped: dict[str, list[int]] = {}
    for pid in ray_worker_pids(n):
        grouped.setdefault(raylets.get(_parent(pid), "elsewhere"), []).append(pid)
    return grouped


def test_inspect_runs_across_two_nodes_and_survives_losing_one(cluster, model_dir, inputs, tmp_path):
    model = model_dir / "discs.dlens"
    out = tmp_path / "out"
    assert main(["inspect", str(model), *inputs, "--out", str(out), "--engine", "ray", "--address", cluster.address, "--workers", "2",
                 "--no-overlay"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len({r["source"] for r in records}) == 29

    paths = flatten_inputs(inputs)
    stream = inspect_stream(Inspector.load(model), model, paths, engine="ray", address=cluster.address, workers=2, chunk=2)
    seen = [next(stream)]
    by_node = _workers_by_node(cluster, 2)
    assert sorted(by_node) == ["head", "second"], by_node  # spread over the cluster, not packed on one node
    cluster.kill("second")  # mid-run: its chunks are run again on the head, where its actor restarts
    seen += list(stream)
    assert sorted(str(p) for p, _ in seen) == sorted(str(p) for p in paths)  # every image exactly once
    errors = [r for _, r in seen if isinstance(r, Exception)]
    assert len(errors) == 1 and "corrupt.png" in str(errors[0])
