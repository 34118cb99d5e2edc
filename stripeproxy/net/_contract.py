"""Temporary bridge to the driver API of /tmp/work/CONTRACT.md (helper H2's files).

The subflow and registry code calls the contract's members (``driver.closed``,
``driver.close()``, ``driver.subflow_count``, ``driver.set_memory_budget()``),
which the session-core branch adds.  Until both branches are merged these
helpers use the member when the driver has it and the old path otherwise;
after the merge, inline them and delete this module.
"""

from __future__ import annotations

from typing import Any


def closed(driver: Any) -> bool:
    value = getattr(type(driver), "closed", None)
    if isinstance(value, property):
        return bool(driver.closed)
    return bool(driver.session.closed)


def close(driver: Any, reason: str) -> None:
    if callable(getattr(driver, "close", None)):
        driver.close(reason)
    else:
        driver.session.close(reason)


def subflow_count(driver: Any) -> int:
    if hasattr(type(driver), "subflow_count"):
        return int(driver.subflow_count)
    return len(driver.subflows)


def set_memory_budget(driver: Any, budget: int) -> None:
    if callable(getattr(driver, "set_memory_budget", None)):
        driver.set_memory_budget(budget)
    elif driver.session.memory_budget != budget:
        driver.session.set_memory_budget(budget)
        driver.rearm()  # the budget may have let chunks go out
