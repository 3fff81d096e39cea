"""Hostile outputs: user folders survive, writes are atomic, disks fill, processes die, writers race.

Every CLI case asserts one ``error:`` line, the exit code and no traceback; every user folder is
compared byte for byte before and after.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile_helpers import (CLI, assert_one_line_failure, cli_env, invoke, snapshot, temp_leftovers,
                             user_folder)
from t2r_export import atomic
from t2r_export.atomic import MARKER, OutputError, atomic_dir, atomic_write_text, output_lock, remove_stale_temps

# every command that writes a folder, with the arguments that reach its output check
WRITERS = {
    "swap": lambda src, out: ["swap", src["softmax"], "-o", out],
    "onnx": lambda src, out: ["onnx", src["t2r"], "-o", out, "--chained-steps", "2"],
    "finetune": lambda src, out: ["finetune", src["softmax"], "-o", out, "--steps", "1", "--batch-size", "1",
                                  "--block-size", "8", "--data", src["data"]],
    "pretrain": lambda src, out: ["pretrain", "--out", out, "--steps", "1"],
    "bench": lambda src, out: ["bench", "-o", out, "--quick"],
    "demo": lambda src, out: ["demo", "-o", out, "--no-speed"],
    "experiment": lambda src, out: ["experiment", "paper", "-o", out, "--quick"],
}
# commands whose output replaces a folder wholesale (experiment adds to its own folder instead)
REPLACING = [name for name in WRITERS if name != "experiment"]


@pytest.fixture()
def sources(tmp_path, tiny_tokenizer, tiny_t2r_dir):
    from conftest import make_tiny_model

    softmax = tmp_path / "softmax"
    make_tiny_model("llama").save_pretrained(softmax)
    tiny_tokenizer.save_pretrained(softmax)
    data = tmp_path / "corpus.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 50)
    return {"softmax": softmax, "t2r": tiny_t2r_dir, "data": data}


# ---- user folders ------------------------------------------------------------------------------

@pytest.mark.parametrize("command,force", [(c, False) for c in WRITERS] + [(c, True) for c in REPLACING])
def test_a_user_folder_is_never_replaced(command, force, sources, tmp_path):
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    result = invoke(WRITERS[command](sources, out) + (["--force"] if force else []))
    line = assert_one_line_failure(result, 2, str(out))
    assert ("not written by t2r-export" in line) if force else ("--force" in line or "not written" in line)
    assert snapshot(out) == before
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("command", list(WRITERS))
def test_the_current_folder_is_refused(command, sources, tmp_path, monkeypatch):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(work)
    force = ["--force"] if command in REPLACING else []
    for out in (".", ".."):
        result = invoke(WRITERS[command](sources, out) + force)
        assert_one_line_failure(result, 2, "current directory")
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["swap", "onnx", "finetune"])
def test_an_output_holding_the_input_is_refused(command, sources, tmp_path):
    src = "t2r" if command == "onnx" else "softmax"
    before = snapshot(sources[src])
    for out in (sources[src], sources[src].parent):
        result = invoke(WRITERS[command](sources, out) + ["--force"])
        assert_one_line_failure(result, 2, "input")
    assert snapshot(sources[src]) == before


@pytest.mark.parametrize("command", ["swap", "onnx"])
def test_force_replaces_only_the_tools_own_output(command, sources, tmp_path):
    out = tmp_path / "out"
    assert invoke(WRITERS[command](sources, out)).exit_code == 0
    assert (out / MARKER).is_file()
    assert_one_line_failure(invoke(WRITERS[command](sources, out)), 2, "--force")
    (out / "stale.txt").write_text("from the first run")
    result = invoke(WRITERS[command](sources, out) + ["--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert temp_leftovers(tmp_path) == []


def test_written_files_get_the_umask_modes(sources, tmp_path):
    out = tmp_path / "swapped"
    old = os.umask(0o022)
    try:
        assert invoke(["swap", sources["softmax"], "-o", out]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


# ---- the atomic writer itself -------------------------------------------------------------------

@pytest.mark.parametrize("name", atomic.OWNED_FILES)
def test_force_recognises_each_record_of_the_tool(name, tmp_path):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("{}")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]


def test_an_engines_folder_is_recognised_by_its_manifest_format(tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "other-tool"}))
    with pytest.raises(OutputError, match="not written by t2r-export"):
        with atomic_dir(out, overwrite=True):
            pass
    (out / "manifest.json").write_text(json.dumps({"format": "t2r-export-engines"}))
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "plan").write_bytes(b"x")
    assert (out / "plan").is_file()


def test_an_empty_folder_is_filled_without_force(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a"


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(OutputError, match="not a directory|is a file"):
            with atomic_dir(out):
                pass
    assert (tmp_path / "file").read_text() == "mine"


WRITE_ERRORS = [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS]


@pytest.mark.parametrize("code", WRITE_ERRORS, ids=[errno.errorcode[c] for c in WRITE_ERRORS])
@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_a_failing_disk_is_one_line_and_keeps_the_old_output(code, when, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v1.txt").write_text("first")
    if when == "renaming":
        monkeypatch.setattr(atomic.os, "replace", _raiser(code))
    with pytest.raises(OutputError) as caught:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "v2.txt").write_text("second")
            if when == "writing":
                raise OSError(code, os.strerror(code), str(tmp / "v2.txt"))
    message = str(caught.value)
    assert "\n" not in message and str(out) in message and atomic.WRITE_ERRNOS[code] in message
    assert (out / "v1.txt").read_text() == "first"
    assert temp_leftovers(tmp_path) == []


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "out"):
            raise FileNotFoundError(errno.ENOENT, "gone", "x")
    assert temp_leftovers(tmp_path) == []


def test_atomic_write_text_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    monkeypatch.setattr(atomic.os, "replace", _raiser(errno.ENOSPC))
    with pytest.raises(OutputError, match="the disk is full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize("command", ["swap", "onnx"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
def test_cli_write_failures_are_one_line_exit_2(command, code, sources, tmp_path, monkeypatch):
    """A disk that fills (or turns read-only) while the command writes: one line, exit 2, no temp."""
    out = tmp_path / "out"
    real = atomic._normal_modes

    def full_disk(root):
        real(root)
        raise OSError(code, os.strerror(code), str(Path(root) / "model.safetensors"))

    monkeypatch.setattr(atomic, "_normal_modes", full_disk)
    result = invoke(WRITERS[command](sources, out))
    assert_one_line_failure(result, 2, atomic.WRITE_ERRNOS[code], str(out))
    assert not out.exists() and temp_leftovers(tmp_path) == []


def _raiser(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args else None)
    return fail


# ---- dead processes and stale temps --------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".out.tmp-{pid}").mkdir()
        (tmp_path / f".out.tmp-{pid}" / "step.onnx").write_bytes(b"half")
    removed = remove_stale_temps(out)
    assert [p.name for p in removed] == [f".out.tmp-{dead}"]
    assert temp_leftovers(tmp_path) == [f".out.tmp-{alive}"]


def test_an_output_caught_between_renames_is_put_back(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "runtime.json").write_text("{}")
    remove_stale_temps(out)
    assert (out / "runtime.json").is_file() and temp_leftovers(tmp_path) == []


def test_kill_9_mid_export_then_a_rerun_succeeds_and_removes_the_temp(sources, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([*CLI, "onnx", str(sources["t2r"]), "-o", str(out), "--chained-steps", "200000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    temp = tmp_path / f".bundle.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (temp / "step.onnx").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert temp.is_dir() and not out.exists(), "the export should have been killed mid-write"
    result = invoke(["onnx", sources["t2r"], "-o", out, "--chained-steps", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "runtime.json").is_file() and temp_leftovers(tmp_path) == []


# ---- concurrent writers ----------------------------------------------------------------------------

HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "os.write(fd, str(os.getpid()).encode())\n"
             "print('locked', flush=True)\n"
             "time.sleep(60)\n")


@pytest.fixture()
def held_lock(tmp_path):
    """Another process holding the lock of tmp_path/out, as a second t2r-export writing there would."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".out.lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield holder
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(held_lock, tmp_path):
    with pytest.raises(OutputError, match=f"pid {held_lock.pid}"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["swap", "onnx"])
def test_cli_second_writer_is_one_line(command, held_lock, sources, tmp_path):
    result = invoke(WRITERS[command](sources, tmp_path / "out"))
    assert_one_line_failure(result, 2, "another t2r-export process", str(held_lock.pid))
    assert not (tmp_path / "out").exists()


def test_the_lock_is_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("a")
    assert not (tmp_path / ".out.lock").exists()
    with output_lock(out):
        pass
