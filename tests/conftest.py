"""Shared fixtures: small data made by the tests themselves, and the optional real data."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest

from defectlens.data.synthetic import make_synthetic_dataset
from defectlens.inference.tuning import TUNING_ENV

# a tuning stored on the developer's machine changes speed only, but the suite runs as CI does
os.environ.setdefault(TUNING_ENV, "off")

# `make test` runs two pytest-xdist workers on two cores: each gets its share of the cores for its
# thread pools (and passes it to the servers and CLIs it starts), so the two never oversubscribe them
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_share))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_category(relative: str) -> Path:
    """A real data set category from ../shared, or skip the test cleanly when it is absent."""
    path = SHARED / relative
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data set not available: {path}")
    return path


# Big sets are capped (training images, and defective test images: every good test image is
# kept, as the false-reject rate is measured on them) to keep the suite short on 2 cores;
# `defectlens fit` + `evaluate` on the full sets give the figures quoted in the docs.
CALIBRATION_SETS = {"mvtec_ad/bottle": None, "magnetic_tile/magnetic_tile": 240, "deeppcb/pcb": 240}
MAX_DEFECTS = 150


@functools.cache
def calibrated_patchcore(category: str):
    """Default PatchCore fitted and calibrated at a 1 % target on held-out good images, as
    `defectlens fit --detector patchcore` does, and the data set it was made from: made once per
    category for every test that reads it (bottle's accuracy, its false rejects and its ONNX
    export come from the same model)."""
    from defectlens import create_detector, load_dataset
    from defectlens.calibration.settings import CalibrationSettings
    from defectlens.workflows.fitting import fit_calibrated

    cap = CALIBRATION_SETS[category]
    ds = load_dataset(shared_category(category), validation_fraction=0.1)  # what `defectlens fit` does
    if cap is not None:
        rng = random.Random(0)
        good = rng.sample(ds.train_good + ds.validation, cap)
        ds.train_good, ds.validation = good[cap // 5 :], good[: cap // 5]
        defects = [s for s in ds.test if s.label]
        ds.test = [s for s in ds.test if not s.label] + rng.sample(defects, min(MAX_DEFECTS, len(defects)))
    bundle = fit_calibrated(create_detector("patchcore"), ds.train_good, ds.validation, CalibrationSettings(target_frr=0.01), scheme="holdout")
    return bundle, ds


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small generated MVTec-layout category (64 px discs with scratches and spots)."""
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root, n_train=16, n_test_good=4, n_test_defect=4, size=64, seed=1)


CHROMIUM = Path("/usr/bin/chromium")
# Flags for a closed network: without them Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. `make test` installs it; elsewhere the
    browser tests skip, unless DEFECTLENS_REQUIRE_BROWSER=1 (set by CI) makes its absence fail."""
    import os

    required = os.environ.get("DEFECTLENS_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (make setup does)")
        pytest.skip(f"{CHROMIUM} is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def inputs(tiny_dataset, tmp_path):
    """The tiny data set's images plus one corrupt file: what a batch inspection is given."""
    bad = tmp_path / "in" / "corrupt.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return [str(tiny_dataset / "test"), str(tiny_dataset / "train"), str(bad)]


def ray_worker_pids(n: int = 2, timeout_s: float = 60) -> list[int]:
    """The processes of the Ray inspection actors, once exactly ``n`` are up (or none found in time):
    an earlier Ray test's actors can outlive its teardown for a moment, and counting them too made
    the killed-worker test see four workers where its run had two (once in five full runs)."""
    import subprocess
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-f", "ray::InspectWorker"], capture_output=True, text=True).stdout.split()
        if len(found) == n:
            return [int(p) for p in found]
        time.sleep(0.2)
    return []


@pytest.fixture(scope="session")
def model_dir(tiny_dataset, tmp_path_factory) -> Path:
    """A folder holding one small calibrated model, ``discs.dlens``, as a service would be given."""
    from defectlens.cli import main

    folder = tmp_path_factory.mktemp("models")
    assert main(["fit", str(tiny_dataset), "-o", str(folder / "discs.dlens"), "--validation-fraction", "0.25",
                 "--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]) == 0
    return folder


def _postgres_bin() -> Path | None:
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class PostgresCluster:
    """A throw-away PostgreSQL cluster on loopback that a test may stop and start again."""

    def __init__(self, bindir: Path) -> None:
        import os
        import pwd
        import subprocess
        import tempfile

        from .servers import free_port

        # The server refuses to run as root; pytest's own temp folders are private to root.
        self.root = Path(tempfile.mkdtemp(prefix="defectlens-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.bindir = bindir
        self.port = free_port()
        self.data = self.root / "data"
        subprocess.run([*self.prefix, str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def start(self) -> PostgresCluster:
        import subprocess

        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start"],
                       check=True, capture_output=True)
        return self

    def stop(self, mode: str = "immediate") -> None:
        import subprocess

        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop"], capture_output=True)

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        import uuid

        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"


def _postgres_cluster() -> PostgresCluster:
    """Skips where the server is absent, unless DEFECTLENS_REQUIRE_POSTGRES=1 (set by CI)."""
    import os

    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("DEFECTLENS_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries are missing: install Debian's postgresql package (make test does)")
        pytest.skip("PostgreSQL server is not installed")
    return PostgresCluster(bindir).start()


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on loopback, from Debian's postgresql package (`make test` installs it)."""
    cluster = _postgres_cluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture()
def postgres_cluster():
    """A server of the test's own, for tests that stop and start it."""
    cluster = _postgres_cluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture()
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the test server for each test."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


class Mosquitto:
    """Debian's MQTT broker on a loopback port, with persistence, so a test can kill and restart it."""

    def __init__(self, root: Path) -> None:
        from .servers import free_port

        self.root = root
        self.port = free_port()
        self.conf = root / "mosquitto.conf"
        import os

        # Started as root, the broker would drop to its own user, which cannot reach pytest's private
        # temporary folders: it then keeps no persistence, and a restart forgets its subscribers.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {root}/\nautosave_interval 1\nlog_dest stdout\n")
        self.proc = None

    def start(self) -> Mosquitto:
        import socket
        import subprocess
        import time

        self.log = self.root / "mosquitto.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture()
def mosquitto(tmp_path):
    """A broker the test may stop and start again. Skips where Debian's mosquitto is absent,
    unless DEFECTLENS_REQUIRE_MOSQUITTO=1 (set by CI)."""
    import os

    if not Path("/usr/sbin/mosquitto").exists():
        if os.environ.get("DEFECTLENS_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("/usr/sbin/mosquitto is missing: install Debian's mosquitto package (make test does)")
        pytest.skip("mosquitto is not installed")
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Mosquitto(folder).start()
    yield broker
    broker.stop()
