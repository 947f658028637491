"""A review session: one collection's dedup result and its answers, kept together.

The result is `run_dedup` with the settings in force, computed at start-up and again after each
calibration (which changes the settings the session decides with, and writes them to the
settings file when the session has one). Every answer goes to the SQLite file at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prodsearch.index import Index
from prodsearch.matching.calibrate import without_stale_calibration
from prodsearch.matching.cluster_log import CLUSTER_KEY, ClusterLog
from prodsearch.matching.clusters import cluster_members
from prodsearch.matching.dedup import DedupResult, run_dedup
from prodsearch.review.answers import AnswerStore
from prodsearch.review.queue import ReviewPairs, next_batch, review_pairs, uncertain_left
from prodsearch.review.report import build_report
from prodsearch.review.views import pair_view, product_view
from prodsearch.settings import DedupSettings, update_settings_file
from prodsearch.state import state_file

Progress = Callable[[str, int, int], None]


def write_calibration(path: Path, calibration: dict[str, Any]) -> None:
    """Write a calibration (a report's `calibration`) to the settings file: the table
    `dedup.pair_model.calibration` replaced whole (slope, intercept, weights, labels, positives,
    fitted_at) and `dedup.pair_model.min_probability` set to its operating point."""
    values = dict(calibration)
    operating = values.pop("min_probability")
    changes = {"dedup": {"pair_model": {"calibration": values, "min_probability": operating}}}
    update_settings_file(path, changes, replace=["dedup.pair_model.calibration"])


class ReviewSession:
    """The state behind the review page (thread-safe: one lock around every step)."""

    def __init__(
        self,
        index: Index,
        answers: AnswerStore,
        write_settings: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.index = index
        self.answers = answers
        self.write_settings = write_settings
        self.knobs: DedupSettings = index.settings.dedup
        self._progress = progress
        self._lock = threading.RLock()
        self.payloads: dict[str, dict[str, Any]] = {}
        self.result: DedupResult | None = None
        self.pairs: ReviewPairs | None = None
        self._log: ClusterLog | None = None

    # -- the decision -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Run dedup with the knobs in force and rebuild the review's pair list."""
        with self._lock:
            self.payloads = {p.product_id: p.payload for p in self.index.scroll(with_vectors=False)}
            self.result = run_dedup(
                self.index,
                without_stale_calibration(self.knobs),
                progress=self._progress,
                keep_scored=True,
            )
            self.pairs = review_pairs(
                self.result.table, self.result.fired_at, self.knobs.pair_model.min_probability
            )

    def _ready(self) -> tuple[DedupResult, ReviewPairs]:
        if self.result is None or self.pairs is None:
            self.refresh()
        assert self.result is not None and self.pairs is not None
        return self.result, self.pairs

    # -- asking -------------------------------------------------------------------------------
    def queue(self, size: int) -> list[dict[str, Any]]:
        """The next `size` pairs to ask about (`queue.next_batch`), as the page shows them."""
        with self._lock:
            result, pairs = self._ready()
            current = self.answers.current()
            kinds = {a.answer for a in current} - {"unsure"}
            # all answers one way: ask where the other answer is likelier (calibration needs it)
            side = {"different": 1, "same": -1}.get(kinds.pop()) if len(kinds) == 1 else 0
            rows = next_batch(pairs, {a.key for a in current}, size, side or 0)
            return [
                pair_view(pairs.frame.loc[row], pairs.ids, self.payloads, result.fired_at)
                for row in rows
            ]

    def pair(self, id_a: str, id_b: str) -> dict[str, Any] | None:
        """One candidate pair as the page shows it (None when it is not a candidate pair)."""
        with self._lock:
            result, pairs = self._ready()
            row = pairs.find(id_a, id_b)
            if row is None:
                return None
            return pair_view(row, pairs.ids, self.payloads, result.fired_at)

    def status(self) -> dict[str, Any]:
        """Progress: answers by kind, candidate pairs, uncertain pairs left, what decides."""
        with self._lock:
            result, pairs = self._ready()
            current = self.answers.current()
            counts = {kind: 0 for kind in ("same", "different", "unsure")}
            for answer in current:
                counts[answer.answer] += 1
            report = self.answers.last_report()
            return {
                "collection": self.index.collection,
                "products": len(pairs.ids),
                "candidate_pairs": len(pairs.frame),
                "matched_pairs": int(pairs.frame["match"].sum()),
                "answered": len(current),
                "counts": counts,
                "uncertain_left": uncertain_left(pairs, {a.key for a in current}),
                "decided_by": result.decided_by,
                "min_probability": self.knobs.pair_model.min_probability,
                "calibration": (
                    self.knobs.pair_model.calibration.model_dump()
                    if self.knobs.pair_model.calibration
                    else None
                ),
                "settled": report.get("settled") if report else None,
                "answers_file": str(self.answers.path),
                "settings_file": str(self.write_settings) if self.write_settings else None,
            }

    # -- clusters -----------------------------------------------------------------------------
    def clusters(self) -> list[dict[str, Any]]:
        """The clusters of two or more products, largest first: number, size and how many of
        their member-vs-representative pairs have an answer."""
        with self._lock:
            result, _ = self._ready()
            answered = {a.key for a in self.answers.current()}
            out = []
            for number, members in cluster_members(result.clusters).items():
                if len(members) < 2:
                    continue
                first = members[0]
                done = sum(frozenset((first, m)) in answered for m in members[1:])
                out.append({"number": number, "size": len(members), "reviewed": done})
            return sorted(out, key=lambda c: (-c["size"], c["number"]))

    def members(self, number: int) -> list[str]:
        """A cluster's products, its representative (the first) first; [] when unknown."""
        with self._lock:
            result, _ = self._ready()
            return cluster_members(result.clusters).get(number, [])

    def cluster(self, number: int) -> dict[str, Any] | None:
        """A cluster as the page shows it: its members (the representative first) with each
        one's current answer against the representative."""
        with self._lock:
            members = self.members(number)
            if len(members) < 2:
                return None
            answers = {a.key: a.answer for a in self.answers.current()}
            first = members[0]
            shown = []
            for member in members:
                view = product_view(member, self.payloads.get(member, {}))
                view["answer"] = answers.get(frozenset((first, member)))
                shown.append(view)
            return {"number": number, "representative": first, "members": shown}

    def confirm_cluster(self, number: int) -> int:
        """Answer 'same' for each member against the representative (members already answered
        'different' against it are left as they are); returns how many answers were stored."""
        with self._lock:
            members = self.members(number)
            answers = {a.key: a.answer for a in self.answers.current()}
            first = members[0] if members else ""
            triples = [
                (first, m, "same")
                for m in members[1:]
                if answers.get(frozenset((first, m))) != "different"
            ]
            return len(self.answers.record(triples, source="cluster")) if triples else 0

    def split_member(self, number: int, member: str) -> int:
        """Answer 'different' between `member` and every other member of the cluster; returns
        how many answers were stored (0 when `member` is not in it)."""
        with self._lock:
            members = self.members(number)
            if member not in members:
                return 0
            triples = [(member, m, "different") for m in members if m != member]
            return len(self.answers.record(triples, source="cluster"))

    # -- calibrating --------------------------------------------------------------------------
    # -- merges proposed by assignments (the stored clusters) --------------------------------------
    def proposed_merges(self) -> list[dict[str, Any]]:
        """The stored clusters' pending merge proposals: the two clusters (a few titles of each)
        and the product that linked them."""
        log = self._cluster_log()
        if log is None:
            return []
        out = []
        for event in log.pending_merges():
            clusters = {
                c: [m.product_id for m in log.members(c)]
                for c in (event.cluster_id, event.detail["with"])
            }
            out.append(
                {
                    "cluster_id": event.cluster_id,
                    "with": event.detail["with"],
                    "product": event.products[0],
                    "titles": {
                        c: [self._title(pid) for pid in members[:4]]
                        for c, members in clusters.items()
                    },
                    "sizes": {c: len(members) for c, members in clusters.items()},
                }
            )
        return out

    def decide_merge(self, cluster_id: str, other: str, merge: bool) -> bool:
        """Merge two stored clusters (or keep them apart) and record the answer as pair labels
        (each cluster's first member against the other's); False when no such proposal is
        pending."""
        log = self._cluster_log()
        pending = log.pending_merges() if log else []
        if log is None or not any(
            {e.cluster_id, e.detail["with"]} == {cluster_id, other} for e in pending
        ):
            return False
        first = [log.members(c)[0].product_id for c in (cluster_id, other)]
        with self._lock:
            self.answers.record([(*first, "same" if merge else "different")], source="merge")
            if merge:
                moved = log.merge(cluster_id, other, {"reviewed": True})
                self.index.set_payload(moved, {CLUSTER_KEY: cluster_id})
            else:
                log.keep_apart(cluster_id, other, {"reviewed": True})
        return True

    def _cluster_log(self) -> ClusterLog | None:
        path = state_file(self.index.settings, "clusters")
        if not path.is_file():
            return None
        if self._log is None:
            self._log = ClusterLog(path)
        return self._log

    def _title(self, product_id: str) -> str:
        return str(self.payloads.get(product_id, {}).get("title") or product_id)

    def calibrate(self) -> dict[str, Any]:
        """Fit the calibration from the current answers, apply it (the dedup result is
        recomputed with it), write it to the settings file when the session has one, and keep
        the report; returns the report (with `error` set when no calibration could be fitted)."""
        with self._lock:
            result, pairs = self._ready()
            pair = self.knobs.pair_model
            report, fit = build_report(
                result.table,
                pairs,
                self.answers.labels(),
                result.fired_at,
                result.scored,
                pair.min_probability,
                self.index.settings.formula.min_fused_score,
            )
            report["written_to"] = None
            if fit is not None:
                changes = {"calibration": fit.settings, "min_probability": fit.min_probability}
                self.knobs = self.knobs.model_copy(
                    update={"pair_model": pair.model_copy(update=changes)}
                )
                if self.write_settings is not None:
                    write_calibration(self.write_settings, report["calibration"])
                    report["written_to"] = str(self.write_settings)
                self.refresh()
            self.answers.save_report(report)
            return report
