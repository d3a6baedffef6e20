"""`mxconv convert SRC DST --ray ADDRESS`: one conversion spread over the nodes of a Ray cluster
that share a file system (`cluster_node.py` holds what runs on the nodes).

The driver (the process that calls `convert`) plans once and prepares DST as on one machine
(lock, resume manifest), then:

1. checks that every alive node sees SRC and DST at the same paths as the driver (a token file
   it writes into DST's state directory, the sizes of SRC's files, the hash of its config and
   index) and runs the same mxconv version; when one does not, the error names it and nothing
   is written;
2. cuts the shards left to write into groups of consecutive shards, a few per node, and hands
   them out one group per node at a time (soft node affinity), so that faster nodes take more;
   each group is a Ray task that runs the one-machine executor on its node. A task whose node
   is lost is retried by Ray on another node, where it skips the shards already finished;
3. shows one progress bar in source bytes for the whole cluster (tasks post their counts to a
   small actor that the driver reads);
4. checks that it sees every shard, then writes the side files, index, config and provenance
   last, as on one machine; each source file is hashed by the first task that reads it.

A driver that dies takes its tasks with it (Ray ends a job's tasks when its driver exits) and
leaves DST as an interrupted one-machine run does: a rerun, with or without Ray, resumes it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from converter.errors import MxconvError, MxconvWarning, OutputError, SourceError
from converter.files import CONFIG_FILE, INDEX_FILE, STATE_DIR
from converter.plan.planner import ShardPlan
from converter.run import cluster_node
from converter.run.cluster_node import SourceSpec, Token, file_sha256
from converter.run.output import shard_is_done
from converter.run.writer import write_bytes_atomic
from converter.sources.checkpoint import SourceCheckpoint
from converter.version import __version__

GROUPS_PER_NODE = 4  # tasks per node at the start: enough to even out fast and slow nodes
MAX_RETRIES = 3  # Ray's retries of a task whose worker or node died
_CHECK_TIMEOUT = 120.0  # seconds for every node to answer the check
_TICK = 0.25  # seconds between looks at the tasks, the nodes and the progress board
_NODE_POLL = 1.0
_NO_NODE_GRACE = 60.0  # seconds with work left and no node to run it before giving up
_CANCEL_WAIT = 10.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise MxconvError("--ray needs Ray, which is not installed here: pip install 'mxconv[ray]' "
                          "(the Ray version the cluster runs)") from None
    return ray


# A ray:// client's server-side process (the proxier forks one per client) sometimes dies as it
# starts (seen in one of five to eight connections to a local 2-node test cluster: "Starting Ray
# client server failed", or the proxier tripping over its zombie in start_specific_server); a new
# connection gets a new one.
_TRANSIENT = ("Starting Ray client server failed", "start_specific_server")
_CLIENT_ATTEMPTS = 3


@contextmanager
def connect(address: str):
    """Ray, connected: `auto` (the cluster this machine belongs to), `local` (a new Ray instance
    on this machine), a `ray://` client address or a GCS address. A Ray session the caller has
    already started is used as it is and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address != "local":
        _check_reachable(address)
    for attempt in range(_CLIENT_ATTEMPTS):
        try:
            if address == "local":
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            break
        except Exception as e:  # ConnectionError, ValueError, RuntimeError... all say the same to the user
            if any(t in str(e) for t in _TRANSIENT) and attempt + 1 < _CLIENT_ATTEMPTS:
                ray.shutdown()
                continue
            raise MxconvError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds where nothing listens at the address (ray.init would retry for minutes),
    e.g. `auto` finding the address file of a cluster that is gone."""
    where = address.split("://", 1)[1] if "://" in address else address
    try:
        if "://" not in address:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            where = canonicalize_bootstrap_address_or_die(address)
        host, _, port = where.rpartition(":")
        port = int(port)
    except ConnectionError as e:  # `auto` and no cluster on this machine
        raise MxconvError(f"no Ray cluster found for --ray {address}: {e}") from None
    except Exception:  # an address form (or a Ray version) this does not know: ray.init decides
        return
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        found = f" (the address --ray {address} found)" if where != address else ""
        raise MxconvError(f"no Ray cluster answers at {where}{found}: {e.strerror or e}; start one (`ray start "
                          "--head`) or give the address of a running one") from None


def check_device(device: str) -> None:
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise MxconvError(f"unsupported --device {device!r}; use cpu, cuda or cuda:N")


def source_spec(ckpt: SourceCheckpoint, opener, fingerprint: dict) -> SourceSpec:
    root = ckpt.root
    files = []
    for name in (CONFIG_FILE, INDEX_FILE):  # small: compared by content
        if (root / name).is_file():
            files.append((name, (root / name).stat().st_size, file_sha256(root / name)))
    for path in ckpt.files:
        files.append((_relative(path, root), path.stat().st_size, None))
    key = json.dumps(fingerprint, sort_keys=True)
    return SourceSpec(str(root), opener, str(uuid.uuid5(uuid.NAMESPACE_OID, key)), tuple(files))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(Path(path).absolute())


def make_groups(shards: list[ShardPlan], count: int) -> list[list[ShardPlan]]:
    """The shards in plan order, cut into at most `count` runs of consecutive shards with about
    the same source bytes each."""
    sizes = [sum(j.input_bytes for j in s.jobs) for s in shards]
    total, before, groups = sum(sizes), 0, {}
    for shard, size in zip(shards, sizes):
        k = min(count - 1, int((before + size / 2) * count / total)) if total else 0
        groups.setdefault(k, []).append(shard)
        before += size
    return [groups[k] for k in sorted(groups)]


def hash_owners(groups: list[list[ShardPlan]], view, ckpt: SourceCheckpoint) -> tuple[list[list[str]], list[str]]:
    """Which task hashes which source file: the first group that reads it (its node reads the
    file anyway, so the disk serves it once); and the files no group reads."""
    owner: dict[Path, int] = {}
    for k, group in enumerate(groups):
        for shard in group:
            for job in shard.jobs:
                for name in job.inputs:
                    for file in view.source_files(name):
                        owner.setdefault(Path(file), k)
    owned: list[list[str]] = [[] for _ in groups]
    rest = []
    for path in ckpt.hashed_files:
        k = owner.get(Path(path))
        (owned[k] if k is not None else rest).append(_relative(path, ckpt.root))
    return owned, rest


def _usable(ray, device: str) -> dict[str, dict]:
    need = "GPU" if device.startswith("cuda") else "CPU"
    return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive") and (n.get("Resources") or {}).get(need, 0) >= 1}


def _label(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node.get('NodeManagerHostname') or '?'}, {node.get('NodeManagerAddress')})"


def _pinned(ray, node_id: str, soft: bool):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=soft)


def _start_checks(ray, nodes: dict[str, dict], spec: SourceSpec, dst: str, token: Token) -> dict:
    check = ray.remote(cluster_node.check_node)
    return {check.options(num_cpus=0, max_retries=0, scheduling_strategy=_pinned(ray, nid, False)).remote(
        spec, dst, token): nid for nid in nodes}


def _check_problems(ray, ref, node: dict) -> list[tuple[str, str]] | None:
    """(kind, text) of what is wrong with a node, from its check task; None: the node is gone."""
    try:
        answer = ray.get(ref, timeout=0)
    except ray.exceptions.TaskUnschedulableError:  # pinned to a node that no longer exists
        return None
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        return [("node", f"{_label(node)} cannot run mxconv: {type(cause).__name__}: {str(cause).splitlines()[0]}")]
    problems = [("node", f"{_label(node)} runs mxconv {answer['version']}, the driver {__version__}")
                ] if answer["version"] != __version__ else []
    return problems + [("destination" if "destination" in p or "write" in p else "source", f"{_label(node)} {p}")
                       for p in answer["problems"]]


def check_nodes(ray, nodes: dict[str, dict], spec: SourceSpec, dst: str, token: Token) -> dict[str, dict]:
    """The nodes still there, once every one is found to see SRC and DST as the driver does; or
    an error that names each that does not."""
    refs = _start_checks(ray, nodes, spec, dst, token)
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=_CHECK_TIMEOUT)
    problems, gone = [], set()
    for ref in ready:
        found = _check_problems(ray, ref, nodes[refs[ref]])
        if found is None:
            gone.add(refs[ref])
        else:
            problems += found
    problems += [("node", f"{_label(nodes[refs[ref]])} did not answer within {_CHECK_TIMEOUT:.0f} s") for ref in late]
    if problems:
        kinds = {k for k, _ in problems}
        error = OutputError if "destination" in kinds else SourceError if kinds == {"source"} else MxconvError
        raise error(f"not every node of the Ray cluster sees SRC and DST as the driver does (every node needs them "
                    f"at the same paths, on a shared file system): {'; '.join(text for _, text in problems)}")
    nodes = {nid: n for nid, n in nodes.items() if nid not in gone}
    if not nodes:
        raise MxconvError("every node of the Ray cluster was lost before the conversion could start")
    return nodes


def _task_result(ray, ref, where: str) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, MxconvError):
            raise cause from None
        raise MxconvError(f"a conversion task sent to {where} failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as e:
        raise MxconvError(f"a conversion task sent to {where} failed {MAX_RETRIES + 1} times ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); rerun the same command to resume") from None


def run_on_cluster(ray, todo: list[ShardPlan], view, ckpt: SourceCheckpoint, opener, fingerprint: dict, dst: Path,
                   recipe, *, device: str, workers: int | None, hash_sources: bool, quiet: bool,
                   processes: int | None = None) -> tuple[dict[str, str], dict]:
    """Write `todo` into DST on the cluster; returns the source hashes and what the cluster did.
    `processes`: conversion processes per node (None: what `processes.process_count` says there)."""
    dst = Path(dst)
    nodes = _usable(ray, device)
    if not nodes:
        raise MxconvError(f"the Ray cluster has no alive node with a {'GPU' if device.startswith('cuda') else 'CPU'}")
    spec = source_spec(ckpt, opener, fingerprint)
    token = Token(f"cluster-{uuid.uuid4().hex}.tmp", uuid.uuid4().hex)
    write_bytes_atomic(token.path(dst), token.value.encode())
    try:
        nodes = check_nodes(ray, nodes, spec, str(dst), token)
        groups = make_groups(todo, GROUPS_PER_NODE * len(nodes)) if todo else []
        owned, rest = hash_owners(groups, view, ckpt) if hash_sources else ([[] for _ in groups], [])
        hashes, info = _dispatch(ray, nodes, groups, owned, rest, spec, token, str(dst), recipe, device,
                                 (workers, processes), quiet)
        missing = [s.name for s in todo if not shard_is_done(dst / s.name, s)]
        if missing:  # cannot happen with one shared DST; never finish without them
            raise OutputError(f"the nodes reported {len(missing)} shard(s) written that this machine does not see in "
                              f"DST, e.g. {missing[0]}: DST must be one directory shared by every node", file=dst)
        return hashes, info
    finally:
        token.path(dst).unlink(missing_ok=True)
        for path in (dst / STATE_DIR).glob("*.partial"):  # what tasks on lost nodes left behind
            path.unlink(missing_ok=True)


def _dispatch(ray, nodes, groups, owned, rest, spec, token, dst, recipe, device, per_node, quiet):
    resources = {"num_cpus": 1}
    if device.startswith("cuda"):  # the GPUs of a node (the fewest any node has)
        resources["num_gpus"] = int(min(n["Resources"]["GPU"] for n in nodes.values()))
    task = ray.remote(cluster_node.run_group)
    resources.update(max_retries=MAX_RETRIES, retry_exceptions=False)
    driver_node = ray.get_runtime_context().get_node_id()
    board = ray.remote(cluster_node.ProgressBoard).options(
        num_cpus=0, scheduling_strategy=_pinned(ray, driver_node, True)).remote()
    hasher = ray.remote(cluster_node.hash_files).options(num_cpus=1, max_retries=MAX_RETRIES,
                                                         scheduling_strategy="SPREAD")
    hash_refs = [hasher.remote(spec.root, rest[i::len(nodes)]) for i in range(min(len(rest), len(nodes)))]
    total = sum(j.input_bytes for g in groups for s in g for j in s.jobs)
    pending = list(range(len(groups)))
    running: dict = {}  # ref -> (group, node id it was sent to)
    load = dict.fromkeys(nodes, 0)
    seen = dict(nodes)  # every node ever used, for messages
    checking: dict = {}  # check ref -> id of a node that joined during the run
    hashes: dict[str, str] = {}
    info = {"nodes": len(nodes), "tasks": len(groups), "moved": 0, "lost_nodes": [], "ran_on": set(),
            "processes": 1, "reused_processes": 0}
    polled = idle_since = time.monotonic()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
                  desc=f"convert ({len(nodes)} nodes)", dynamic_ncols=True) as bar:
            while pending or running:
                if time.monotonic() - polled >= _NODE_POLL:
                    polled = time.monotonic()
                    _follow_nodes(ray, device, nodes, load, seen, checking, spec, dst, token, info)
                    _show(ray, board, bar, total)
                while pending and nodes and min(load.values()) == 0:
                    nid = min(load, key=load.get)
                    k = pending.pop(0)
                    ref = task.options(scheduling_strategy=_pinned(ray, nid, True), **resources).remote(
                        spec, dst, token, groups[k], recipe, device, *per_node, owned[k], board, f"group-{k}")
                    running[ref] = (k, nid)
                    load[nid] += 1
                if pending and not nodes and not running and time.monotonic() - idle_since > _NO_NODE_GRACE:
                    raise MxconvError(f"no node of the Ray cluster has been able to take work for "
                                      f"{_NO_NODE_GRACE:.0f} s; rerun the same command to resume when it has")
                if nodes or running:
                    idle_since = time.monotonic()
                if not running:
                    time.sleep(_TICK)
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=_TICK)
                if ready:
                    ready += ray.wait([r for r in running if r not in ready], num_returns=len(running) - 1,
                                      timeout=0)[0] if len(running) > 1 else []
                for ref in ready:
                    k, nid = running.pop(ref)
                    if nid in load:
                        load[nid] -= 1
                    result = _task_result(ray, ref, _label(seen[nid]))
                    hashes.update(result["hashes"])
                    info["ran_on"].add(result["node"])
                    info["processes"] = max(info["processes"], result["processes"])
                    info["reused_processes"] += result["reused_processes"]  # kept from the node's last task
                    if result["node"] != nid:  # Ray ran it again elsewhere: its worker or node was lost
                        info["moved"] += 1
                        _lost(seen[nid], info, f"its task ran again on node {result['node'][:8]}")
            for ref in hash_refs:
                hashes.update(_task_result(ray, ref, "a node"))
            bar.n = total
            bar.refresh()
    except BaseException:
        for ref in list(running) + hash_refs:
            ray.cancel(ref)
        if running:  # let them stop and drop their temporary files
            ray.wait(list(running), num_returns=len(running), timeout=_CANCEL_WAIT)
        raise
    finally:
        ray.kill(board)
    info["ran_on"] = len(info["ran_on"])
    return hashes, info


def _follow_nodes(ray, device, nodes, load, seen, checking, spec, dst, token, info) -> None:
    """Nodes lost since the last look stop getting work (Ray retries their tasks elsewhere);
    nodes that joined get it once they pass the same check as the others."""
    alive = _usable(ray, device)
    for nid in [n for n in nodes if n not in alive]:
        _lost(nodes[nid], info, "Ray runs its task on another node")
        del nodes[nid]
        load.pop(nid, None)
    for nid, node in alive.items():
        if nid not in nodes and nid not in seen:
            seen[nid] = node
            checking.update(_start_checks(ray, {nid: node}, spec, dst, token))
    for ref in ray.wait(list(checking), num_returns=len(checking), timeout=0)[0] if checking else []:
        nid = checking.pop(ref)
        problems = _check_problems(ray, ref, seen[nid])
        if problems is None:
            continue
        if problems:
            warnings.warn(MxconvWarning(f"not using a node that joined: {'; '.join(t for _, t in problems)}"))
        elif nid in alive:
            nodes[nid], load[nid] = seen[nid], 0
            info["nodes"] += 1


def _lost(node: dict, info: dict, what: str) -> None:
    if _label(node) not in info["lost_nodes"]:
        info["lost_nodes"].append(_label(node))
        warnings.warn(MxconvWarning(f"{_label(node)} was lost; {what}"))


def _show(ray, board, bar, total: int) -> None:
    try:
        done = ray.get(board.total.remote(), timeout=5)
    except Exception:  # the board's node was lost: the bar stands still, the run goes on
        return
    bar.n = min(total, done)
    bar.refresh()
