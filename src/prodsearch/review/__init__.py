"""The review page (`prodsearch review`): a local web page where a catalog engineer answers
"same product?" for the candidate pairs that teach the decision most, checks clusters, and
calibrates the pair model to the catalog from those answers.

- `answers.py`: every answer in SQLite beside the collection, labels.csv export and import;
- `queue.py`: which pairs to ask about (active learning: uncertain first, spread out);
- `views.py`: what the page shows of a pair or a cluster (titles' differing tokens, signals);
- `report.py`: the calibration report and its chart;
- `session.py`: the collection's dedup result and the answers, kept together;
- `app.py`: the FastAPI app serving the page (`static/`) and its JSON API.
"""
