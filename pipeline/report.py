"""Compare many runs from the MLflow store: python -m pipeline.report [--runs ID ... | --exp NAME ...].

Reads every FINISHED run of the experiment (or the runs named, or those of the DVC experiments
named: their `dvc.exp_name` tag, as `dvc exp show` names them) with full metric histories, not the
UI's sampled charts, and writes to reports/experiments/ (no stage writes or deletes it):
  report.md           Replicates: runs that differ only in the training seed (the same
                      tracking.replicate_key: params but train.seed, readout, data) grouped, with
                      n, the seeds, mean test accuracy, its 95 % confidence interval and the sd.
                      Paired comparisons: two groups that differ in one thing only (the readout,
                      or one param such as model.cell), paired by training seed (the same test
                      images), with the mean difference, its interval and a paired t-test.
                      Runs: one row per run: its DVC experiment (blank: a workspace run), whether
                      its params or code differed from its commit (dirty), the params that differ
                      between runs, its training seed, test accuracy, best val accuracy, training
                      seconds, samples/s, peak RSS, its replicate key, a hash of all params
  curves.png          batch accuracy (smoothed) and val accuracy per epoch, one line per run
  cell_by_order.png   for each model.cell x sequence.order, the best group's mean test accuracy
                      with its 95 % interval and n
Not a DVC stage: its input is the MLflow store, which grows with every experiment. That is also
why the intervals are here and not in the compare stage, whose outputs follow from its DVC deps.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline import store, tracking
from pipeline.io import atomic_path
from pipeline.plots import moving_mean, plt, save
from pipeline.stage import EXPERIMENTS, ConfigError, run_stage
from pipeline.stats import Summary, paired, summarize

SMOOTH = 25  # batches in the moving average of the batch-accuracy curves
TRAINED = "tags.readout IS NOT NULL"  # a trained model's run, not a comparison's parent run


def find_runs(
    client: MlflowClient, experiment: str, run_ids: list[str], exp_names: list[str]
) -> list[Run]:
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"no experiment {experiment!r} in {store.redact(store.tracking_uri())}; run dvc repro"
        )
    if exp_names:
        runs = []
        for name in exp_names:
            query = f"tags.`dvc.exp_name` = '{name}' AND {TRAINED}"
            if not (named := client.search_runs([found.experiment_id], query)):
                raise ConfigError(f"no run is tagged dvc.exp_name = {name!r} in {experiment!r}")
            runs += named
        return runs
    runs = client.search_runs(
        [found.experiment_id], f"attributes.status = 'FINISHED' AND {TRAINED}"
    )
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no finished run yet; run dvc repro")
    return runs


def history(client: MlflowClient, run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in points]), np.array([m.value for m in points])


def label(run: Run) -> str:
    """<cell>-<order>-<readout> [dvc experiment or run id]: what differs, and which one."""
    return f"{run.info.run_name} [{run.data.tags.get('dvc.exp_name') or run.info.run_id[:6]}]"


def dirty(run: Run) -> str:
    """git.dirty in the table: blank if the run came from its commit as committed, else what
    differed (params, code), or ? when not known (no git, or a run from before the tag)."""
    state = run.data.tags.get("git.dirty", "unknown")
    return {"false": "", "unknown": "?"}.get(state, state)


class Group(NamedTuple):
    """Runs of one configuration that differ only in the training seed."""

    key: str  # tracking.replicate_key
    what: dict[str, str]  # what the key is made of: params, readout, data.sha256
    by_seed: dict[str, Run]  # training seed -> its latest run
    reruns: int  # runs of a seed that already had one, left out

    def accuracy(self, seed: str) -> float:
        return self.by_seed[seed].data.metrics["test_accuracy"]

    def summary(self) -> Summary:
        return summarize([self.accuracy(seed) for seed in self.by_seed])


def seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.isdigit() else (2**31, seed)


def group_replicates(runs: list[Run]) -> list[Group]:
    """The runs with a test accuracy, grouped by replicate key; in each group one run per training
    seed, the latest: a rerun of a seed trains the same model (training is deterministic), so it
    is no new replicate. Groups in order of mean test accuracy, best first."""
    keyed: dict[str, list[Run]] = {}
    what: dict[str, dict[str, str]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        if "test_accuracy" not in run.data.metrics:
            continue
        params, tags = run.data.params, run.data.tags
        readout, data = tags.get("readout", "?"), tags.get("data.sha256", "")
        key = tracking.replicate_key(params, readout, data)
        keyed.setdefault(key, []).append(run)
        what[key] = {**tracking.replicate_params(params), "readout": readout, "data.sha256": data}
    groups = []
    for key, members in keyed.items():
        by_seed = {tracking.effective_seed(run.data.params): run for run in members}
        by_seed = dict(sorted(by_seed.items(), key=lambda item: seed_order(item[0])))
        groups.append(Group(key, what[key], by_seed, len(members) - len(by_seed)))
    return sorted(groups, key=lambda g: (-g.summary().mean, g.key))


def differing(groups: list[Group]) -> list[str]:
    """The keys of Group.what whose values differ between groups (readout and data aside)."""
    keys = sorted({k for g in groups for k in g.what} - {"readout", "data.sha256"})
    return [k for k in keys if len({g.what.get(k, "-") for g in groups}) > 1]


def interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def replicates_table(groups: list[Group]) -> str:
    differ = differing(groups)
    data = len({g.what["data.sha256"] for g in groups}) > 1  # e.g. the full set and the bundled
    header = [*differ, *(["data"] if data else []), "readout", "n", "seeds", "mean test acc"]
    header += ["95 % CI", "sd", "replicate_of"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        s = g.summary()
        seeds = ", ".join(g.by_seed) + (f" (+{g.reruns} reruns left out)" if g.reruns else "")
        cells = [g.what.get(k, "-") for k in differ]
        cells += [g.what["data.sha256"][:8] or "-"] if data else []
        cells += [g.what["readout"], str(s.n), seeds, f"{s.mean:.4f}"]
        if s.n < 2:
            cells += ["one run: no interval", "-"]
        else:
            cells += [interval(s.low, s.high), f"{s.sd:.4f}"]
        lines.append("| " + " | ".join([*cells, f"`{g.key}`"]) + " |")
    return "\n".join(lines) + "\n"


def comparable(groups: list[Group]) -> list[tuple[str, Group, Group]]:
    """(what differs, a, b) for each two groups that differ in exactly one param or the readout,
    on the same data (the same test images), a the one with the higher mean."""
    pairs = []
    for g, h in itertools.combinations(groups, 2):
        keys = set(g.what) | set(h.what)
        diff = [k for k in sorted(keys) if g.what.get(k) != h.what.get(k)]
        if len(diff) == 1 and diff[0] != "data.sha256":
            pairs.append((diff[0], g, h))  # groups are sorted best first
    return pairs


def paired_table(groups: list[Group]) -> str:
    pairs = comparable(groups)
    if not pairs:
        return "No two groups differ in exactly one param or the readout.\n"
    differ = [*differing(groups), "readout"]
    header = ["differs in", "a", "b", "where", "pairs", "mean a - b", "95 % CI", "p (paired t)"]
    lines = ["| " + " | ".join([*header, "verdict"]) + " |", "|" + "---|" * (len(header) + 1)]
    for key, a, b in pairs:
        seeds = [seed for seed in a.by_seed if seed in b.by_seed]
        result = paired([a.accuracy(s) for s in seeds], [b.accuracy(s) for s in seeds])
        where = ", ".join(f"{k}={a.what.get(k, '-')}" for k in differ if k != key) or "-"
        cells = [key, a.what.get(key, "-"), b.what.get(key, "-"), where, str(result.n)]
        cells += ["-" if result.mean is None else f"{result.mean:+.4f}"]
        cells += [interval(result.low, result.high)]
        cells += ["-" if result.p is None else f"{result.p:.3g}", result.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


METHOD = (
    "Replicates: runs whose params, readout and data are equal but for the training seed "
    "(`train.seed`; a run from before it, or with it null, trained from `seed`). A seed run "
    "twice counts once. 95 % CI: Student t over the seeds (`scipy.stats.t.interval`, "
    "mean ± t(0.975, n-1)·sd/√n). Paired comparisons: the runs of two groups with the same "
    "training seed, on the same test images; the difference of their test accuracies, the "
    "two-sided paired t-test (`scipy.stats.ttest_rel`) and its 95 % CI; real at 95 % when p < "
    "0.05 (each test on its own: with many comparisons, some pass by chance; 1 in 20 at 0.05)."
)


def table(runs: list[Run], best_val: dict[str, float]) -> str:
    keys = sorted({k for run in runs for k in run.data.params})
    differ = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    differ = [k for k in differ if k != "train.seed"]  # the column "train seed" says it
    header = ["run", "readout", "dvc exp", "dirty", *differ, "train seed", "test acc"]
    header += ["best val acc", "train s", "samples/s", "peak RSS MiB", "replicate_of"]
    header += ["params hash"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def number(run: Run, key: str, fmt: str) -> str:
        value = run.data.metrics.get(key)
        return "-" if value is None else format(value, fmt)

    ordered = sorted(runs, key=lambda r: -r.data.metrics.get("test_accuracy", -1.0))
    for run in ordered:
        params = run.data.params
        cells = [f"`{run.info.run_id[:8]}` {run.info.run_name}", run.data.tags.get("readout", "-")]
        cells += [run.data.tags.get("dvc.exp_name", ""), dirty(run)]
        cells += [run.data.params.get(k, "-") for k in differ]
        cells += [tracking.effective_seed(run.data.params)]
        val = best_val.get(run.info.run_id)
        cells += [number(run, "test_accuracy", ".4f"), "-" if val is None else f"{val:.4f}"]
        cells += [number(run, "train_seconds", ".1f"), number(run, "samples_per_second", ",.0f")]
        cells += [number(run, "peak_rss_mib", ",.0f")]
        tags = run.data.tags
        key = tracking.replicate_key(params, tags.get("readout", "?"), tags.get("data.sha256", ""))
        cells += [f"`{key}`", f"`{tracking.params_hash(params)}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(client: MlflowClient, runs: list[Run], path: Path) -> dict[str, float]:
    """Draw the curves; return each run's best val accuracy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    best_val = {}
    for run in runs:
        steps, acc = moving_mean(*history(client, run, "batch_accuracy"), SMOOTH)
        left.plot(steps, acc, linewidth=1, label=label(run))
        epochs, val = history(client, run, "val_accuracy")
        if len(val):
            best_val[run.info.run_id] = float(val.max())
            right.plot(epochs + 1, val, marker="o", markersize=3, label=label(run))
    left.set(xlabel="batch", ylabel=f"batch accuracy (mean of {SMOOTH})", title="training")
    right.set(xlabel="epoch", ylabel="val accuracy", title="validation")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.25
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if best_val:  # else no run has a curve to name
        right.legend(fontsize="x-small", loc="lower right")
    save(fig, path, dpi=110)
    return best_val


def plot_cell_by_order(groups: list[Group], path: Path) -> None:
    """Per model.cell x sequence.order, the mean test accuracy of its best group (configuration),
    with the 95 % interval over its seeds as an error bar and n under the bar."""
    best: dict[tuple[str, str], Summary] = {}
    for group in groups:  # best first
        key = (group.what.get("model.cell", "?"), group.what.get("sequence.order", "?"))
        best.setdefault(key, group.summary())
    cells = sorted({c for c, _ in best})
    orders = sorted({o for _, o in best})
    fig, ax = plt.subplots(figsize=(max(5, 2 * len(orders) + 2), 4))
    width = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        found = [(j, best[cell, o]) for j, o in enumerate(orders) if (cell, o) in best]
        xs = [j + i * width for j, _ in found]
        ys = [s.mean for _, s in found]
        errors = [0.0 if s.high is None else s.high - s.mean for _, s in found]
        bars = ax.bar(xs, ys, width, yerr=errors, capsize=3, label=cell)
        ax.bar_label(bars, [f"{s.mean:.3f}\nn={s.n}" for _, s in found], fontsize="x-small")
    ax.set_xticks([j + width * (len(cells) - 1) / 2 for j in range(len(orders))], orders)
    ax.set(ylim=(0, 1.1), ylabel="mean test accuracy (95 % CI)")
    ax.set_title("model.cell x sequence.order: best configuration, over its seeds", fontsize=10)
    ax.legend(fontsize="small", loc="lower right")
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], help="run ids (default: all finished)")
    parser.add_argument("--exp", nargs="*", default=[], help="DVC experiment names (dvc exp show)")
    parser.add_argument("--experiment", default=os.environ.get("MLFLOW_EXPERIMENT_NAME"))
    parser.add_argument("--out", type=Path, default=EXPERIMENTS)
    args = parser.parse_args(argv)
    uri = store.tracking_uri()
    store.existing_store(uri)  # a damaged store gets one line, a missing one is not created
    client = MlflowClient(uri)
    runs = find_runs(client, args.experiment or store.EXPERIMENT, args.runs, args.exp)
    with atomic_path(args.out, directory=True) as tmp:
        best_val = plot_curves(client, runs, tmp / "curves.png")
        groups = group_replicates(runs)
        plot_cell_by_order(groups, tmp / "cell_by_order.png")
        (tmp / "report.md").write_text(
            f"# {len(runs)} runs\n\n## Replicates\n\n{replicates_table(groups)}\n"
            f"## Paired comparisons\n\n{paired_table(groups)}\n{METHOD}\n\n"
            f"## Runs\n\n{table(runs, best_val)}\n"
            "![curves](curves.png)\n\n![cell by order](cell_by_order.png)\n"
        )
    for run in runs if args.exp or args.runs else []:
        print(
            f"{label(run)}: run {run.info.run_id}, test accuracy {run.data.metrics.get('test_accuracy')}"
        )
    print(f"report: {len(runs)} runs -> {args.out}/report.md")


if __name__ == "__main__":
    run_stage(main)
