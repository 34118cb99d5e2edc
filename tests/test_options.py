"""Options shared by both taps: host tuning hints."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.logger import LogEvent, Logger, formatEvent

from stripeproxy.cli.options import check_host_tuning


@pytest.mark.parametrize(("value", "hinted"), [("1\n", True), ("0\n", False)])
def test_slow_start_after_idle_is_pointed_out(tmp_path: Path, value: str, hinted: bool) -> None:
    setting = tmp_path / "tcp_slow_start_after_idle"
    setting.write_text(value)
    events: list[LogEvent] = []
    check_host_tuning(Logger(observer=events.append), str(setting))
    messages = [formatEvent(e) for e in events]
    assert bool(messages) == hinted
    if hinted:
        assert "deploy/sysctl/90-stripeproxy.conf" in messages[0]


def test_no_proc_no_hint(tmp_path: Path) -> None:
    events: list[LogEvent] = []
    check_host_tuning(Logger(observer=events.append), str(tmp_path / "missing"))
    assert events == []
