"""Past one machine: ingest and dedup on Ray (the optional extra `pip install prodsearch[ray]`).

`ingest --ray` (`scaleout.ingest`) and `dedup --ray` (`scaleout.dedup`) run the local path's own
per-batch functions (row validation, content hashes, encoding, candidate queries, pair features
and the decision) in Ray tasks and actors; nothing of the matching is re-implemented here.
"""

from __future__ import annotations

import os
from typing import Any

from prodsearch.errors import ConfigError

#: `--ray` given without an address: start (or join, when RAY_ADDRESS is set) a local Ray
LOCAL_RAY = "local"
#: CPUs each encoding or query actor asks for: fractions, so that on a small machine the actors
#: never take every CPU from the Ray Data read tasks (whole CPUs per actor hang on 2 cores)
ACTOR_CPUS = 0.5


def require_ray() -> Any:
    """Return the `ray` module; raises ConfigError saying how to install it when it is absent."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "--ray needs Ray: pip install 'prodsearch[ray]' (or: pip install 'ray[data]>=2.40')"
        ) from exc
    return ray


def start_ray(address: str | None) -> Any:
    """Connect to the Ray cluster at `address` (`auto`, `ray://host:10001`), or, for None or
    LOCAL_RAY, start a local Ray on this machine's cores (joining RAY_ADDRESS when set).
    Returns the `ray` module; a running connection is reused."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address in (None, LOCAL_RAY) and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=None if address in (None, LOCAL_RAY) else address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def is_server(store: str) -> bool:
    """True when `store` is a Qdrant server or cluster URL, which every worker can reach (the
    embedded engine and qdrant-client's local mode admit one opener: the driver)."""
    return store.startswith(("http://", "https://"))
