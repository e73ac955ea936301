"""Shared helpers: tiny configs on the bundled demo data, run in-process or through the CLI."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# One thread per torch process: `make test` runs two pytest processes on the two cores, beside
# Ray's workers and the CLI's subprocesses, and OpenMP threads spin-waiting for a busy core slow
# every process by several times (a tiny model is no faster on two threads even alone). Set
# before torch is first imported; subprocesses and Ray's workers inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from ftdist.config.load import apply_override, validate_config  # noqa: E402
from ftdist.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# Credentials for the loopback S3 server (moto accepts any). Set before anything starts, so
# Ray's processes inherit them as a cluster's nodes would; tests check the secret never shows.
FAKE_KEY_ID = "AKIAFTDISTTEST000001"
FAKE_SECRET = "ftdist-test-secret-q8v3NwLk1Zx"
os.environ.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")


# `make test` runs the suite in two pytest processes (pytest-xdist, --dist loadgroup). Every test
# that starts or joins Ray carries ONE_RAY_AT_A_TIME and runs in one of them, one after another:
# the session's Ray is shared there, and a test's own cluster never overlaps it (Ray's State API,
# which Ray Train's placement-group cleaner polls, finds "the" local cluster through /tmp/ray).
ONE_RAY_AT_A_TIME = pytest.mark.xdist_group("ray")

# One prepared-data cache per pytest process, as one machine's runs share theirs: the many runs
# of the same demo data tokenize it once. It is keyed by content, so a test never sees another's
# rows; tests of the cache itself give each run its own (storage.cache_dir under tmp_path).
PREPARED_CACHE = Path(tempfile.mkdtemp(prefix="ftdist-test-cache-"))
atexit.register(shutil.rmtree, PREPARED_CACHE, True)


def tiny_config(tmp_path: Path, *overrides: str, name: str = "t") -> Config:
    """A run of a few seconds: tiny Llama, bundled digit-reversal data, 30 steps."""
    raw = {
        "run": {"name": name, "output": str(tmp_path / "runs")},
        "model": {"init": {"arch": "llama", "hidden_size": 64, "num_layers": 4, "num_heads": 4, "vocab_size": 384}},
        "method": "full",
        "freeze_layers": 0,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
        "data": {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl"), "max_length": 64},
        "train": {"lr": 3e-3, "max_steps": 30, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 5,
                  "eval_every": 15, "log_every": 10},
        "checkpoint": {"every_steps": 10, "keep": 2},
        "storage": {"cache_dir": str(PREPARED_CACHE)},
    }
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def write_config(tmp_path: Path, cfg: Config, filename: str = "config.yaml") -> Path:
    import yaml

    path = tmp_path / filename
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


# Every line ftdist itself prints while it trains (stdout and stderr): a line that matches none
# is a library's, which the user should never have to read.
FTDIST_LINE = re.compile(
    r"^(plan: |memory \(estimate\): |model: |data: |regularization: |step \d+|checkpoint step \d+ complete|"
    r"resuming from |stopping: |done: |"
    r"  (eval_\w+|forgetting|"
    r"negative transfer|metrics): |.* is already finished|ftdist: )")

# `ftdist ARGS` in a subprocess that reports at exit which heavy libraries it imported.
IMPORT_PROBE = """
import sys
from ftdist.cli import main
code = main(sys.argv[1:])
loaded = [m for m in ("torch", "transformers", "peft", "deepspeed", "ray") if sys.modules.get(m) is not None]
print("imported: " + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def run_cli_probed(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Like run_cli, and the set of heavy libraries the command imported (its probe line removed)."""
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    probe = [x for x in result.stderr.splitlines() if x.startswith("imported: ")]
    assert probe, result.stderr
    result.stderr = "".join(x + "\n" for x in result.stderr.splitlines() if not x.startswith("imported: "))
    return result, set(filter(None, probe[-1].removeprefix("imported: ").split(",")))


def foreign_lines(*outputs: str) -> list[str]:
    """The lines of the outputs that ftdist did not print."""
    return [x for out in outputs for x in out.splitlines() if x.strip() and not FTDIST_LINE.match(x)]


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftdist", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def start_cli(*args: str) -> subprocess.Popen:
    """The CLI in the background, stdout and stderr together (for tests that kill it)."""
    return subprocess.Popen([sys.executable, "-m", "ftdist", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """The condition's first true value, polled for at most `timeout` seconds. Past that, `proc`
    (the run being waited on) is killed, so that it holds no Ray resources the next tests need,
    and the failure shows the end of what it printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    printed = ""
    if proc is not None:
        proc.kill()
        printed = ":\n" + (proc.communicate(timeout=30)[0] or "")[-4000:]
    raise AssertionError(f"timed out waiting for {what}{printed}")


@contextmanager
def paused(pids: list[int]):
    """The processes stopped (SIGSTOP) for the block and continued after (those still alive).

    What a test reads and kills inside the block cannot race the run: no step is taken and no
    checkpoint completes while it looks. This is how a kill lands between two checkpoints by
    construction rather than by timing, on a loaded machine too."""
    import psutil

    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    for pid in stopped:  # SIGSTOP is asynchronous: wait until each is really stopped
        try:
            wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 30, f"process {pid} to stop")
        except psutil.NoSuchProcess:
            pass
    try:
        yield
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def train_worker_pids(cluster: str | int) -> list[int]:
    """The Ray Train workers of one Ray cluster on this machine (every node of a local cluster):
    `cluster` is its session directory (`ray_session_dir()`), which its raylet's command line
    names, or the pid of the process that started it. Other clusters run beside the session's
    (`ray job submit`'s own head), so a test must never take their workers for its own."""
    import psutil

    def ours(process) -> bool:
        try:
            ancestors = process.parents()
            if isinstance(cluster, int):
                return any(a.pid == cluster for a in ancestors)
            return any(cluster in " ".join(a.cmdline()) for a in ancestors)
        except psutil.Error:
            return False

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and ours(p)]


def ray_session_dir() -> str:
    """The session directory of the Ray this process joined (its raylet's command line names it)."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory):
    """A tiny base model "pretrained" on general English text, per architecture.

    Adapters on random weights barely move the loss; on a base that knows some language
    they learn the new task, as they do on a real pretrained LLM.
    """
    built: dict[tuple[str, bool], Path] = {}

    def get(arch: str = "llama", tied: bool = False) -> Path:
        """`tied`: the LM head tied to the input embeddings (tie_word_embeddings), as SmolLM2's."""
        if (arch, tied) not in built:
            import json

            from ftdist.launch.local import train_local

            name = f"base-{arch}" + ("-tied" if tied else "")
            tmp = tmp_path_factory.mktemp(name)
            corpus = tmp / "general.jsonl"
            paragraphs = [p for p in (DEMO / "general.txt").read_text().split("\n\n") if p.strip()]
            corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs * 4))
            cfg = tiny_config(tmp, f"model.init.arch={arch}", f"model.init.tie_word_embeddings={str(tied).lower()}",
                              f"data.train={corpus}", "data.eval=null", "data.eval_fraction=0", "train.max_steps=40",
                              "checkpoint.every_steps=1000", name=name)
            built[arch, tied] = Path(train_local(cfg, show_progress=False)["final_dir"])
        return built[arch, tied]

    return get


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for every Ray test of the session (start-up costs seconds)."""
    import ray

    from ftdist.launch.ray_train import connect

    # With the dashboard: Ray Train's placement-group cleaner polls the State API it serves.
    # 4 logical CPUs on the 2 cores: test_distributed runs two 2-worker trainers at a time.
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    connect(None)  # ftdist's driver set-up (quiet streams) on the running instance
    yield ray
    ray.shutdown()


def small_data(tmp_path: Path, train_rows: int = 32, eval_rows: int = 16) -> tuple[Path, Path]:
    """The first rows of the demo data, for runs whose batches must be known exactly."""
    out = []
    for name, n in (("train", train_rows), ("eval", eval_rows)):
        path = tmp_path / f"{name}-{n}.jsonl"
        path.write_text("".join((DEMO / f"{name}.jsonl").read_text().splitlines(keepends=True)[:n]))
        out.append(path)
    return out[0], out[1]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A local run's complete checkpoint directories, oldest first."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real S3 server (moto_server) on a free loopback port, for the whole session."""
    from tests.s3server import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, for the whole session (each test its own
    experiment)."""
    from tests.trackers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.kill()


@dataclass
class S3:
    """One test's bucket, reached through a relay the test can take down (`relay.down()`);
    `fs` talks to the server directly, so the test can look while the relay is down."""

    server: object
    relay: object
    bucket: str
    cache: Path

    @property
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.server.url, use_listings_cache=False, skip_instance_cache=True)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def overrides(self, output: str = "runs") -> list[str]:
        return [f"run.output={self.url(output)}", f"storage.endpoint_url={self.relay.url}",
                "storage.region=us-east-1", f"storage.cache_dir={self.cache}"]

    def put(self, local: Path, *parts: str) -> str:
        self.fs.put(str(local), self.url(*parts), recursive=local.is_dir())
        return self.url(*parts)


@pytest.fixture
def s3(moto_server, tmp_path):
    from tests.s3server import Relay

    moto_server.reset()
    relay = Relay(moto_server.port)
    store = S3(moto_server, relay, "ftdist-test", tmp_path / "cache")
    store.fs.mkdir(store.bucket)
    yield store
    relay.down()
