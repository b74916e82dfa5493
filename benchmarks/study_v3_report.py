"""The page of study v3 (`study_v3.py`): equal-compute and equal-image tables from the finished runs.

Pure Python and NumPy. The generated part holds only facts computed from the run records; the interpretation is
written by a person between markers that regenerating the page keeps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_study_report import INTERPRETATION_END, INTERPRETATION_START, _kept_interpretation  # noqa: E402

TASK_TITLES = {
    ("alignment", "sd"): "Alignment, SD toy model",
    ("alignment", "sd3"): "Alignment, flow toy model",
    ("relation", "sd"): "Relation order, SD toy model",
}
COLLAPSE_DROP = 0.2  # a run whose last held-out score is this far below the base is counted as collapsed


def metric(point: dict, task: str) -> float:
    """The task's held-out score: alignment over every attribute, or the relation attribute alone."""
    if task == "relation":
        return float(point["per_attribute"].get("relation", np.nan))
    return float(point["overall"])


def load(results: Path) -> dict:
    """``{(task, model): [finished run records]}``."""
    found = {}
    for folder in sorted(p for p in Path(results).glob("*_*") if (p / "runs").is_dir()):
        records = []
        for path in sorted((folder / "runs").glob("*.json")):
            if path.name.endswith(".partial.json"):
                continue
            record = json.loads(path.read_text())
            if record.get("status") == "done":
                records.append(record)
        if records:
            found[(records[0]["task"], records[0]["model"])] = records
    return found


def _cell(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _at(record: dict, label: str, task: str):
    point = next((p for p in record["curve"] if p["label"] == label), None)
    return None if point is None else metric(point, task)


def base_standard_error(records: list[dict], task: str):
    """The standard error of the base model's held-out score where it is a proportion (the relation attribute: one
    yes/no per held-out image), else None."""
    if task != "relation":
        return None
    start = records[0]["curve"][0]
    p, n = metric(start, task), start["num_images"]
    return float(np.sqrt(p * (1 - p) / n))


def summarize(records: list[dict], task: str, order=()) -> dict:
    """Per method: its seeds' scores at every compute and image point, collapses, compute to reach base + 0.05."""
    base = float(np.mean([metric(r["curve"][0], task) for r in records]))
    methods = {}
    rank = {name: i for i, name in enumerate(order)}
    for record in sorted(records, key=lambda r: (rank.get(r["method"], len(rank)), r["method"])):
        methods.setdefault(record["method"], []).append(record)
    points = sorted({p["label"] for r in records for p in r["curve"] if p["label"].startswith("compute")})
    summary = {"base": base, "points": points, "methods": {}, "base_se": base_standard_error(records, task),
               "base_images": records[0]["curve"][0]["num_images"]}
    for method, runs in methods.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        by_point = {label: [_at(r, label, task) for r in runs] for label in points}
        by_images = {n: [_at(r, f"{n} images", task) for r in runs] for n in (640, 1280, 1920)}
        finals = [metric(r["final"], task) for r in runs]
        reach = None
        for label in points:  # the first compute point whose seed mean is base + 0.05 or more
            values = [v for v in by_point[label] if v is not None]
            if values and len(values) == len(runs) and np.mean(values) >= base + 0.05:
                reach = np.mean([next(p["compute_rows"] for p in r["curve"] if p["label"] == label) for r in runs])
                break
        summary["methods"][method] = {
            "seeds": [r["seed"] for r in runs], "by_point": by_point, "by_images": by_images, "finals": finals,
            "collapsed": sum(f < base - COLLAPSE_DROP for f in finals), "reach_rows": reach,
            "images_at_budget": [r["images"] for r in runs],
            "diversity": [r["final"]["diversity"] for r in runs],
            "budget_rows": runs[0]["budget_rows"], "wall_seconds": [r["wall_seconds"] for r in runs],
        }
    return summary


def _diversity(values) -> str:
    values = [v for v in values if v is not None]  # one noise seed has no spread between seeds
    return f"{np.mean(values):.1f}" if values else "—"


def render_section(task: str, model: str, summary: dict) -> str:
    lines = [f"## {TASK_TITLES.get((task, model), f'{task}, {model}')}", ""]
    score = "the relation attribute on held-out relation prompts" if task == "relation" else "held-out alignment"
    budget = next(iter(summary["methods"].values()))["budget_rows"]
    lines.append(f"Base model: {score} **{summary['base']:.3f}**. Budget: {budget:,.0f} forward-row "
                 f"equivalents per run. Mean ± SD over training seeds; a run is counted as collapsed when its last "
                 f"score is more than {COLLAPSE_DROP} below the base.")
    se = summary["base_se"]
    if se is not None:
        lines.append(f"The base's score is a proportion over {summary['base_images']} held-out images: standard error "
                     f"{se:.3f}, so a method moves it when its seeds' mean at the budget is more than "
                     f"{2 * se:.3f} (twice that) from the base.")
    lines += ["", "### At equal compute", ""]
    header = ["method", "seeds", *[p.replace("compute ", "") + " of the budget" for p in summary["points"]],
              "images at budget", "collapsed", "diversity", "rows to reach base + 0.05"]
    if se is not None:
        header.append("change at budget")
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, m in summary["methods"].items():
        reach = f"{m['reach_rows'] / 1e3:,.0f}k" if m["reach_rows"] is not None else "not reached"
        row = [f"`{method}`", str(len(m["seeds"])), *[_cell(m["by_point"][p]) for p in summary["points"]],
               f"{np.mean(m['images_at_budget']):,.0f}", f"{m['collapsed']} of {len(m['seeds'])}",
               _diversity(m["diversity"]), reach]
        if se is not None:
            change = float(np.mean(m["finals"])) - summary["base"]
            moved = " (moved up)" if change > 2 * se else " (moved down)" if change < -2 * se else " (within 2 SE)"
            row.append(f"{change:+.3f}{moved}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "### At equal images", ""]
    header = ["method", "640 images", "1,280 images", "1,920 images"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, m in summary["methods"].items():
        cells = []
        for n in (640, 1280, 1920):
            values = m["by_images"][n]
            cells.append(_cell(values) if all(v is not None for v in values) else "— (budget spent before)")
        lines.append("| " + " | ".join([f"`{method}`", *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: Path, page: Path, order=()) -> Path:
    """Write the page from every finished run under `results`; methods appear in `order` (then by name)."""
    found = load(results)
    sections = [render_section(task, model, summarize(records, task, order))
                for (task, model), records in found.items()]
    kept = _kept_interpretation(page) if page.exists() else ""
    text = "\n".join([
        "# Study v3: methods at equal compute",
        "",
        "Generated by `python benchmarks/study_v3.py --report` from the run records in "
        "`benchmarks/results/study_v3/`; the interpretation below is written by hand. How the study runs, and what "
        "each method is: the docstring of `benchmarks/study_v3.py` and [Methods](methods.md).",
        "",
        "## Interpretation",
        "",
        INTERPRETATION_START,
        kept or "_Not written yet._",
        INTERPRETATION_END,
        "",
        *sections,
    ])
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page
