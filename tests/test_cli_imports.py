"""Lazy imports: the package, `t2r-export --help` and `generate` leave torch and transformers unimported
(they are installed here, so an eager import anywhere on those paths would load them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toy_bundle import build_toy_bundle

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _heavy_check() -> str:
    return f"""
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("HEAVY", heavy)
    """


def test_torch_is_installed_so_the_checks_below_mean_something():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.mark.parametrize("argv", [[], ["--help"], ["generate", "--help"], ["bench", "--help"]],
                         ids=["import", "help", "generate-help", "bench-help"])
def test_import_and_help_load_neither_torch_nor_transformers(argv):
    pytest.importorskip("torch")
    proc = _run(f"""
        import sys
        import t2r_export
        from t2r_export.cli import main
        sys.argv = ["t2r-export", *{argv!r}]
        if sys.argv[1:]:
            try:
                main()
            except SystemExit as exit:
                assert exit.code in (0, None), exit.code
    """ + _heavy_check())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_generate_loads_neither_torch_nor_transformers(tmp_path):
    pytest.importorskip("torch")
    bundle = build_toy_bundle(tmp_path / "bundle")
    proc = _run(f"""
        import sys
        from t2r_export.cli import main
        sys.argv = ["t2r-export", "generate", {str(bundle)!r}, "--prompt", "def", "--max-new-tokens", "3"]
        try:
            main()
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
    """ + _heavy_check())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("def") and lines[-1] == "HEAVY []"


def test_models_registers_the_auto_classes():
    pytest.importorskip("torch")
    proc = _run("""
        from transformers import AutoConfig
        import t2r_export
        try:
            AutoConfig.for_model("t2r_llama")
        except ValueError:
            print("unregistered before")
        import t2r_export.models
        print(type(AutoConfig.for_model("t2r_llama")).__name__)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["unregistered", "before", "T2RLlamaConfig"]


def _package_imports():
    import ast

    for path in sorted((REPO / "t2r_export").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("t2r_export")):
                yield path.relative_to(REPO), node


def test_no_module_imports_another_modules_private_names():
    private = [(str(path), node.module, alias.name) for path, node in _package_imports() for alias in node.names
               if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == []


def test_no_argparse_entry_points_left():
    # every command is a typer subcommand of `t2r-export`
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "t2r_export").rglob("*.py")
                 if "import argparse" in p.read_text()]
    assert offenders == []
