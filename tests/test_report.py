"""python -m pipeline.report on a store this test fills: the table, the full histories, the plots."""

import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPRO, call_stage, call_stages, one_error, write_params
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline import report
from pipeline import store as S

# (cell, order, readout, test accuracy, val accuracy per epoch)
RUNS = [
    ("lstm", "rows", "state_h", 0.95, [0.90, 0.96, 0.94]),
    ("gru", "rows", "state_h", 0.97, [0.91, 0.93, 0.97]),
    ("lstm", "pixels", "state_h", 0.60, [0.40, 0.61, 0.55]),
    ("simple_rnn", "pixels", "output_last", 0.20, [0.11, 0.15, 0.21]),
]
GIT = {  # git.dirty; gru-rows has none (a run from before the tag); simple_rnn is no DVC experiment
    "lstm-rows": "false",
    "lstm-pixels": "false",
    "simple_rnn-pixels": "params",
}
BATCHES = 2500  # more points than the UI's charts sample


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(S.EXPERIMENT, (root / "mlruns").as_uri())
    ids = {}
    now = int(time.time() * 1000)
    for cell, order, readout, test, val in RUNS:
        run = client.create_run(experiment, run_name=f"{cell}-{order}-{readout}")
        run_id = run.info.run_id
        params = {"model.cell": cell, "sequence.order": order, "train.lr": "0.001"}
        client.log_batch(
            run_id,
            metrics=[Metric("batch_accuracy", test * i / BATCHES, now, i) for i in range(BATCHES)]
            + [Metric("val_accuracy", v, now, e) for e, v in enumerate(val)]
            + [Metric("test_accuracy", test, now, 0), Metric("train_seconds", 12.5, now, 0)],
        )
        for key, value in params.items():
            client.log_param(run_id, key, value)
        client.set_tag(run_id, "readout", readout)
        client.set_tag(
            run_id, "dvc.exp_name", "" if cell == "simple_rnn" else f"exp-{cell}-{order}"
        )
        if f"{cell}-{order}" in GIT:
            client.set_tag(run_id, "git.dirty", GIT[f"{cell}-{order}"])
        client.set_terminated(run_id, "FINISHED")
        ids[f"{cell}-{order}"] = run_id
    unfinished = client.create_run(experiment, run_name="still-running")
    client.log_param(unfinished.info.run_id, "model.cell", "lstm")
    # A comparison's parent run (compare logs one per DVC experiment): not a trained model.
    tags = {"dvc.exp_name": "exp-gru-rows", "compare.runs": ids["gru-rows"]}
    parent = client.create_run(experiment, tags=tags, run_name="exp-gru-rows: gru-rows readouts")
    client.log_metric(parent.info.run_id, "test_accuracy/state_h", 0.95)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, ids


def runs_header(report_md: str) -> str:
    """The header line of the report's table of runs."""
    lines = report_md.splitlines()
    return lines[lines.index("## Runs") + 2]


def run_report(uri: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return call_stage("report", cwd, *args, env={"MLFLOW_TRACKING_URI": uri})


def test_report_tabulates_every_finished_run_with_the_params_that_differ(
    store: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    uri, ids = store
    done = run_report(uri, tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "reports/experiments/report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 4  # the unfinished run and the comparison's parent run are left out
    header = runs_header(text)
    assert "model.cell" in header and "sequence.order" in header
    assert "train.lr" not in header  # the same in every run
    # best test accuracy first; best val accuracy from the full history, not the last epoch
    assert rows[0].startswith(f"| `{ids['gru-rows'][:8]}`")
    lstm_rows = next(r for r in rows if ids["lstm-rows"][:8] in r)
    assert "| 0.9500 | 0.9600 | 12.5 | - | - |" in lstm_rows
    hashes = {row.split("|")[-2].strip() for row in rows}
    assert len(hashes) == 4  # every run's params differ
    # four configurations of one run each: no interval, and none differs from another in one thing
    assert text.count("| one run: no interval | - |") == 4
    # runs with no seed param (as from before any): paired on that one unknown seed
    assert (
        "| model.cell | gru | lstm | sequence.order=rows, readout=state_h | 1 | +0.0200 |" in text
    )
    assert text.count("one pair: no test") == 2  # and lstm on rows vs on pixels
    assert rows[-1].startswith(f"| `{ids['simple_rnn-pixels'][:8]}`")
    for png in ("curves.png", "cell_by_order.png"):
        data = (tmp_path / "reports/experiments" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_chosen_runs_only(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    uri, ids = store
    done = run_report(uri, tmp_path, "--runs", ids["lstm-rows"], ids["lstm-pixels"])
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "reports/experiments/report.md").read_text()
    assert text.startswith("# 2 runs")
    assert "model.cell" not in runs_header(text)  # both are LSTMs


def test_the_full_metric_history_is_read(store: tuple[str, dict[str, str]]) -> None:
    uri, ids = store
    client = MlflowClient(uri)
    steps, values = report.history(client, client.get_run(ids["gru-rows"]), "batch_accuracy")
    assert len(steps) == BATCHES and steps[-1] == BATCHES - 1
    assert values[-1] == pytest.approx(0.97 * (BATCHES - 1) / BATCHES)


def test_a_missing_or_empty_store_is_one_clear_error_and_not_created(tmp_path: Path) -> None:
    database = tmp_path / "empty.db"
    assert one_error(run_report(f"sqlite:///{database}", tmp_path)).startswith(
        f"error: no MLflow store at {database} (none): run `dvc repro`"
    )
    assert not database.exists() and not (tmp_path / "reports").exists()
    database.touch()
    assert "(an empty file)" in one_error(run_report(f"sqlite:///{database}", tmp_path))
    assert database.stat().st_size == 0


def test_a_damaged_store_is_one_line_and_left_as_it_is(
    store: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    whole = Path(store[0].removeprefix("sqlite:///")).read_bytes()
    damaged = tmp_path / "mlflow.db"
    damaged.write_bytes(whole[: len(whole) // 2])  # before: a 72-line SQLAlchemy traceback
    error = one_error(run_report(f"sqlite:///{damaged}", tmp_path))
    assert error.startswith(f"error: {damaged} is not a readable SQLite database"), error
    assert damaged.read_bytes() == whole[: len(whole) // 2]
    assert not (tmp_path / "reports").exists()


def test_report_finds_the_runs_of_dvc_experiments_by_name(
    store: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    uri, ids = store
    done = run_report(uri, tmp_path, "--exp", "exp-gru-rows", "exp-lstm-pixels")
    assert done.returncode == 0, done.stderr
    assert (
        f"gru-rows-state_h [exp-gru-rows]: run {ids['gru-rows']}, test accuracy 0.97" in done.stdout
    )
    assert "report: 2 runs" in done.stdout
    with pytest.raises(report.ConfigError, match=r"no run is tagged dvc\.exp_name = 'no-such-exp'"):
        report.find_runs(MlflowClient(uri), S.EXPERIMENT, [], ["no-such-exp"])


def test_the_table_names_each_runs_dvc_experiment_and_marks_a_dirty_workspace(
    store: tuple[str, dict[str, str]],
) -> None:
    uri, ids = store
    client = MlflowClient(uri)
    runs = [client.get_run(ids[key]) for key in ("lstm-rows", "simple_rnn-pixels", "gru-rows")]
    lines = report.table(runs, {}).splitlines()
    assert lines[0].startswith("| run | readout | dvc exp | dirty | model.cell | sequence.order |")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in lines[2:]
    }
    assert rows == {
        f"`{ids['lstm-rows'][:8]}` lstm-rows-state_h": ["state_h", "exp-lstm-rows", ""],
        f"`{ids['simple_rnn-pixels'][:8]}` simple_rnn-pixels-output_last": [
            "output_last",
            "",
            "params",
        ],
        f"`{ids['gru-rows'][:8]}` gru-rows-state_h": ["state_h", "exp-gru-rows", "?"],
    }


# (readout, model.cell, train.seed as logged (None: a run from before the param), test accuracy)
REPLICATES = [
    ("state_h", "lstm", None, 0.950),  # from before train.seed: its seed, 42, trained it
    ("state_h", "lstm", "1", 0.960),
    ("state_h", "lstm", "2", 0.940),
    ("state_h", "lstm", "2", 0.940),  # seed 2 again (a rerun): no new replicate
    ("output_last", "lstm", None, 0.950),
    ("output_last", "lstm", "1", 0.960),
    ("output_last", "lstm", "2", 0.940),
    ("state_h", "gru", "None", 0.970),  # train.seed null: seed 42 trained it
    ("state_h", "gru", "1", 0.975),
    ("state_h", "gru", "2", 0.972),
]


def test_runs_that_differ_only_in_the_training_seed_form_one_group(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(S.EXPERIMENT, (tmp_path / "mlruns").as_uri())
    for i, (readout, cell, seed, accuracy) in enumerate(
        [*REPLICATES, ("state_h", "lstm", "3", 0.5)]
    ):
        params = {"seed": "42", "model.cell": cell, "train.lr": "0.001"}
        params |= {} if seed is None else {"train.seed": seed}
        # what cannot change a model differs freely; the last run is on other data (data.source
        # auto fell back to the bundled digits): not a replicate of any
        params |= {"readouts": f"['{readout}']", "registry.min_improvement": str(i / 100)}
        tags = {"readout": readout, "data.sha256": "b" * 64 if i == len(REPLICATES) else "a" * 64}
        run = client.create_run(experiment, start_time=1000 + i, tags=tags)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("test_accuracy", accuracy, 0, 0)],
            params=[Param(k, v) for k, v in params.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    runs = report.find_runs(client, S.EXPERIMENT, [], [])
    groups = {
        (g.what["readout"], g.what["model.cell"], g.what["data.sha256"][0]): g
        for g in report.group_replicates(runs)
    }
    assert len(groups) == 4
    lstm = groups["state_h", "lstm", "a"]
    assert list(lstm.by_seed) == ["1", "2", "42"] and lstm.reruns == 1
    assert list(groups["state_h", "gru", "a"].by_seed) == ["1", "2", "42"]
    assert list(groups["state_h", "lstm", "b"].by_seed) == ["3"]
    assert lstm.summary().mean == pytest.approx(0.95)
    pairs = {
        (key, a.what[key], b.what[key]) for key, a, b in report.comparable(list(groups.values()))
    }
    # not lstm output_last vs gru state_h (two differences), nor any with the other data
    assert pairs == {("model.cell", "gru", "lstm"), ("readout", "state_h", "output_last")}

    done = run_report(uri, tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "reports/experiments/report.md").read_text()
    replicates = text[text.index("## Replicates") : text.index("## Paired")]
    lstm_row = "| lstm | aaaaaaaa | state_h | 3 | 1, 2, 42 (+1 reruns left out) | 0.9500 |"
    assert lstm_row + " [0.9252, 0.9748] | 0.0100 |" in replicates  # 0.95 ± 4.303 * 0.01 / √3
    assert "| lstm | bbbbbbbb | state_h | 1 | 3 | 0.5000 | one run: no interval | - |" in replicates
    paired = text[text.index("## Paired") : text.index("## Runs")]
    rows = {line.split("|")[1].strip(): line for line in paired.splitlines()[4:] if line[:1] == "|"}
    assert "| 3 | +0.0000 | [0.0000, 0.0000] | - | identical in every seed |" in rows["readout"]
    assert "| gru | lstm | readout=state_h | 3 | +0.0223 |" in rows["model.cell"]
    assert runs_header(text).startswith("| run | readout | dvc exp | dirty | model.cell |")
    assert "| train seed |" in runs_header(text) and "train.seed |" not in runs_header(text)


@pytest.mark.slow
def test_three_seeds_trained_on_the_bundled_digits_give_n_3_and_an_interval(tmp_path: Path) -> None:
    """fetch and preprocess once, then train, evaluate and compare under train.seed 1, 2, 3 (one
    tiny epoch each, in this process), as `dvc exp run --queue -S train.seed=1,2,3` would; then the
    report (which leaves compare's parent runs out)."""
    small = {"data": {"source": "bundled"}, "readouts": ["state_h"]}
    small |= {"model": {"input_units": 8, "units": 8}}
    write_params(tmp_path, small)
    call_stages(tmp_path, REPRO[:2], {})  # fetch, preprocess
    for seed in (1, 2, 3):
        write_params(tmp_path, small | {"train": {"epochs": 1, "seed": seed}})
        call_stages(tmp_path, REPRO[2:5], {})  # train, evaluate, compare
        compare_md = (tmp_path / "reports/compare/compare.md").read_text()
        assert f"seed 42, train.seed {seed}\n\nOne training seed per readout, so no " in compare_md
    done = run_report(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "reports/experiments/report.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| state_h | 3 | 1, 2, 3 |")]
    mean, ci, sd = (cell.strip() for cell in row.split("|")[4:7])
    low, high = (float(x) for x in ci.strip("[]").split(", "))
    assert low < float(mean) < high and float(sd) > 0  # three seeds, three different models
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = report.find_runs(client, S.EXPERIMENT, [], [])
    assert sorted(run.data.tags["train.seed"] for run in runs) == ["1", "2", "3"]
    assert len({run.data.tags["replicate_of"] for run in runs}) == 1
    assert row.endswith(f"| `{runs[0].data.tags['replicate_of']}` |")
