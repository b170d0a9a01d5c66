"""Recipe search: the best recipes for a model under constraints, on Optuna.

``search(model, data=..., objectives=[...], constraints=[...], trials=N)`` samples recipes
from a space built from the method registry (each config's ``search_space``, the family
order rules), measures each with ``slimline.evaluate`` against the original model, and
returns a :class:`SearchResult` with the Pareto front. Optuna is imported only when a search
runs (``pip install slimline[search]``).

Not yet done (issue 14): the PostgreSQL multi-worker test (two workers, a killed worker's
trial retried — the heartbeat and ``RetryFailedTrialCallback`` are wired in ``study.py``, not
tested), a per-worker seed, the energy-per-1,000-items star rating, and the
``benchmarks/search.py`` runs for BENCHMARKS.md.
"""

from __future__ import annotations

from slimline.search.ranges import Choice, FloatRange, IntRange, SearchSpace
from slimline.search.result import SearchResult, TrialRecord
from slimline.search.runner import search

__all__ = ["Choice", "FloatRange", "IntRange", "SearchResult", "SearchSpace", "TrialRecord",
           "search"]
