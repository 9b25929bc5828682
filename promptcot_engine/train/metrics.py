"""metrics.jsonl: one JSON object per line, {"event": "data" | "resume" | "step" | "end", ...}. Step
lines are flushed as they happen; a resumed run first drops the step lines after the checkpoint it
continues from, so the file always reads as one run."""
from __future__ import annotations

import json
from pathlib import Path

from promptcot_engine.jsonl import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, output_dir: str | Path | None, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE if output_dir is not None else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _keep(line, resume_step)]
            atomic_write_text(self.path, "".join(kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


def _keep(line: str, resume_step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by the kill that made this a resume
        return False
    return record.get("event") != "end" and record.get("step", 0) <= resume_step
