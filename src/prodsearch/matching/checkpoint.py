"""A resumable pass: finished records appended to a JSON-lines file under a fingerprint.

The first line holds the fingerprint of everything that determines the records (the caller
builds it: options, search settings, the collection's content). A re-run with the same
fingerprint reads back the records written so far and appends the rest; any other fingerprint
starts the file over. A line cut by a kill is cut off before anything is appended, so a second
kill never loses what was written after the first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class Checkpoint:
    """The records of one resumable pass (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        #: bytes of the file that hold the header and whole records (set by `records`)
        self._valid_bytes = 0

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield the records a previous run wrote under this fingerprint, up to a cut line;
        nothing when the file is missing or was written under another fingerprint."""
        self._valid_bytes = 0
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            header = handle.readline()
            if not _is_header(header, self.fingerprint):
                return
            self._valid_bytes = len(header)
            for line in handle:
                record = _record(line)
                if record is None:  # cut by a kill: that batch is redone
                    return
                self._valid_bytes += len(line)
                yield record

    def appender(self) -> IO[str]:
        """Open the file for appending after the valid records `records` read (call it after
        reading them all), or start it over with the header."""
        if self._valid_bytes == 0:
            handle = self.path.open("w", encoding="utf-8")
            handle.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            handle.flush()
            return handle
        handle = self.path.open("r+", encoding="utf-8")
        handle.truncate(self._valid_bytes)
        handle.seek(self._valid_bytes)
        return handle


def _is_header(line: bytes, fingerprint: str) -> bool:
    try:
        return json.loads(line).get("fingerprint") == fingerprint
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None
