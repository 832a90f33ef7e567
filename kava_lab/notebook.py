"""Notebook-job hygiene: a papermill parameter the notebook does not declare is an error, not a warning.

Papermill injects ``-p NAME VALUE`` as assignments in a cell after the ``parameters`` cell and only warns about
a name the notebook does not declare, so ``-p methd pccot`` silently runs the defaults. Each notebook snapshots
its globals before the parameters cell and calls :func:`check_parameters` after the injected cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def check_parameters(namespace: Mapping[str, object], before: Iterable[str], declared: Iterable[str]) -> None:
    """Raise if a public name appeared after ``before`` that is not one of the ``declared`` parameters."""
    declared = set(declared)
    unknown = {name for name in namespace if not name.startswith("_")} - set(before) - declared
    if unknown:
        raise NameError(f"unknown notebook parameter(s) {sorted(unknown)} (misspelled -p?); this notebook takes "
                        f"{sorted(declared)}")
