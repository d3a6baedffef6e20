"""The compiled CPU kernels (`converter/numerics/mxfp8.c`, `stream.c` (the same, writing their
output to a file as they make it), `fp8_block.c`, `mx_stats.c`, `mxfp8.h`; `guard.c`, a SIGBUS
note; and `sha256.c`, two sha256s at once on one core, for the source hasher):
built once per machine with the system C compiler into one library, cached, loaded with ctypes.

Why compiled code: on a CPU the conversion must keep pace with copying the files, and torch's
element-wise operations cannot: each is a pass over memory, and its float -> e4m3 cast is scalar.
The C kernels do a block in one pass (an FP8 source costs one table lookup per element), and
ctypes releases the GIL for the call, so worker threads run them in parallel.

Nothing depends on them: without a compiler, with MXCONV_NATIVE=0, or when a build fails, `load()`
returns None and the torch kernels (`converter.numerics.kernels`) produce the same bytes, about 7x slower
on FP8 sources and 3x on BF16 (and the source is hashed with hashlib, one file per thread). The tests
run both and compare them with the reference byte for byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("mxfp8.c", "stream.c", "fp8_block.c", "mx_stats.c", "guard.c", "sha256.c"))
HEADER = Path(__file__).with_name("mxfp8.h")
# -ffp-contract=off: no fused multiply-add (it would skip a rounding the reference does);
# -march=native: the cache key holds the CPU's feature flags, so a shared cache stays correct.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
PORTABLE_FLAGS = ["-O2", "-ffp-contract=off", "-fPIC", "-shared"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class NativeBuildWarning(UserWarning):
    """The compiled kernels could not be built; the (slower) torch kernels are used instead."""


def enabled() -> bool:
    return os.environ.get("MXCONV_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    if os.environ.get("MXCONV_CACHE_DIR"):
        return Path(os.environ["MXCONV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mxconv"


def _cache_dirs() -> list[Path]:
    """Where a build may live: the user's cache, else (read-only home) a per-user temp folder."""
    return [cache_dir(), Path(tempfile.gettempdir()) / f"mxconv-{os.getuid()}"]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _digest(cc: str) -> str:
    """What a build depends on: our sources, the flags, the compiler and the CPU it targets."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cc
    parts = [*(f.read_text() for f in (*SOURCES, HEADER)), " ".join(FLAGS), version, _cpu_flags(), sys.platform]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, out: Path, flag_sets: tuple[list[str], ...] = (FLAGS, PORTABLE_FLAGS)) -> str | None:
    """Compile SOURCES into `out` (atomically) with the first flags that work; returns None or the
    compiler's complaint."""
    errors = []
    for flags in flag_sets:
        try:
            with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".build-", suffix=".so", delete=False) as tmp:
                tmp_path = Path(tmp.name)
        except OSError as exc:
            return f"cannot write in {out.parent}: {exc.strerror}"
        try:
            done = subprocess.run([cc, *flags, "-o", str(tmp_path), *map(str, SOURCES), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp_path, out)
                return None
            errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append([str(exc)])
        finally:
            tmp_path.unlink(missing_ok=True)
    return "; ".join(e[0] for e in errors)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mx_quantize_bf16.argtypes = [p, i64, i64, p, p, i, p, p]
    lib.mx_requantize_fp8.argtypes = [p, i64, i64, p, i64, p, p, i, p, p]
    lib.mx_dequantize_fp8.argtypes = [p, i64, i64, p, i64, p]
    lib.mx_error_stats_bf16.argtypes = [p, i64, i64, p, p, ctypes.c_float, p, p]
    lib.mx_error_stats_bf16.restype = None
    lib.mx_quantize_bf16.restype = lib.mx_requantize_fp8.restype = lib.mx_dequantize_fp8.restype = i
    lib.mx_requantize_fp8_to_fd.argtypes = [p, i64, i64, p, i64, p, p, i, p, i64, i, i64, p, p]
    lib.mx_quantize_bf16_to_fd.argtypes = [p, i64, i64, p, p, i, p, i64, i, i64, p, p]
    lib.mx_requantize_fp8_to_fd.restype = lib.mx_quantize_bf16_to_fd.restype = i
    lib.mx_sha256_blocks.argtypes = [p, p, p, p, i64]
    lib.mx_sha256_blocks.restype = i
    lib.mx_note_sigbus.argtypes = [ctypes.c_char_p]
    lib.mx_note_sigbus.restype = i
    return lib


def note_sigbus(message: str) -> bool:
    """Have `message` written to stderr if this process dies of SIGBUS (see guard.c); whether that
    could be arranged (not without the compiled library). For mxconv's own command: it changes
    the process's signal handling, which a library call must not do behind its caller's back."""
    lib = load()
    return lib is not None and lib.mx_note_sigbus(message.encode()) == 0


def load() -> ctypes.CDLL | None:
    """The kernels' library, built on first use; None when disabled or unbuildable (warns once)."""
    if not enabled():
        return None
    with _lock:
        key = str(SOURCES[0])
        if key in _loaded:
            return _loaded[key]
        lib, problem = None, None
        cc = _compiler()
        if cc is None:
            problem = "no C compiler (cc, gcc or clang) on PATH"
        else:
            name, folders = f"mxfp8-{_digest(cc)}.so", _cache_dirs()
            built = [d / name for d in folders if (d / name).is_file()]
            if built:
                path = built[0]
            else:
                writable = [d for d in folders if _writable(d)]
                if not writable:
                    problem = f"no writable cache directory ({', '.join(map(str, folders))})"
                else:
                    path = writable[0] / name
                    problem = _build(cc, path)
            if problem is None:
                try:
                    lib = bind(ctypes.CDLL(str(path)))
                except (OSError, AttributeError) as exc:
                    problem = f"cannot load {path}: {exc}"
        if problem is not None:
            warnings.warn(NativeBuildWarning(f"compiled kernels unavailable ({problem}); using the torch kernels "
                                             "(same bytes, slower). MXCONV_NATIVE=0 silences this"), stacklevel=2)
        _loaded[key] = lib
        return lib
