"""Move a local MLflow history to the team's server: python -m pipeline.migrate --to URI.

Copies what the project's embedded store (mlflow.db) holds to a tracking server: experiments (by
name), runs with their params, tags, status, start and end times and every metric point, run
artifacts, the models logged in them, and registered models with their versions, tags and aliases.
Ids are new on the server; every moved run, model and version is tagged with its old id
(migrated.*), so running the command again moves only what is not there yet and a move that was
cut off is redone; a version is known by its source and old number, so another machine's v1 is
not taken for this one's. An alias the server's model already has (the team's champion) is kept,
and the command says so. The local store is only read (bar store.follow_root in a copied project).

mlflow-export-import (1.2.0, and its master) was tried first: with MLflow 3 it loses registered
versions and aliases (docs/team.md). Logins come from MLFLOW_TRACKING_USERNAME/PASSWORD.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow.entities import (
    LoggedModel,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    ViewType,
)
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import store
from pipeline.stage import ConfigError, run_stage


def pages(search: Callable, *args: object, **kwargs: object) -> Iterator:
    """Every result of an MLflow search, page after page."""
    token = None
    while True:
        page = search(*args, **kwargs, page_token=token)
        yield from page
        if not (token := page.token):
            return


def moved(dst: MlflowClient, experiment_id: str, kind: str, old_id: str) -> str | None:
    """The run (or logged model) moved from old_id, once complete; a cut-off move is removed."""
    query = f"tags.`migrated.{kind}_id` = '{old_id}'"
    if kind == "run":
        for run in dst.search_runs([experiment_id], query, ViewType.ACTIVE_ONLY):
            if run.data.tags.get("migrated.complete") == "true":
                return run.info.run_id
            dst.delete_run(run.info.run_id)
        return None
    for model in dst.search_logged_models([experiment_id], query):
        if model.status == LoggedModelStatus.READY:
            return model.model_id
        dst.delete_logged_model(model.model_id)
    return None


def move_run(
    src: MlflowClient, dst: MlflowClient, run: Run, experiment_id: str, runs: dict[str, str]
) -> tuple[str, int]:
    """A copy of run on dst, nested in the copy of its parent (in runs): its id there and the
    number of metric points."""
    tags = run.data.tags | {"migrated.run_id": run.info.run_id, "migrated.complete": "false"}
    if (parent := tags.get(MLFLOW_PARENT_RUN_ID)) in runs:
        tags[MLFLOW_PARENT_RUN_ID] = runs[parent]
    new = dst.create_run(experiment_id, run.info.start_time, tags, run.info.run_name).info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):  # MLflow's limits per log_batch request
        dst.log_batch(new, params=params[i : i + 100])
    points: list[Metric] = []
    for key in run.data.metrics:
        points += src.get_metric_history(run.info.run_id, key)
    for i in range(0, len(points), 1000):
        dst.log_batch(new, metrics=points[i : i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        if src.list_artifacts(run.info.run_id):
            dst.log_artifacts(new, src.download_artifacts(run.info.run_id, "", tmp))
    if run.info.status != "RUNNING":
        dst.set_terminated(new, run.info.status, run.info.end_time)
    dst.set_tag(new, "migrated.complete", "true")
    return new, len(points)


def move_model(
    src_uri: str, dst: MlflowClient, model: LoggedModel, experiment_id: str, run_id: str | None
) -> str:
    """A copy of a logged model on dst, its MLmodel naming its new run and id."""
    tags = model.tags | {"migrated.model_id": model.model_id}
    new = dst.create_logged_model(
        experiment_id, model.name, run_id, tags, model.params, model.model_type
    ).model_id
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location, dst_path=tmp, tracking_uri=src_uri
        )
        meta = Model.load(local)
        meta.run_id, meta.model_id = run_id, new
        meta.save(f"{local}/MLmodel")
        dst.log_model_artifacts(new, local)
    dst.finalize_logged_model(new, "READY")
    if run_id:
        dst.log_outputs(run_id, [LoggedModelOutput(new, 0)])
    return new


def move_registry(src: MlflowClient, dst: MlflowClient, runs: dict, models: dict) -> None:
    """Registered models, their versions (in order) and aliases the server's model lacks."""
    for registered in pages(src.search_registered_models):
        name = registered.name
        if not dst.search_registered_models(f"name = '{name}'"):
            dst.create_registered_model(name, registered.tags, registered.description)
        # A version moved before is known by its source, the copy of its logged model, and its
        # old number: another machine's v1 (another model) is not this store's v1.
        there = {
            (v.source, v.tags.get("migrated.version")): v.version
            for v in pages(dst.search_model_versions, f"name = '{name}'")
        }
        numbers = {}
        old_versions = pages(src.search_model_versions, f"name = '{name}'")
        for old in sorted(old_versions, key=lambda v: int(v.version)):
            number = str(old.version)  # an int from a local store, a string from a server
            model_id = models.get(old.source.removeprefix("models:/"))
            if model_id is None:  # registered from a path or a run's files, not a logged model
                print(f"migrate: {name} v{number} skipped: its source {old.source} was not moved")
                continue
            if (found := there.get((f"models:/{model_id}", number))) is not None:
                numbers[number] = found
                continue
            tags = old.tags | {"migrated.version": number}
            if "run_id" in tags:  # the register stage's tag names the run: the new one now
                tags["run_id"] = runs.get(old.run_id, tags["run_id"])
            new = dst.create_model_version(
                name, f"models:/{model_id}", runs.get(old.run_id), tags,
                description=old.description, model_id=model_id,
            )  # fmt: skip
            numbers[number] = new.version
            print(f"migrate: {name} v{number} -> v{new.version}")
        held = dst.get_registered_model(name).aliases
        for alias, version in registered.aliases.items():
            if (mine := numbers.get(str(version))) is None:
                continue  # its version was skipped, and said so
            if alias not in held:
                dst.set_registered_model_alias(name, alias, mine)
                print(f"migrate: {name}@{alias} -> v{mine}")
            elif held[alias] != mine:
                print(
                    f"migrate: {name}@{alias} stays v{held[alias]} on the server (yours: v{mine})"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, help="the tracking server, e.g. https://mlflow.team")
    parser.add_argument("--from", dest="source", help="the store to read (default: mlflow.db)")
    args = parser.parse_args(argv)
    src_uri = args.source or store.local_uri()
    if not args.source:  # a copied or moved project's artifacts are in its own mlruns/
        store.follow_root(store.project_root())
    if src_uri.startswith("sqlite:///") and not Path(src_uri[10:]).is_file():
        raise ConfigError(f"no MLflow store at {src_uri[10:]}: nothing to move (or pass --from)")
    if src_uri.startswith(("http://", "https://")):
        store.check_server(src_uri, "--from")
    if not args.to.startswith(("http://", "https://")):  # a database: artifacts need the server
        raise ConfigError(f"--to {store.redact(args.to)}: not a tracking server's http(s):// URL")
    store.check_server(args.to, "--to")
    # Its own lines say what moved: not MLflow's progress bars, run links and waiting notices.
    store.quiet()
    src, dst = MlflowClient(src_uri), MlflowClient(args.to)
    runs: dict[str, str] = {}
    models: dict[str, str] = {}
    count = points = 0
    for experiment in pages(src.search_experiments):
        found = dst.get_experiment_by_name(experiment.name)
        experiment_id = found.experiment_id if found else dst.create_experiment(experiment.name)
        found_runs = pages(src.search_runs, [experiment.experiment_id], max_results=500)
        # Parents first (a comparison's run), so that their children nest in their copies.
        for run in sorted(found_runs, key=lambda r: MLFLOW_PARENT_RUN_ID in r.data.tags):
            if new := moved(dst, experiment_id, "run", run.info.run_id):
                runs[run.info.run_id] = new
                continue
            runs[run.info.run_id], n = move_run(src, dst, run, experiment_id, runs)
            count, points = count + 1, points + n
        for model in pages(src.search_logged_models, [experiment.experiment_id]):
            new = moved(dst, experiment_id, "model", model.model_id)
            models[model.model_id] = new or move_model(
                src_uri, dst, model, experiment_id, runs.get(model.source_run_id)
            )
    print(
        f"migrate: {count} runs moved ({points:,} metric points), {len(runs) - count} already there"
    )
    move_registry(src, dst, runs, models)


if __name__ == "__main__":
    run_stage(main)
