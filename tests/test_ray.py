"""`mxconv convert --ray` (GitHub issue 17) on a multi-node Ray cluster simulated on this machine
with Ray's own `ray.cluster_utils.Cluster`: a head node that takes no tasks and worker nodes with
their own raylet, resources and worker processes (one shared cluster for the module).

- output byte-identical to the one-machine conversion (every file but mxconv.json's time and
  options; the source sha256 the nodes computed too), for BF16 and FP8 sources, a Megatron-named
  source, the TRT-LLM layout and `unshuffle`;
- a node removed (its raylet killed) while it holds a task: Ray runs the task on another node and
  the result is byte-identical;
- the driver (`mxconv convert --ray` in its own process) killed with SIGKILL while a node is in the
  middle of a task: its tasks end with it, and a rerun, with or without Ray, resumes it to the
  same bytes;
- a node that does not see DST: a clear error that names it, before any shard is written.

Per-node behaviours (not seeing a directory, pausing in the middle of a shard) come from
`ray_node/sitecustomize.py`, loaded only by the processes of the nodes the tests add for them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from cli_process import MxconvProcess
from helpers import same_conversion
from mutate import clone, edit_tensors, put_nan
from test_mapping_convert import MEGATRON_ABSENT, rename_checkpoint

from converter.errors import MxconvError, NumericsError, OutputError
from converter.files import PROVENANCE_FILE, STATE_DIR
from converter.run.cluster import make_groups
from converter.run.cluster_node import ProgressBoard, _Reporter
from converter.run.pipeline import convert
from converter.run.unshuffle import unshuffle

pytestmark = pytest.mark.ray

SHARD = "1MB"  # the tiny checkpoints become 4-7 output shards
MB = 1 << 20
NODE_SITE = str(Path(__file__).parent / "ray_node")
FAST_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500,
              "health_check_initial_delay_ms": 0}  # a killed node is declared dead in ~1.5 s, not ~15 s


class SimulatedCluster:
    def __init__(self, tmp: Path):
        import ray
        from ray.cluster_utils import Cluster

        self.ray, self.tmp = ray, tmp
        with socket.socket() as s:  # a free port for the Ray Client server (ray:// addresses)
            s.bind(("127.0.0.1", 0))
            self.client_port = s.getsockname()[1]
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, include_dashboard=False, object_store_memory=80 * MB, _system_config=FAST_DEATH,
            ray_client_server_port=self.client_port))
        self.workers = [self.add() for _ in range(2)]
        ray.init(address=self.cluster.address, log_to_driver=False)

    def add(self, **env):
        return self.cluster.add_node(num_cpus=1, object_store_memory=80 * MB,
                                     env_vars=dict(env, PYTHONPATH=NODE_SITE) if env else None)

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)

    def holding_node(self):
        """A node that pauses in its first shard once `armed` is created in its hold directory."""
        hold = self.tmp / f"hold-{time.monotonic_ns()}"
        hold.mkdir()
        return self.add(MXCONV_TEST_HOLD=str(hold)), hold

    def shutdown(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    c = SimulatedCluster(tmp_path_factory.mktemp("ray"))
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def plain(tiny_sources, tmp_path_factory):
    """One-machine conversions to compare with."""
    made = {}

    def get(kind: str, src: Path, **options) -> Path:
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp("plain") / kind
            convert(src, made[kind], max_shard_size=SHARD, quiet=True, **options)
        return made[kind]
    return get


@pytest.mark.parametrize("kind, recipe", [("bf16", "deepseek_v3_mxfp8"), ("fp8", "deepseek_v3_mxfp8_trtllm"),
                                          ("fp8_ue8m0", "deepseek_v3_bf16")])
def test_cluster_conversion_is_byte_identical(cluster, tiny_sources, plain, tmp_path, kind, recipe):
    src = tiny_sources[kind]
    want = plain(f"{kind}-{recipe}", src, recipe=recipe)
    result = convert(src, tmp_path / "dst", recipe=recipe, max_shard_size=SHARD, quiet=True, ray="auto", workers=1)
    assert result.cluster["ran_on"] == 2 and result.cluster["tasks"] >= 4
    same_conversion(tmp_path / "dst", want)
    assert json.loads((tmp_path / "dst" / PROVENANCE_FILE).read_text())["options"]["ray"] == "auto"


def test_nodes_convert_with_several_processes(cluster, tiny_sources, tmp_path):
    """Each node's task spreads its shards over conversion processes of that node, as one
    machine does (run/processes.py); temporary files carry the node's id. A node's next task
    takes the processes its last one kept, when Ray runs it in the same worker."""
    src = tiny_sources["fp8"]
    convert(src, tmp_path / "one", max_shard_size="150KB", quiet=True, processes=1)
    result = convert(src, tmp_path / "dst", max_shard_size="150KB", quiet=True, ray="auto", workers=2, processes=2)
    assert result.cluster["processes"] == 2 and result.cluster["ran_on"] == 2
    assert result.cluster["tasks"] > 2 and result.cluster["reused_processes"] > 0
    same_conversion(tmp_path / "dst", tmp_path / "one")


def test_command_line_through_a_ray_client_address(cluster, tiny_sources, plain, tmp_path):
    src = tiny_sources["fp8"]
    want = plain("fp8-deepseek_v3_mxfp8", src, recipe="deepseek_v3_mxfp8")
    result = MxconvProcess(["convert", src, tmp_path / "dst", "--max-shard-size", SHARD, "--ray",
                            f"ray://127.0.0.1:{cluster.client_port}"], tmp_path / "logs").wait(180)
    assert result.returncode == 0, result.stderr
    assert "on 2 Ray node(s)" in result.stdout
    assert "3.44M/3.44M" in result.stderr  # one progress bar, in source bytes, for the whole cluster
    same_conversion(tmp_path / "dst", want)


def test_command_line_with_a_local_ray_instance(cluster, tiny_sources, plain, tmp_path):
    """`--ray local` starts a Ray instance of its own on this machine (one node) and stops it."""
    src = tiny_sources["fp8"]
    want = plain("fp8-deepseek_v3_mxfp8", src, recipe="deepseek_v3_mxfp8")
    result = MxconvProcess(["convert", src, tmp_path / "dst", "-q", "--max-shard-size", SHARD, "--ray", "local"],
                           tmp_path / "logs").wait(180)
    assert result.returncode == 0, result.stderr
    assert "on 1 Ray node(s)" in result.stdout
    same_conversion(tmp_path / "dst", want)


def test_megatron_names_and_unshuffle_on_the_cluster(cluster, tiny_sources, plain, tmp_path):
    src = rename_checkpoint(tiny_sources["fp8"], tmp_path / "megatron", "megatron", absent=MEGATRON_ABSENT)
    want = plain("megatron", src)
    result = convert(src, tmp_path / "dst", max_shard_size=SHARD, quiet=True, ray="auto")
    assert result.mapping == "megatron" and result.cluster["ran_on"] == 2
    same_conversion(tmp_path / "dst", want)

    packed = plain("fp8-deepseek_v3_mxfp8_trtllm", tiny_sources["fp8"], recipe="deepseek_v3_mxfp8_trtllm")
    want = tmp_path / "unshuffled-plain"
    unshuffle(packed, want, max_shard_size=SHARD, quiet=True)
    result = unshuffle(packed, tmp_path / "unshuffled", max_shard_size=SHARD, quiet=True, ray="auto")
    assert result.cluster["ran_on"] == 2
    same_conversion(tmp_path / "unshuffled", want)


def wait_for(what, timeout: float = 60.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


def settled(dst: Path, quiet_s: float = 2.0, timeout: float = 60.0) -> None:
    """Wait until nothing in `dst` has appeared, gone or grown for `quiet_s`: a dead driver's
    tasks on other nodes end on Ray's own timing, and one may finish its shard meanwhile."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while True:
        try:
            now = sorted((str(p), p.stat().st_size) for p in dst.rglob("*") if p.is_file())
        except FileNotFoundError:  # gone between the listing and its stat: a change
            now = None
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_node_lost_in_the_middle_of_a_task(cluster, tiny_sources, plain, tmp_path):
    src = tiny_sources["bf16"]
    want = plain("bf16-deepseek_v3_mxfp8", src, recipe="deepseek_v3_mxfp8")
    node, hold = cluster.holding_node()
    (hold / "armed").touch()
    lost = []

    def kill_when_held():  # cold workers on a loaded 2-core machine took 90 s to the first shard
        wait_for(lambda: (hold / "held.pid").exists(), timeout=400)
        lost.append(sorted(p.name for p in (tmp_path / "dst").glob("*.safetensors")))
        cluster.remove(node)

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    try:
        with pytest.warns(UserWarning, match=f"node {node.node_id[:8]}.* was lost"):
            result = convert(src, tmp_path / "dst", max_shard_size=SHARD, quiet=True, ray="auto", workers=1)
    finally:
        (hold / "release").touch()
        killer.join(5)
    assert lost, "the node was not removed while it held a shard"
    assert result.cluster["lost_nodes"] and result.cluster["moved"] >= 1
    same_conversion(tmp_path / "dst", want)
    assert not list((tmp_path / "dst" / STATE_DIR).glob("*.partial"))


@pytest.mark.parametrize("rerun", ["ray", "plain"])
def test_driver_killed_then_rerun_resumes_byte_identical(cluster, tiny_sources, plain, tmp_path, rerun):
    src = tiny_sources["bf16"]
    want = plain("bf16-deepseek_v3_mxfp8", src, recipe="deepseek_v3_mxfp8")
    node, hold = cluster.holding_node()
    dst = tmp_path / "dst"
    argv = ["convert", src, dst, "-q", "--max-shard-size", SHARD, "--workers", "1", "--ray",
            cluster.cluster.address]
    try:
        (hold / "armed").touch()
        driver = MxconvProcess(argv, tmp_path / "logs")
        wait_for(lambda: (hold / "held.pid").exists() and any(dst.glob("*.safetensors")) or not driver.alive(),
                 timeout=400)  # cold workers on a loaded 2-core machine: 90 s to the first shard
        assert driver.alive(), driver.wait().stderr
        driver.kill()
        held = int((hold / "held.pid").read_text())
        # Ray ends the tasks of a driver that died: the one that held its shard goes with it
        wait_for(lambda: not os.path.exists(f"/proc/{held}") or "Z" in open(f"/proc/{held}/stat").read().split()[2],
                 timeout=30)
    finally:
        (hold / "release").touch()
        cluster.remove(node)
    settled(dst)
    assert not (dst / PROVENANCE_FILE).exists()
    done = len(list(dst.glob("*.safetensors")))
    assert 0 < done < len(list(want.glob("*.safetensors")))
    result = convert(src, dst, max_shard_size=SHARD, quiet=True, workers=1, ray="auto" if rerun == "ray" else None)
    assert result.skipped_shards == done
    same_conversion(dst, want)
    assert not [p for p in dst.rglob("*") if p.suffix in (".partial", ".tmp")]


def test_node_that_does_not_see_the_destination_is_named(cluster, tiny_sources, tmp_path):
    dst = tmp_path / "out" / "dst"
    blind = cluster.add(MXCONV_TEST_HIDE=str(tmp_path / "out"))
    try:
        where = re.escape(str(dst))
        with pytest.raises(OutputError, match=f"node {blind.node_id[:8]} .*cannot see the destination {where}") as e:
            convert(tiny_sources["fp8"], dst, max_shard_size=SHARD, quiet=True, ray="auto")
    finally:
        cluster.remove(blind)
    assert "same paths" in str(e.value)
    for node in cluster.workers:  # the nodes that see it are not blamed
        assert node.node_id[:8] not in str(e.value)
    assert not list(dst.glob("*.safetensors")) and not (dst / PROVENANCE_FILE).exists()


def test_error_in_a_task_names_the_file_tensor_and_node(cluster, tiny_sources, tmp_path):
    """A NaN in a source tensor stops the run with the one-machine error, the node added; DST
    is left resumable, without a marker or temporary files."""
    src = clone(tiny_sources["fp8"], tmp_path / "src")
    edit_tensors(src, put_nan("model.layers.2.mlp.experts.3.up_proj.weight"))
    dst = tmp_path / "dst"
    with pytest.raises(NumericsError, match=r"file .*model-0000\d-of-00003.safetensors, tensor "
                                            r"model.layers.2.mlp.experts.3.up_proj.weight: .*\(on node "):
        convert(src, dst, max_shard_size=SHARD, quiet=True, ray="auto")
    assert not (dst / PROVENANCE_FILE).exists()
    assert not [p for p in dst.rglob("*") if p.suffix in (".partial", ".tmp")]


def test_device_cuda_runs_only_on_nodes_with_gpus_and_asks_ray_for_them(cluster, tiny_sources, tmp_path):
    """With --device cuda each task asks Ray for a node's GPUs: only the node that has any (in
    Ray's resources; this machine has no real one) gets work, and its task, seeing none through
    torch, fails with the one-machine error, naming the node."""
    gpu_node = cluster.cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=80 * MB)
    try:
        with pytest.raises(MxconvError, match=f"no CUDA device is available \\(on node {gpu_node.node_id[:8]}"):
            convert(tiny_sources["fp8"], tmp_path / "dst", max_shard_size=SHARD, quiet=True, ray="auto",
                    device="cuda")
    finally:
        cluster.remove(gpu_node)


def test_unreachable_address_fails_fast(monkeypatch, tmp_path, tiny_sources):
    pytest.importorskip("ray")
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    start = time.monotonic()
    with pytest.raises(MxconvError, match=r"no Ray cluster answers at [\d.]+:9\b"):
        convert(tiny_sources["fp8"], tmp_path / "dst", ray="127.0.0.1:9")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "dst").exists()


def test_a_client_server_that_dies_as_it_starts_is_asked_for_again(monkeypatch):
    """The proxier of a ray:// address forks a server per client, which sometimes dies at once
    ("Starting Ray client server failed"): connect() tries again, twice at most; any other
    failure is reported at once, as one line naming the address."""
    from converter.run import cluster

    calls = []

    class FakeRay:
        def __init__(self, failures, message):
            self.failures, self.message = failures, message

        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs["address"])
            if calls.count(kwargs["address"]) <= self.failures:
                raise RuntimeError(self.message)

        def shutdown(self):
            calls.append("shutdown")

    monkeypatch.setattr(cluster, "_check_reachable", lambda address: None)
    died = "Initialization failure from server: RuntimeError: Starting Ray client server failed. See logs."
    zombie = ("Initialization failure from server: ... line 396, in start_specific_server ... "
              "psutil.ZombieProcess: PID still exists but it's a zombie")
    for failures, ok, flaky in ((1, True, died), (2, True, zombie), (3, False, died)):
        calls.clear()
        monkeypatch.setattr(cluster, "import_ray", lambda: FakeRay(failures, flaky))
        if ok:
            with cluster.connect("ray://127.0.0.1:1") as ray:
                assert isinstance(ray, FakeRay)
            assert calls.count("ray://127.0.0.1:1") == failures + 1
        else:
            with pytest.raises(MxconvError, match="cannot connect to the Ray cluster at 'ray://127.0.0.1:1'"):
                with cluster.connect("ray://127.0.0.1:1"):
                    pass
            assert calls.count("ray://127.0.0.1:1") == 3
    calls.clear()
    monkeypatch.setattr(cluster, "import_ray", lambda: FakeRay(1, "Version mismatch: the cluster runs Ray 2.9"))
    with pytest.raises(MxconvError, match="Version mismatch"):
        with cluster.connect("ray://127.0.0.1:1"):
            pass
    assert calls == ["ray://127.0.0.1:1"]


def test_progress_board_counts_a_retried_task_once():
    board = ProgressBoard()

    class Remote:  # what a task holds: an actor handle, whose calls it does not wait for
        set = type("Method", (), {"remote": staticmethod(board.set)})

    first = _Reporter(Remote, "group-3", 0)
    for _ in range(4):
        first.add(10)
    first.send()
    assert board.total() == 40
    retry = _Reporter(Remote, "group-3", 25)  # its node was lost; the retry skips a finished shard
    retry.add(15)
    retry.send()
    assert board.total() == 40


def test_without_ray_the_option_says_how_to_install_it(tiny_sources, tmp_path, monkeypatch, capsys):
    import sys

    from converter.cli import _run_app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    with pytest.raises(MxconvError, match=r"pip install 'mxconv\[ray\]'"):
        convert(tiny_sources["fp8"], tmp_path / "dst", ray="auto")
    assert not (tmp_path / "dst").exists()
    monkeypatch.setattr(sys, "argv", ["mxconv", "convert", str(tiny_sources["fp8"]), str(tmp_path / "dst"),
                                      "--ray", "auto"])
    assert _run_app() == 1
    assert "mxconv: error: --ray needs Ray" in capsys.readouterr().err


def test_groups_are_consecutive_and_balanced():
    class Shard:
        def __init__(self, name, size):
            self.name, self.jobs = name, [type("Job", (), {"input_bytes": size})()]

    shards = [Shard(i, s) for i, s in enumerate([5, 5, 5, 5, 1, 1, 1, 1, 9, 5, 5, 5])]
    for count in (1, 2, 3, 5, 12, 40):
        groups = make_groups(shards, count)
        assert [s.name for g in groups for s in g] == list(range(12))
        assert 1 <= len(groups) <= min(count, 12) and all(groups)
    sizes = [sum(s.jobs[0].input_bytes for s in g) for g in make_groups(shards, 3)]
    assert max(sizes) - min(sizes) <= 9


def test_megatron_dcp_source_on_the_cluster(cluster, dcp_sources, tmp_path):
    """A training checkpoint (Megatron torch_dist, with --config) converted by the nodes equals
    its one-machine conversion; the provenance hashes the .metadata, as on one machine."""
    src, config = dcp_sources["megatron"], dcp_sources["hf"]
    want = tmp_path / "plain"
    convert(src, want, config=config, max_shard_size=SHARD, quiet=True)
    result = convert(src, tmp_path / "dst", config=config, max_shard_size=SHARD, quiet=True, ray="auto", workers=1)
    assert result.cluster["ran_on"] == 2
    same_conversion(tmp_path / "dst", want, all_hashed=False)
    hashed = {n for n, v in json.loads((tmp_path / "dst" / PROVENANCE_FILE).read_text())["source"]["shards"].items()
              if v["sha256"]}
    assert hashed == {".metadata"}
