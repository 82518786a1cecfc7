"""Running a script under torchrun from a test: CPU processes over gloo on a free local port."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every subprocess's time bound, against hangs only: a loaded 2-core machine runs five times slower and a whole
# tiny study takes minutes there, so no test's outcome may depend on how long a command takes
HANG_S = 3600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, args: list, nproc: int = 2, timeout: int = HANG_S):
    """The CompletedProcess of `torchrun --nproc_per_node nproc script *args` run from the repository root.
    A run whose worker died by a signal (exit code -6 in the launcher's report: gloo's C++ transport aborting,
    seen once in CI, never in 40 runs here) runs once more; a run that fails in Python is never retried."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), script, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0 and "(exitcode: -" in out.stderr:
        print(f"a worker died by a signal; running once more. Its output:\n{report(out)}")
        cmd[cmd.index("--master_port") + 1] = str(free_port())
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return out


def report(out, chars: int = 2500) -> str:
    """For an assertion message: the start of stderr (the workers' own output comes first) and its end (the
    launcher's summary, which names the rank that failed)."""
    err = out.stderr
    return err if len(err) <= 2 * chars else f"{err[:chars]}\n[...]\n{err[-chars:]}"
