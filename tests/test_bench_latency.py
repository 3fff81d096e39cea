"""`python -m t2r_export.bench.latency`: runs, reports both paths at both positions, ratios from the rows."""

from t2r_export.bench import latency
from t2r_export.export.bundle import export_bundle


def test_latency_reports_io_binding_vs_plain_run_and_positions(tiny_t2r_dir, tmp_path):
    export_bundle(tiny_t2r_dir, tmp_path / "b", chained_steps=4)
    result = latency.main([str(tmp_path / "b"), "--positions", "8,64", "--steps", "5", "--repeats", "2",
                           "--threads", "1", "--json", str(tmp_path / "lat.json")])
    rows = {(r["position"], r["io_binding"]): r["ms_per_token"] for r in result["rows"]}
    assert set(rows) == {(8, True), (8, False), (64, True), (64, False)}
    assert all(v > 0 for v in rows.values())
    assert result["plain_run_over_io_binding"] == rows[(8, False)] / rows[(8, True)]
    assert result["io_binding_last_over_first_position"] == rows[(64, True)] / rows[(8, True)]
    assert (tmp_path / "lat.json").is_file()
