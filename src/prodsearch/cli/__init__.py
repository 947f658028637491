"""The `prodsearch` command line. `--json` output is one JSON document on stdout; progress, logs
and tables go to stderr. Each command family is a module; importing them registers them."""

from prodsearch.cli import catalog, clusters, evaluation, matching, review, serving
from prodsearch.cli.common import app

__all__ = ["app", "catalog", "clusters", "evaluation", "matching", "review", "serving"]
