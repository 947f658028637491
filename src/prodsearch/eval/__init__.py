"""Evaluation: metrics, the image benchmark, tuning on labelled tables, the Shopee run."""
