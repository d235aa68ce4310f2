"""The robustness suite's ledger: every attacked input is recorded with its outcome, and a summary
(inputs per category, clear errors, `crashes: N`, `data lost: N`) is printed at the end of the run.

Use the `ledger` fixture: `ledger.record(category, outcome, detail="")` with outcome one of
"ok" (worked as it should), "clear_error" (refused with one clear error), "crash" (any other
exception, a traceback, a hang) or "data_lost" (a checkpoint or file the user had is gone or corrupt).
Tests also assert; the ledger is what the summary counts.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

OUTCOMES = ("ok", "clear_error", "crash", "data_lost")


class Ledger:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []

    def record(self, category: str, outcome: str, detail: str = "") -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.counts[category][outcome] += 1
        if outcome in ("crash", "data_lost"):
            self.failures.append(f"{category}: {outcome}: {detail}")

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not LEDGER.counts:
        return
    write = terminalreporter.write_line
    terminalreporter.section("robustness summary")
    write(f"{'category':<14} {'inputs':>7} {'ok':>6} {'clear errors':>13} {'crashes':>8} {'data lost':>10}")
    for category in sorted(LEDGER.counts):
        c = LEDGER.counts[category]
        write(
            f"{category:<14} {sum(c.values()):>7} {c['ok']:>6} {c['clear_error']:>13} {c['crash']:>8} "
            f"{c['data_lost']:>10}"
        )
    for failure in LEDGER.failures:
        write(f"  {failure}")
    write(f"crashes: {LEDGER.total('crash')}")
    write(f"data lost: {LEDGER.total('data_lost')}")
