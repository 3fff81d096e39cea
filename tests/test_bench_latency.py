"""`t2r-export bench latency`: runs, reports both paths at both positions, ratios from the rows."""

import json

from typer.testing import CliRunner

from t2r_export.bench.latency import measure_latency
from t2r_export.cli import app
from t2r_export.export.bundle import export_bundle


def test_latency_reports_io_binding_vs_plain_run_and_positions(tiny_t2r_dir, tmp_path):
    export_bundle(tiny_t2r_dir, tmp_path / "b", chained_steps=4)
    result = measure_latency(tmp_path / "b", [8, 64], steps=5, repeats=2, threads=1)
    rows = {(r["position"], r["io_binding"]): r["ms_per_token"] for r in result["rows"]}
    assert set(rows) == {(8, True), (8, False), (64, True), (64, False)}
    assert all(v > 0 for v in rows.values())
    assert result["plain_run_over_io_binding"] == rows[(8, False)] / rows[(8, True)]
    assert result["io_binding_last_over_first_position"] == rows[(64, True)] / rows[(8, True)]


def test_latency_command_prints_the_table_and_writes_json(tiny_t2r_dir, tmp_path):
    export_bundle(tiny_t2r_dir, tmp_path / "b", chained_steps=4)
    out = tmp_path / "lat.json"
    result = CliRunner().invoke(app, ["bench", "latency", str(tmp_path / "b"), "--positions", "8,64", "--steps", "3",
                                      "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert [r["position"] for r in saved["rows"]] == [8, 8, 64, 64]
    assert "plain session.run / IO binding at position 8" in result.stdout


def test_latency_bad_positions_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["bench", "latency", str(tmp_path), "--positions", "8,x"])
    assert result.exit_code == 2 and "--positions" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_without_a_subcommand_is_bench_run(tmp_path):
    # `bench BUNDLE` and `bench run BUNDLE` are one command: same one-line refusal of a missing bundle
    missing = str(tmp_path / "missing-bundle")
    bare = CliRunner().invoke(app, ["bench", missing, "--quick"])
    named = CliRunner().invoke(app, ["bench", "run", missing, "--quick"])
    assert bare.exit_code == named.exit_code == 2
    assert bare.stderr == named.stderr and "missing-bundle" in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1
