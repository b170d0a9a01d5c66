"""Recipe search: the best recipes for a model under constraints, on Optuna.

``search(model, data=..., objectives=[...], constraints=[...], trials=N)`` samples recipes
from a space built from the method registry (each config's ``search_space``, the family
order rules), measures each with ``slimline.evaluate`` against the original model, and
returns a :class:`SearchResult` with the Pareto front; ``energy_rating=True`` adds energy per
1,000 items of the original and each Pareto recipe with a 1–5 star rating relative to that
front (``energy_rating.py``). Workers on many machines share a study through a database URL
(``study.py``: heartbeat, a dead worker's trial retried). Optuna is imported only when a
search runs (``pip install slimline[search]``).
"""

from __future__ import annotations

from slimline.search.energy_rating import EnergyRating, rate_energy, star_ratings
from slimline.search.ranges import Choice, FloatRange, IntRange, SearchSpace
from slimline.search.result import SearchResult, TrialRecord
from slimline.search.runner import load_search, search

__all__ = ["Choice", "EnergyRating", "FloatRange", "IntRange", "SearchResult", "SearchSpace",
           "TrialRecord", "load_search", "rate_energy", "search", "star_ratings"]
