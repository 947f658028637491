"""`python -m prodsearch.cli`."""

from prodsearch.cli import app

app()
