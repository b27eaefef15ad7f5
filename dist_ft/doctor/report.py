"""What each doctor check found, the verdict, and `doctor.json`.

A check has a status (pass, warn, fail, skip), one line that says what was measured against what, the rank and
node it blames when it fails (the point of the doctor: "which node"), and its measurements for the JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

ORDER = {"fail": 0, "warn": 1, "skip": 2, "pass": 3}


@dataclass
class Check:
    name: str
    status: str                  # pass | warn | fail | skip
    summary: str
    culprit: str | None = None   # the node or rank to look at, when it failed
    details: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(frozen=True)
class Node:
    """Where a rank runs: hostname and the address its peers reach it at (network namespaces and containers can
    share a hostname; the address tells them apart)."""
    rank: int
    host: str
    addr: str

    @property
    def key(self) -> tuple[str, str]:
        return self.host, self.addr

    def __str__(self) -> str:
        return f"rank {self.rank} on {self.host}" + (f" ({self.addr})" if self.addr else "")

    def node_name(self) -> str:
        return self.host + (f" ({self.addr})" if self.addr else "")


def verdict(checks: list[Check]) -> tuple[int, str]:
    """(exit status, the verdict line): non-zero with every failing check and whom it blames."""
    failed = [c for c in checks if c.failed]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        blame = "; ".join(f"{c.name}: {c.culprit + ' - ' if c.culprit else ''}{c.summary}" for c in failed)
        return 1, f"[doctor] FAIL ({len(failed)} of {len(checks)} checks): {blame}"
    passed = sum(c.status == "pass" for c in checks)
    extra = f", {len(warned)} warning(s): " + "; ".join(f"{c.name}: {c.summary}" for c in warned) if warned else ""
    return 0, f"[doctor] PASS ({passed} of {len(checks)} checks passed{extra})"


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"  {c.status.upper():4}  {c.name:{width}}  {c.summary}" for c in checks]
    return "\n".join(lines)


def write_json(path: Path, checks: list[Check], meta: dict) -> Path | None:
    """doctor.json, atomically; None when the filesystem refuses it (a full disk is one of the things found)."""
    code, line = verdict(checks)
    doc = {"verdict": "fail" if code else "pass", "line": line, **meta, "checks": [asdict(c) for c in checks]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
