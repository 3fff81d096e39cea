"""Start-up to first token of ``t2r-export generate``: a fresh process each time, as a user runs it.

The clock starts just before the process is spawned and stops at the first byte on its stdout
(``generate`` echoes the prompt with the first generated text, so that byte is the first token).
Interpreter start-up, imports, bundle and session loading, tokenization and prefill all count.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def time_to_first_token(bundle: Path, prompt: str = "import os", provider: str = "cpu", threads: int = 0) -> float:
    """Seconds from spawning ``python -m t2r_export generate BUNDLE`` to its first byte on stdout."""
    command = [sys.executable, "-m", "t2r_export", "generate", str(bundle), "--prompt", prompt,
               "--max-new-tokens", "1", "--provider", provider, "--threads", str(threads)]
    # a fresh environment as a user's shell has it; the child must not inherit a parent's warm state
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or not first:
        lines = stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raise ValueError(f"generate failed on {bundle}: {lines[-1]}")
    return elapsed


def measure_startup(bundle: Path, repeats: int = 5, prompt: str = "import os", provider: str = "cpu",
                    threads: int = 0) -> dict:
    """Time to first token over ``repeats`` fresh processes (after one untimed run that warms the file cache)."""
    if repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    time_to_first_token(bundle, prompt, provider, threads)
    times = [time_to_first_token(bundle, prompt, provider, threads) for _ in range(repeats)]
    return {"bundle": str(bundle), "provider": provider, "repeats": repeats, "seconds": times,
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
