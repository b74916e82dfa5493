"""Each stage's statistics on disk, as training goes: metrics.jsonl and metrics.csv."""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Optional


class MetricsWriter:
    """Writes each stage's statistics to metrics.jsonl (appended as training goes) and metrics.csv.

    A fresh run starts both anew. A resumed one (`resume_stage`: the first stage it trains) keeps the earlier
    stages' rows and drops later ones, which ran after its checkpoint and run again: each stage appears once."""

    def __init__(self, output_dir: str, resume_stage: Optional[int] = None):
        self.jsonl = os.path.join(output_dir, "metrics.jsonl")
        self.csv = os.path.join(output_dir, "metrics.csv")
        kept = {}
        if resume_stage is not None and os.path.exists(self.jsonl):
            with open(self.jsonl) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a killed run may be cut short
                        continue
                    if row.get("stage", resume_stage) < resume_stage:
                        kept[row["stage"]] = row
        self.rows: list[dict] = [kept[k] for k in sorted(kept)]
        # time_s goes on from where the kept rows stop
        self.start = time.time() - (self.rows[-1].get("time_s", 0.0) if self.rows else 0.0)
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        self._write_csv()

    def __call__(self, trainer, stats: dict):
        row = {"time_s": round(time.time() - self.start, 2), **stats}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self):
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
