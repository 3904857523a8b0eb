"""What a check says when it passes or warns: one line for people, fields for journald."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Note:
    """One line for the task log: a check that passed, or a warning."""

    text: str
    check: str  # the check that says it (journald's ACTION), e.g. CheckArgs, CheckTapLinks
    nic: str = ""
    port: str = ""

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in (("action", self.check), ("nic", self.nic), ("port", self.port)) if v}
