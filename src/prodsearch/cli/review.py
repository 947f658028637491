"""Review commands: the review page, and calibrating a catalog from labelled pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prodsearch.cli.common import (
    CollectionOption,
    JsonOption,
    StoreOption,
    _print_json,
    _reports_errors,
    _settings,
    app,
    stderr,
)
from prodsearch.errors import ConfigError

WriteSettingsOption = Annotated[
    Path | None,
    typer.Option(
        help="The settings file the calibration is merged into (default: PRODSEARCH_SETTINGS_FILE "
        "or ./prodsearch.toml, the one match, dedup and serve read)."
    ),
]


@app.command()
@_reports_errors
def review(
    store: StoreOption = None,
    collection: CollectionOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8100,
    write_settings: WriteSettingsOption = None,
) -> None:
    """Serve the review page: answer same/different for the pairs that teach the decision most
    (y / n / u, z undoes), check clusters, and calibrate the catalog from the answers.

    Answers are stored at once in `<collection>.review.sqlite` in the store's directory (a
    server store: PRODSEARCH_STATE_DIR); Calibrate writes the settings file.
    """
    import uvicorn

    from prodsearch.index import Index
    from prodsearch.review.app import create_review_app
    from prodsearch.settings import settings_file
    from prodsearch.state import state_file

    settings = _settings(store, collection)
    path = state_file(settings, "review")
    target = write_settings or settings_file()
    # A missing collection or a locked store ends here in a one-line error, not in a failed
    # server start-up; the app then opens the store for itself.
    with Index(settings=settings) as index:
        stderr.print(f"reviewing {index.count():,} products of {index.collection!r}")
    stderr.print(f"answers: {path}; calibrations go to {target}", highlight=False)

    def progress(step: str, done: int, total: int) -> None:
        if done == total:
            stderr.print(f"{step}: {done:,}/{total:,}", highlight=False)

    application = create_review_app(settings, write_settings=target, progress=progress)
    stderr.print(f"review page: http://{host}:{port}/", highlight=False)
    uvicorn.run(application, host=host, port=port)


@app.command()
@_reports_errors
def calibrate(
    labels: Annotated[Path, typer.Option(help="Pair labels: a CSV of id_a,id_b,same.")],
    store: StoreOption = None,
    collection: CollectionOption = None,
    write_settings: WriteSettingsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Calibrate the pair model to a catalog from labelled pairs (the review page's answers, or
    your own labels.csv) and merge it into the settings file: `dedup.pair_model.calibration`
    (the Platt slope and intercept, the catalog's weight of each pair feature when there are
    enough answers of both kinds, labels, positives, fitted_at) and
    `dedup.pair_model.min_probability` (the operating point). A bad labels file is refused
    whole, naming its rows; the settings file is only replaced once everything succeeded."""
    from prodsearch.index import Index
    from prodsearch.labels import read_labels
    from prodsearch.matching.calibrate import without_stale_calibration
    from prodsearch.matching.dedup import run_dedup
    from prodsearch.review.queue import review_pairs
    from prodsearch.review.report import build_report
    from prodsearch.review.session import write_calibration
    from prodsearch.settings import settings_file

    settings = _settings(store, collection)
    target = write_settings or settings_file()
    pair = settings.dedup.pair_model
    with Index(settings=settings) as index:
        known = {p.product_id for p in index.scroll(with_vectors=False)}
        answers = read_labels(labels, known)
        result = run_dedup(index, without_stale_calibration(settings.dedup), keep_scored=True)
    pairs = review_pairs(result.table, result.fired_at, pair.min_probability)
    report, fit = build_report(
        result.table,
        pairs,
        answers,
        result.fired_at,
        result.scored,
        pair.min_probability,
        settings.formula.min_fused_score,
    )
    if fit is None:
        raise ConfigError(str(report["error"]))
    write_calibration(target, report["calibration"])
    fitted = {
        k: v for k, v in report["calibration"].items() if k not in ("weights", "centers", "scales")
    }
    summary = {
        "labels_read": len(answers),
        # the calibration's own `labels` counts those among the candidate pairs (it fits on them)
        **fitted,
        "weighted_features": len(report["calibration"]["weights"]),
        "taught": report["taught"],
        "was_min_probability": pair.min_probability,
        "predicted": report["predicted"],
        "now": report["now"],
        "settings_file": str(target),
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"calibrate -> {target}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    stderr.print(table)
