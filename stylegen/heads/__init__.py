"""Classification heads over cover feature vectors, all following scikit-learn's contract.

Every head also shares one calling contract, so callers never special-case a head by name::

    head.fit(X, y, **fit_params)                 # returns self; classes_ in column order
    head.predict_proba(X, exclude=None, tabular=None)

* ``exclude[i]`` is the position, among the rows the head was fitted on, of query ``i``
  when the query *is* one of them (else -1). Neighbour-based heads leave that row out of
  the query's own vote (scikit-learn's ``kneighbors(X=None)`` idea); parametric heads have
  no votes to leave out and ignore it.
* ``tabular`` holds per-item numeric features (rows aligned with ``X``) for hybrid heads;
  heads that do not read a table ignore it.

Names are imported lazily. Each fitted head compiles to plain arrays
(:mod:`stylegen.heads.compiled`, ``head.compile()``), which is how every head predicts;
:func:`load_predictor` loads that form without scikit-learn or torch (the query path).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EnsembleHead": "ensemble",
    "HierarchicalHead": "hierarchical",
    "HierarchyHead": "hierarchy",
    "load_head": "io",
    "load_predictor": "io",
    "read_head_info": "io",
    "save_head": "io",
    "KNNHead": "knn",
    "vote": "knn",
    "vote_multi": "knn",
    "LinearHead": "linear",
    "MLPHead": "mlp",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'stylegen.heads' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stylegen.heads.{_WHERE[name]}"), name)
