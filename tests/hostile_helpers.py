"""Shared pieces of the hostile-input tests: the one-line failure check and small model folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from t2r_export.cli import app

runner = CliRunner()
# the installed console script, as a user runs it (its start-up path is part of what is tested)
CLI = [str(Path(sys.executable).with_name("t2r-export"))]


def invoke(args: list[str], **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_one_line_failure(result, code: int = 2, *needles: str) -> str:
    """Exit ``code``, no traceback, exactly one ``error:`` line holding every needle; returns that line."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert "Traceback" not in output, output
    assert exit_code == code, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove a user folder survived untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of a user's own files that no command may delete or change."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "data").mkdir()
    (path / "data" / "results.csv").write_text("a,b\n1,2\n")
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def temp_leftovers(parent: Path) -> list[str]:
    """Hidden temp/old folders an interrupted or failed write could leave behind."""
    return sorted(p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def run_cli(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *[str(a) for a in args]], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), **kwargs)
