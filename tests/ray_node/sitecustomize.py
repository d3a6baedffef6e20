"""Loaded by every Python process of a simulated Ray node whose PYTHONPATH starts here (the
tests add such nodes with `env_vars`), to give that one node a behaviour of its own:

- MXCONV_TEST_HIDE=DIR[:DIR...]: this node does not see these directories (as a node whose
  file system does not share them): every stat, open, listdir... of a path under them fails
  with FileNotFoundError;
- MXCONV_TEST_HOLD=DIR: the first shard this node finishes after the file DIR/armed appears
  waits before its rename (DIR/held then holds the worker's pid) until DIR/release appears,
  so a test can kill the node or the driver while the node is in the middle of a task.
"""

import builtins
import io
import os
import sys
import time

_hidden = [os.path.abspath(p) for p in os.environ.get("MXCONV_TEST_HIDE", "").split(os.pathsep) if p]


def _is_hidden(path) -> bool:
    if isinstance(path, int):
        return False
    try:
        p = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    return any(p == h or p.startswith(h + os.sep) for h in _hidden)


def _hiding(fn):
    def wrapper(path, *args, **kwargs):
        if _is_hidden(path):
            raise FileNotFoundError(2, "No such file or directory", os.fsdecode(path))
        return fn(path, *args, **kwargs)
    return wrapper


if _hidden:
    for _name in ("stat", "lstat", "open", "access", "listdir", "scandir", "mkdir"):
        setattr(os, _name, _hiding(getattr(os, _name)))
    builtins.open = io.open = _hiding(io.open)

_hold = os.environ.get("MXCONV_TEST_HOLD")


def _hold_finish(module) -> None:
    original = module.ShardWriter.finish

    def finish(self):
        try:
            os.rename(os.path.join(_hold, "armed"), os.path.join(_hold, "held"))
        except OSError:
            return original(self)
        with open(os.path.join(_hold, "held.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.rename(os.path.join(_hold, "held.tmp"), os.path.join(_hold, "held.pid"))
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(_hold, "release")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return original(self)

    module.ShardWriter.finish = finish


if _hold:
    import importlib.abc

    class _PatchWriter(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "converter.run.writer":
                return None
            for finder in sys.meta_path:
                spec = None if finder is self else finder.find_spec(name, path, target)
                if spec is not None:
                    run = spec.loader.exec_module

                    def exec_module(module, run=run):
                        run(module)
                        _hold_finish(module)

                    spec.loader.exec_module = exec_module
                    return spec
            return None

    sys.meta_path.insert(0, _PatchWriter())
