"""Whole-catalog matching through one candidate-pair table (`table.PairTable`):

candidates.py  batched engine queries -> the table (resumable: checkpoint.py)
features.py    the pair model's features of every pair (blend.py: neighbourhood blending)
pair_model.py  stacked gradient-boosted trees: a probability per pair
decide.py      the rules that decide (a modality score, a fused score, a probability, min-2)
clusters.py    capped connected components of the decided pairs
audit.py       match sets and the audit trail on disk
dedup.py       the whole path, as `prodsearch dedup` runs it
explain.py     one pair, as `match` sees it
"""
