"""The package as users install it: a wheel (not editable) carries its calibration data, writes its
caches under the user cache directory, and resolves nothing beside its source files."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "t2r_export"


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    found |= {"t2r_export.calibration"}
    assert found <= listed, f"add to pyproject.toml's packages: {sorted(found - listed)}"
    assert config["package-dir"]["t2r_export.calibration"] == "calibration"


def test_nothing_resolves_paths_beside_the_source_tree():
    # climbing out of the package (parents[N]) finds the source tree, which an installed wheel lacks
    pattern = re.compile(r"__file__\)(\.resolve\(\))?\.parents\[")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_calibration_cache_goes_to_the_user_cache_dir(monkeypatch, tmp_path):
    from t2r_export.export.quantize import calibration_cache_dir

    monkeypatch.delenv("T2R_EXPORT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration_cache_dir() == tmp_path / "xdg" / "t2r_export" / "calibration"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration_cache_dir() == tmp_path / "home" / ".cache" / "t2r_export" / "calibration"
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(tmp_path / "mine"))
    assert calibration_cache_dir() == tmp_path / "mine" / "calibration"


def test_recipe_prompts_must_name_a_packaged_file(tmp_path):
    from t2r_export.export.quantize import load_prompts

    with pytest.raises(ValueError, match="must name a packaged prompts file"):
        load_prompts(None, packaged="../../etc/passwd")


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if "__pycache__" not in p.parts}


def test_wheel_install_exports_int8_and_generates(tiny_t2r_dir, tmp_path):
    """Build the wheel, install it (not editable) into a folder and run the CLI from outside the repo."""
    wheels, site, cache, work = (tmp_path / n for n in ("wheels", "site", "cache", "work"))
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(wheels)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "Warning" not in built.stderr and "deprecat" not in built.stderr.lower(), built.stderr[-2000:]
    (wheel,) = wheels.glob("t2r_export-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    before = _tree(site)
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("T2R_EXPORT_CACHE", None)

    def run(*args):
        code = "import sys; from t2r_export.cli import main; sys.argv[0] = 't2r-export'; main()"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=work, env=env)

    where = subprocess.run([sys.executable, "-c", "import t2r_export, t2r_export.calibration as c; "
                            "print(t2r_export.__file__); print(c.__file__)"], capture_output=True, text=True,
                           cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout
    out = work / "int8"
    exported = run("onnx", str(tiny_t2r_dir), "-o", str(out), "--precision", "int8", "--chained-steps", "8")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert list((cache / "t2r_export" / "calibration").glob("calib-*.npz"))
    generated = run("generate", str(out), "--prompt", "def f(", "--max-new-tokens", "4", "--threads", "1")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # the install tree is read, never written
    assert _tree(site) == before
