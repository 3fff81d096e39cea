"""`t2r-export experiment paper` on a tiny random Llama: the table, equal budgets, resume, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t2r_export.cli import app
from t2r_export.experiments.paper import (PAPER_RUNS, RESULTS_JSON, RESULTS_MD, Budget, ExperimentConfig,
                                          run_paper_experiment)
from test_finetune import make_tiny_files

runner = CliRunner()



TINY_BUDGET = Budget(steps=2, transfer_steps=1, batch_size=2, block_size=32, test_tokens=512, valid_tokens=256)
FAST = ["--steps", "2", "--transfer-steps", "1", "--batch-size", "2", "--block-size", "32", "--test-tokens", "512",
        "--num-threads", "1", "--max-files", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("teacher"))[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def experiment_config(teacher, out, cache, **overrides) -> ExperimentConfig:
    # a window of 8 within the 32-token blocks: the window rows use both of their parts
    settings = dict(out_dir=out, budget_name="tiny", budget=TINY_BUDGET, teacher=teacher, num_threads=1,
                    max_files=3, cache_dir=cache, window=8)
    settings.update(overrides)
    return ExperimentConfig(**settings)


class StopAt:
    """A progress callback that records events and interrupts the experiment at one run's start."""

    def __init__(self, run: str | None = None):
        self.run, self.events = run, []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["phase"] == "run" and event["run"] == self.run:
            raise KeyboardInterrupt

    def phases(self, phase: str) -> list[str]:
        return [e["run"] for e in self.events if e["phase"] == phase]


@pytest.fixture(scope="module")
def finished(tiny_teacher, cache, tmp_path_factory):
    """The experiment interrupted before its fourth run, then resumed to the end."""
    out = tmp_path_factory.mktemp("exp") / "out"
    cut = StopAt("rfa")
    with pytest.raises(KeyboardInterrupt):
        run_paper_experiment(experiment_config(tiny_teacher, out, cache), progress=cut)
    interrupted = json.loads((out / RESULTS_JSON).read_text())
    resumed = StopAt()
    results = run_paper_experiment(experiment_config(tiny_teacher, out, cache), progress=resumed, command="test")
    return out, cut, interrupted, resumed, results


def test_the_table_has_every_run_with_equal_budgets(finished):
    out, _, _, _, results = finished
    rows = {row["run"]: row for row in results["rows"]}
    assert [row["run"] for row in results["rows"]] == [spec.name for spec in PAPER_RUNS]
    assert results["complete"]
    budget = TINY_BUDGET.steps * TINY_BUDGET.batch_size * TINY_BUDGET.block_size
    for name, row in rows.items():
        assert row["total_tokens"] == (0 if name == "teacher" else budget), name
        assert row["total_tokens"] == row["transfer_tokens"] + row["finetune_tokens"]
        assert row["test_tokens"] == TINY_BUDGET.test_tokens - 1
        assert row["wall_time_s"] >= 0 and row["cpu_time_s"] >= 0
    assert rows["t2r-transfer"]["transfer_tokens"] == TINY_BUDGET.transfer_steps * 2 * 32
    assert rows["t2r-scratch"]["init"] == "scratch" and rows["t2r"]["init"] == "pretrained"
    assert rows["t2r-scratch"]["lr"] != rows["t2r"]["lr"]
    # tiny Llama: 2 layers, 2 KV heads of dim 8; elu's state has one feature per head dim
    assert rows["teacher"]["state_bytes_per_sequence"] == 2 * 2 * 2 * 8 * 4 * 2048
    assert {name: rows[name]["feature_dim"] for name in ("elu", "t2r-k8", "t2r-k16", "t2r", "t2r-k64")} == \
        {"elu": 8, "t2r-k8": 8, "t2r-k16": 16, "t2r": 32, "t2r-k64": 64}
    assert rows["t2r-k64"]["state_bytes_per_sequence"] == 2 * 2 * 64 * (8 + 1) * 4
    # the quality rows: hedgehog's k = 32 gives 64 features; the window adds W keys, values and marks
    assert rows["hedgehog"]["feature_dim"] == 64 and rows["hedgehog"]["window"] == 0
    for name in ("t2r-window", "t2r-window-transfer", "hedgehog-window", "hedgehog-window-transfer"):
        assert rows[name]["window"] == 8, name
    assert rows["hedgehog-window"]["state_bytes_per_sequence"] == \
        2 * 4 * (2 * 64 * (8 + 1) + 8 * (2 * 2 * 8 + 1))
    for name in ("hedgehog-transfer", "t2r-window-transfer", "hedgehog-window-transfer"):
        assert rows[name]["transfer_tokens"] == rows["t2r-transfer"]["transfer_tokens"] > 0, name
    # the models are deleted after evaluation, the table stays
    assert not any((out / "models").iterdir())


def test_ratios_come_from_the_measured_perplexities(finished):
    rows = finished[4]["rows"]
    teacher = rows[0]["test_perplexity"]
    assert rows[0]["ratio_to_teacher"] == 1.0
    for row in rows:
        assert row["ratio_to_teacher"] == pytest.approx(row["test_perplexity"] / teacher, rel=1e-12)
    checks = {c["worse"]: c["holds"] for c in finished[4]["expectations"]}
    ppl = {row["run"]: row["test_perplexity"] for row in rows}
    assert checks == {worse: ppl["t2r"] < ppl[worse] for worse in ("elu", "rfa", "t2r-scratch")}


def test_json_and_markdown_are_written_atomically_and_agree(finished):
    out, results = finished[0], finished[4]
    assert json.loads((out / RESULTS_JSON).read_text()) == results
    markdown = (out / RESULTS_MD).read_text()
    assert "| run | feature map | feature dim | init |" in markdown and "(incomplete)" not in markdown
    for row in results["rows"]:
        assert f"| {row['run']} | {row['feature_map']} |" in markdown
        assert f"{row['test_perplexity']:.2f}" in markdown
    assert "Feature size" in markdown and "2,048 tokens of context" in markdown
    # nothing half-written is left beside the results
    assert sorted(p.name for p in out.iterdir()) == ["models", "partial.json", RESULTS_JSON, RESULTS_MD]


def test_an_interrupted_experiment_resumes_at_run_granularity(finished):
    _, cut, interrupted, resumed, results = finished
    assert cut.phases("done") == ["teacher", "t2r", "elu"]
    assert not interrupted["complete"] and [r["run"] for r in interrupted["rows"]] == ["teacher", "t2r", "elu"]
    assert resumed.phases("skip") == ["teacher", "t2r", "elu"]
    assert resumed.phases("run") == [spec.name for spec in PAPER_RUNS[3:]]
    assert results["rows"][:3] == [dict(r, ratio_to_teacher=results["rows"][i]["ratio_to_teacher"])
                                   for i, r in enumerate(interrupted["rows"])]


def test_a_partial_file_from_another_plan_is_refused(finished, tiny_teacher, cache):
    with pytest.raises(ValueError, match="different plan .*seed"):
        run_paper_experiment(experiment_config(tiny_teacher, finished[0], cache, seed=1))


def test_cli_runs_a_subset_and_prints_the_table(tiny_teacher, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_EXPORT_CACHE", str(cache))
    out = tmp_path / "out"
    result = runner.invoke(app, ["experiment", "paper", "--teacher", str(tiny_teacher), "-o", str(out),
                                 "--runs", "t2r", *FAST])
    assert result.exit_code == 0, result.output
    assert "test perplexity" in result.stdout and "t2r" in result.stdout
    results = json.loads((out / RESULTS_JSON).read_text())
    assert [r["run"] for r in results["rows"]] == ["teacher", "t2r"] and results["command"].startswith("t2r-export")
    # a later subset extends the same table (same plan); the finished runs are not redone
    result = runner.invoke(app, ["experiment", "paper", "--teacher", str(tiny_teacher), "-o", str(out),
                                 "--runs", "elu", *FAST])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stdout
    extended = json.loads((out / RESULTS_JSON).read_text())
    assert [r["run"] for r in extended["rows"]] == ["teacher", "t2r", "elu"] and not extended["complete"]
    assert extended["rows"][:2] == results["rows"]
    # (under pytest both invocations record pytest's argv) a table filled by two commands lists both
    from t2r_export.experiments.paper import render_markdown
    two = dict(extended, rows=[dict(r, command=c) for r, c in zip(extended["rows"], ["cmd a", "cmd a", "cmd b"])])
    markdown = render_markdown(two)
    assert "- commands (one invocation per `--runs` subset" in markdown and "  - `cmd a`\n  - `cmd b`" in markdown
    assert "- command: `" in render_markdown(extended)
    # another seed is another plan: refused in the same --out, its own table elsewhere
    result = runner.invoke(app, ["experiment", "paper", "--teacher", str(tiny_teacher), "-o", str(out),
                                 "--runs", "t2r", "--seed", "1", *FAST])
    assert result.exit_code == 2 and "different plan (changed: seed)" in " ".join(result.stderr.split())
    other = tmp_path / "seed1"
    result = runner.invoke(app, ["experiment", "paper", "--teacher", str(tiny_teacher), "-o", str(other),
                                 "--runs", "t2r", "--seed", "1", *FAST])
    assert result.exit_code == 0, result.output
    seeded = json.loads((other / RESULTS_JSON).read_text())
    assert seeded["plan"]["seed"] == 1
    # the teacher does not depend on the seed; a swapped run does
    assert seeded["rows"][0]["test_perplexity"] == results["rows"][0]["test_perplexity"]
    assert seeded["rows"][1]["test_perplexity"] != results["rows"][1]["test_perplexity"]


@pytest.mark.parametrize("args, message", [
    (["nope"], "No such command 'nope'"),
    (["--quick", "--budget", "full"], "disagree"),
    (["paper", "--quick", "--budget", "full"], "disagree"),
    (["paper", "--budget", "huge"], "unknown budget"),
    (["paper", "--runs", "t2r,gru"], "unknown run(s) gru"),
    (["paper", "--steps", "3", "--transfer-steps", "3"], "transfer steps must be between"),
    (["paper", "--steps", "0"], "steps must be a positive integer"),
    (["paper", "--teacher", "/nonexistent/teacher"], "is not a model directory"),
    (["paper", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["paper", "--runs", "hedgehog-window", "--window", "0"], "window must be a positive integer"),
    (["paper", "--runs", "t2r-window", "--window", "100000"], "window 100000 exceeds the model's"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["experiment", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not out.exists()


def test_an_output_path_that_is_a_file_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["experiment", "paper", "-o", str(blocker / "out")])
    assert result.exit_code == 2 and "cannot be created" in result.stderr


# -- seed-to-seed spread ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(tiny_teacher, cache, tmp_path_factory):
    """Two seeds of a two-run subset, each in its own --out."""
    folders = []
    for seed in (0, 3):
        out = tmp_path_factory.mktemp(f"seed{seed}") / "out"
        run_paper_experiment(experiment_config(tiny_teacher, out, cache, seed=seed, runs=("t2r", "rfa")),
                             command=f"seed {seed}")
        folders.append(out)
    return folders


def test_seed_summary_pairs_runs_of_the_same_seed(seeded, tmp_path):
    from t2r_export.experiments.seeds import seed_summary

    out = tmp_path / "docs" / "seeds.md"
    result = runner.invoke(app, ["experiment", "seeds", *map(str, seeded), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == out.read_text()
    summary = json.loads(out.with_suffix(".json").read_text())
    tables = [json.loads((f / RESULTS_JSON).read_text()) for f in seeded]
    ppl = [{row["run"]: row["test_perplexity"] for row in t["rows"]} for t in tables]
    assert summary["seeds"] == [0, 3] and summary["commands"] == ["seed 0", "seed 3"]
    # a run measured under one seed only has no spread
    (one_seed,) = seed_summary([tables[0], dict(tables[1], rows=tables[1]["rows"][:2])])["runs"][2:]
    assert one_seed["run"] == "rfa" and one_seed["seeds"] == 1 and one_seed["spread_pct"] is None
    runs = {r["run"]: r for r in summary["runs"]}
    assert list(runs) == ["teacher", "t2r", "rfa"]
    assert runs["t2r"]["mean"] == pytest.approx((ppl[0]["t2r"] + ppl[1]["t2r"]) / 2)
    assert runs["t2r"]["spread_pct"] == pytest.approx(100 * abs(ppl[0]["t2r"] - ppl[1]["t2r"]) / runs["t2r"]["mean"])
    assert runs["teacher"]["spread_pct"] == 0.0   # the teacher does not depend on the seed
    (rfa,) = summary["comparisons"]
    assert rfa["ratio_by_seed"] == {str(s): pytest.approx(p["rfa"] / p["t2r"]) for s, p in zip((0, 3), ppl)}
    assert rfa["t2r_better_in"] == sum(p["rfa"] > p["t2r"] for p in ppl)
    markdown = out.read_text()
    assert "| run | ppl seed 0 | ppl seed 3 | mean |" in markdown and "| rfa / t2r |" in markdown
    assert f"{ppl[1]['rfa']:.2f}" in markdown


@pytest.mark.parametrize("case, message", [
    ("one", "need at least 2 result folders"),
    ("empty", "has no results.json"),
    ("same-seed", "two folders hold the same seed"),
    ("other-plan", "differs in: lr"),
    ("bad-out", "--out must name a .md file"),
])
def test_seed_summary_bad_input_is_one_line_and_exit_2(seeded, tmp_path, case, message):
    a, b = (str(f) for f in seeded)
    args = {"one": [a], "empty": [a, str(tmp_path)], "same-seed": [a, a],
            "bad-out": [a, b, "--out", str(tmp_path / "x.txt")]}
    if case == "other-plan":
        other = tmp_path / "other"
        other.mkdir()
        results = json.loads((seeded[1] / RESULTS_JSON).read_text())
        results["plan"]["lr"] *= 2
        (other / RESULTS_JSON).write_text(json.dumps(results))
        args[case] = [a, str(other)]
    result = runner.invoke(app, ["experiment", "seeds", *args[case]])
    assert result.exit_code == 2, result.output
    err = " ".join(result.stderr.split())
    assert message in err and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "x.json").exists()
