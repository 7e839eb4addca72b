"""The durable copy of a job's record: ``<out>/job.json`` beside the job's output.

Redis holds the live record; a Redis that lost its data (persistence off, a wiped volume) would lose
every job with it. So the engine writes the record and its counters to the job's output folder at
every state change and at every student checkpoint, atomically (a temporary file renamed into place,
so a reader never sees half a copy), and the control plane rebuilds a missing record from it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COPY_FILE = "job.json"


def copy_path(out: str | Path) -> Path:
    return Path(out) / COPY_FILE


def write_copy(out: str | Path, job_id: str, record: dict[str, str], counters: dict[str, str]) -> Path:
    """Write ``{id, record, counters}`` to ``out/job.json`` atomically; returns the path."""
    path = copy_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"id": job_id, "record": record, "counters": counters, "written": time.time()}
    fd, tmp = tempfile.mkstemp(prefix=".job-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_copy(path: str | Path) -> dict[str, Any] | None:
    """A copy as ``write_copy`` wrote it; None when it is missing or not one (logged)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable job copy %s: %s", path, exc)
        return None
    if not (isinstance(data, dict) and isinstance(data.get("id"), str) and isinstance(data.get("record"), dict)):
        log.warning("ignoring %s: not a job copy", path)
        return None
    return data


def overlay_copy(out: str | Path, job_id: str, **fields: Any) -> Path | None:
    """Write ``fields`` over the last copy, for a state change Redis did not take (it is down)."""
    last = read_copy(copy_path(out))
    if last is None or last["id"] != job_id:
        return None
    given = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    record = {**last["record"], **given, "updated": str(time.time())}
    return write_copy(out, job_id, record, last.get("counters", {}))


def find_copies(roots: Iterable[str | Path]) -> Iterator[Path]:
    """The copies of every job below ``roots`` (one folder per job: ``root/<job>/job.json``)."""
    for root in roots:
        yield from sorted(Path(root).glob(f"*/{COPY_FILE}"))
