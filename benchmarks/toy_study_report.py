"""The report of `toy_study.py`: aggregate finished runs into a markdown page and PNG plots.

Pure Python, NumPy and (optionally) matplotlib: no torch. The page's "What the numbers say" section holds only
facts computed from the runs; interpretation is written by a person in a marked block that regenerating the
report keeps.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# the sibling modules import as top-level ones, whether this file runs as a script or is loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (also the study's writer of run records: report.write_json)

TEMPLATES = ("single", "binding", "relation")
DESCRIPTIONS = {
    "b2": "B²-DiffuRL (`B2DiffuRLTrainer`): branch groups, best/worst selection, backward progressive interval",
    "ddpo": "plain TRL `DDPOTrainer` (trl 0.23.1): independent trajectories, per-prompt stat tracking, "
            "every timestep trained",
    "b2_pairs": "B² with `selection_rule=\"pairs\"`: a group's best and worst branch together, zero-sum "
                "advantages",
    "b2_n2": "B²-DiffuRL with more, smaller groups: 32 prompts × 2 branches per stage (the toy preset)",
    "b2_all": "B² without selection: branch groups and schedule kept, every branch trained with its z-score",
    "b2_no_schedule": "B² training the whole trajectory from stage 0 (branches fork at step 0)",
    "b2_no_branching": "B² with one branch per prompt: every sample trained with its per-prompt z-score",
    "b2_start": "B² with the interval anchored at the start (`IntervalSchedule(anchor=\"start\")`): the first steps "
                "trained, branches fork at the initial noise, the remaining steps finish each branch untrained",
    "b2_start_pairs": "B² with the interval anchored at the start and `selection_rule=\"pairs\"`: the first steps "
                      "trained, a group's best and worst branch together with zero-sum advantages",
    "b2_dpo": "B² with the DPO-style loss (`loss_type=\"dpo\"`): each kept group's best and worst branch as a "
              "(winner, loser) pair against the base model",
    "d3po": "the D3PO baseline with this trainer: pairs sharing only the initial noise (branch point 0), the "
            "whole trajectory trained, the DPO loss on every pair whose rewards differ",
}
MODEL_TITLES = {
    "sd": ("SD toy model", "the shipped SD1.x toy model (`b2trl.toy.model_path()`, DDIM, eta 1)"),
    "sd3": ("flow toy model", "the shipped flow-matching toy model (`b2trl.toy.model_path(\"sd3\")`, the SDE "
            "sampler)"),
}
INTERPRETATION_START = "<!-- interpretation: written by hand; the report generator keeps this block as it is -->"
INTERPRETATION_END = "<!-- end of interpretation -->"
EMPTY_INTERPRETATION = "_Not written yet._"


def inside(path, folder) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def load_runs(runs_dir) -> list[dict]:
    """Finished run records (partial and stale files are ignored), sorted by method and seed."""
    records = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        record = json.loads(path.read_text())
        if record.get("status") == "done":
            records.append(record)
    return sorted(records, key=lambda r: (r["method"], r["seed"]))


# ------------------------------------------------------------------------------------------------ aggregation


def _stats(values) -> dict:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not x.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def summarize_method(records: list[dict]) -> dict:
    """Curve and final statistics over the seeds of one method (evaluation points present in every seed)."""
    common = sorted(set.intersection(*[{p["images"] for p in r["curve"]} for r in records]))
    points = []
    for images in common:
        at = [next(p for p in r["curve"] if p["images"] == images) for r in records]
        points.append({
            "images": images,
            "overall": _stats([p["overall"] for p in at]),
            "per_template": {t: _stats([p["per_template"].get(t) for p in at]) for t in TEMPLATES},
            "diversity": _stats([p.get("diversity") for p in at]),
        })
    finals = [r["final"] for r in records]
    return {
        "method": records[0]["method"],
        "seeds": [r["seed"] for r in records],
        "budget": sorted({r["study"]["budget_images"] for r in records}),
        "images_per_stage": records[0]["images_per_stage"],
        "points": points,
        "final": {
            "images": sorted({f["images"] for f in finals}),
            "overall": _stats([f["overall"] for f in finals]),
            "per_seed_overall": [f["overall"] for f in finals],
            "per_template": {t: _stats([f["per_template"].get(t) for f in finals]) for t in TEMPLATES},
            "relation_attribute": _stats([f["per_attribute"].get("relation") for f in finals]),
            "diversity": _stats([f.get("diversity") for f in finals]),
        },
        "wall": {k: _stats([r["wall"][k] for r in records]) for k in records[0]["wall"]},
        "lora_max_change": _stats([r.get("lora_max_change") for r in records]),
        "settings": records[0]["settings"],
    }


def summarize_base(records: list[dict]) -> dict:
    """The base model: every run's evaluation at 0 sampled images (all runs start from the same model)."""
    starts = [r["curve"][0] for r in records if r["curve"] and r["curve"][0]["images"] == 0]
    overall = [p["overall"] for p in starts]
    return {
        "overall": _stats(overall),
        "spread": (max(overall) - min(overall)) if overall else None,
        "per_template": {t: _stats([p["per_template"].get(t) for p in starts]) for t in TEMPLATES},
        "relation_attribute": _stats([p["per_attribute"].get("relation") for p in starts]),
        "diversity": _stats([p.get("diversity") for p in starts]),
    }


# ------------------------------------------------------------------------------------------------ facts


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mean_sd(stats: dict) -> str:
    """``mean ± sd`` over seeds, or the mean alone (one seed has no spread)."""
    return f"{_f(stats['mean'])} ± {_f(stats['std'])}" if stats["n"] > 1 else _f(stats["mean"])


def _signed(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def _leaders(values: dict) -> list[str]:
    """The keys of `values` sharing its highest value (ties are common: the reward is coarse)."""
    top = max(values.values())
    return [k for k, v in values.items() if v >= top - 1e-9]


def _overlap(a: dict, b: dict) -> bool:
    return max(a["min"], b["min"]) <= min(a["max"], b["max"])


def computed_facts(summaries: dict, base: dict) -> list[str]:
    """Sentences stating what the numbers are (rankings, differences, overlaps); no interpretation."""
    facts = []
    methods = list(summaries)
    budgets = {m: s["budget"] for m, s in summaries.items()}
    grids = {m: [p["images"] for p in s["points"]] for m, s in summaries.items()}
    if len({tuple(b) for b in budgets.values()}) == 1 and len({tuple(g) for g in grids.values()}) == 1:
        grid = next(iter(grids.values()))
        facts.append(f"Every method sampled {grid[-1]} images per seed and was evaluated at the same "
                     f"{len(grid)} points ({', '.join(map(str, grid))} sampled images).")
    else:
        facts.append("The methods' budgets or evaluation points differ: "
                     + "; ".join(f"{m}: {grids[m]}" for m in methods) + ". Comparisons below are not at equal budget.")
    if base["spread"] is not None:
        facts.append(f"Base model (0 sampled images): held-out alignment {_f(base['overall']['mean'])}; the "
                     f"starting evaluations of all runs differ by at most {_f(base['spread'], 4)}.")

    ranked = sorted(methods, key=lambda m: summaries[m]["final"]["overall"]["mean"], reverse=True)
    if len(ranked) >= 2:
        best, second = (summaries[m]["final"]["overall"] for m in ranked[:2])
        overlap = "overlap" if _overlap(best, second) else "do not overlap"
        finals = {m: summaries[m]["final"]["overall"]["mean"] for m in ranked}
        leaders = _leaders(finals)
        if len(leaders) > 1:
            facts.append(f"At the final budget {', '.join(leaders)} tie for the highest mean held-out alignment, "
                         f"{_f(best['mean'])}.")
        else:
            spread = (f"Their per-seed ranges [{_f(best['min'])}, {_f(best['max'])}] and [{_f(second['min'])}, "
                      f"{_f(second['max'])}] {overlap}." if min(best["n"], second["n"]) > 1
                      else "With one seed for at least one of them there is no spread to compare.")
            facts.append(
                f"At the final budget the highest mean held-out alignment is {ranked[0]}'s, {_mean_sd(best)} "
                f"({_plural(best['n'], 'seed')}), {_f(best['mean'] - second['mean'])} above the next, {ranked[1]} "
                f"({_mean_sd(second)}). {spread}"
            )
        order = f"{ranked[0]} ({_f(finals[ranked[0]])})"
        for prev, m in zip(ranked, ranked[1:]):
            order += (" = " if finals[prev] - finals[m] < 1e-9 else " > ") + f"{m} ({_f(finals[m])})"
        facts.append(f"Ranking by final mean: {order}.")

    base_mean = base["overall"]["mean"]
    if base_mean is not None:
        for m in methods:
            final = summaries[m]["final"]
            above = sum(v > base_mean for v in final["per_seed_overall"] if v is not None)
            facts.append(f"{m}: {_f(base_mean)} → {_f(final['overall']['mean'])} "
                         f"({_signed(final['overall']['mean'] - base_mean)}); {above} of "
                         f"{len(final['per_seed_overall'])} seeds end above the base.")

    if "ddpo" in summaries:
        target = summaries["ddpo"]["final"]["overall"]["mean"]
        ddpo_points = {p["images"]: p["overall"]["mean"] for p in summaries["ddpo"]["points"]}
        for m in methods:
            if m == "ddpo":
                continue
            points = summaries[m]["points"]
            reached = next((p["images"] for p in points if p["overall"]["mean"] >= target), None)
            later = [p for p in points if p["images"] > 0 and p["images"] in ddpo_points]
            ahead = sum(p["overall"]["mean"] > ddpo_points[p["images"]] for p in later)
            budget = points[-1]["images"] if points else None
            if base_mean is not None and target <= base_mean:
                reach = f"ddpo's final mean ({_f(target)}) is not above the base, so there is no images-to-reach"
            elif reached is not None and budget:
                reach = (f"first reaches ddpo's final mean ({_f(target)}) at {reached} sampled images "
                         f"({100 * reached / budget:.0f}% of the budget)")
            else:
                reach = f"does not reach ddpo's final mean ({_f(target)})"
            facts.append(f"{m}: mean above ddpo's at {ahead} of {len(later)} evaluation points after the start; "
                         f"{reach}.")

    for t in TEMPLATES:
        have = [m for m in methods if summaries[m]["final"]["per_template"][t]["mean"] is not None]
        if not have:
            continue
        means = {m: summaries[m]["final"]["per_template"][t]["mean"] for m in have}
        leaders = _leaders(means)
        facts.append(f"{t} prompts: highest final mean {_f(means[leaders[0]])} ({', '.join(leaders)}); "
                     f"base {_f(base['per_template'][t]['mean'])}.")

    base_div = base["diversity"]["mean"]
    divs = [(m, summaries[m]["final"]["diversity"]["mean"]) for m in methods]
    if base_div is not None and all(d is not None for _, d in divs):
        facts.append(f"Diversity (RMS distance between evaluation seeds, 0–255; base {_f(base_div, 1)}): "
                     + ", ".join(f"{m} {_f(d, 1)} ({_signed(d - base_div, 1)})" for m, d in divs) + ".")

    reference = summaries.get("ddpo") or summaries[methods[0]]
    ref_time = reference["wall"]["train_seconds"]["mean"]
    facts.append(f"Training wall time per run (sampling, rewards and updates; evaluation excluded), relative to "
                 f"{reference['method']}: " + ", ".join(
                     f"{m} {_f(summaries[m]['wall']['train_seconds']['mean'], 0)} s "
                     f"(×{summaries[m]['wall']['train_seconds']['mean'] / ref_time:.2f})" for m in methods) + ".")
    unchanged = [m for m in methods if not summaries[m]["lora_max_change"]["min"]]
    if unchanged:
        facts.append("LoRA weights did not change in at least one run of: " + ", ".join(unchanged) + ".")
    return facts


# ------------------------------------------------------------------------------------------------ plots


def plot_curves(summaries: dict, img_dir: Path, prefix: str = "study") -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(summaries)}
    # distinct markers and dashes keep methods with equal values visible on top of each other
    styles = {m: {"marker": "osD^v<>"[i % 7], "ms": 4, "linestyle": ("-", "--", "-.", ":")[i % 4]}
              for i, m in enumerate(summaries)}
    n_seeds = sorted({len(s["seeds"]) for s in summaries.values()})
    band = "band: min–max over seeds" if max(n_seeds) > 1 else "one seed"

    def draw(ax, extract):
        for m, s in summaries.items():
            x = [p["images"] for p in s["points"]]
            stats = [extract(p) for p in s["points"]]
            if any(st["mean"] is None for st in stats):
                continue
            ax.plot(x, [st["mean"] for st in stats], color=colours[m], label=m, **styles[m])
            ax.fill_between(x, [st["min"] for st in stats], [st["max"] for st in stats], color=colours[m], alpha=0.15)
        ax.set_xlabel("sampled images")
        ax.grid(alpha=0.3)

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw(ax, lambda p: p["overall"])
    ax.set_ylabel("held-out alignment")
    ax.set_title(f"Held-out alignment vs sampled images (mean; {band})")
    ax.legend(loc="best")
    fig.tight_layout()
    paths.append(img_dir / f"{prefix}_alignment.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(TEMPLATES), figsize=(13, 3.8), sharex=True)
    for ax, t in zip(axes, TEMPLATES):
        draw(ax, lambda p, t=t: p["per_template"][t])
        ax.set_title(f"{t} prompts")
    axes[0].set_ylabel("held-out alignment")
    axes[-1].legend(loc="best")
    fig.suptitle(f"Per template (mean; {band})")
    fig.tight_layout()
    paths.append(img_dir / f"{prefix}_templates.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ markdown


def _kept_interpretation(md_path: Path) -> str:
    if not md_path.exists():
        return EMPTY_INTERPRETATION
    text = md_path.read_text()
    start, end = text.find(INTERPRETATION_START), text.find(INTERPRETATION_END)
    if start < 0 or end < start:
        return EMPTY_INTERPRETATION
    return text[start + len(INTERPRETATION_START):end].strip() or EMPTY_INTERPRETATION


def _schedule_text(settings: dict) -> str:
    sched = settings.get("interval_schedule")
    if not sched:
        return "all steps"
    if sched.get("milestones"):
        return f"L from {sched['initial_length']}, milestones {sched['milestones']}"
    start = sched.get("initial_length", 14)
    if start >= settings["sample_num_steps"]:
        return f"all {settings['sample_num_steps']} steps"
    where = "first" if sched.get("anchor") == "start" else "last"
    return f"{where} L {start} → {settings['sample_num_steps']} over {sched.get('num_stages', 100)} stages"


def render(summaries, base, facts, records, plots, md_path, command) -> str:
    first = records[0]
    study = first["study"]
    n_prompts, n_eval_seeds = len(first["eval_prompts"]), len(study["eval_seeds"])
    model = study.get("model", "sd")
    title, what = MODEL_TITLES.get(model, (model, model))
    has_ddpo = any(s["settings"]["trainer"] == "ddpo" for s in summaries.values())
    methods = ", DPO-style methods and plain TRL `DDPOTrainer`" if has_ddpo else " and DPO-style methods"
    lines = [
        f"# Toy study: sample efficiency at an equal image budget — {title}",
        "",
        "<!-- Generated by benchmarks/toy_study.py. Regenerating it rewrites everything except the "
        "interpretation block. -->",
        "",
        "Newer: [study v3](study_v3.md) compares the field's methods at equal *compute*, and says why the trainer's "
        "default rule changed.",
        "",
        f"B²-DiffuRL, ablations of it{methods}, trained on the [toy world](toy_world.md)'s "
        f"RL prompts with {what} for the same number of sampled images per seed. Held-out alignment is the exact "
        "alignment "
        f"reward on {_plural(n_prompts, 'held-out prompt')} × {_plural(n_eval_seeds, 'evaluation seed')} "
        f"({', '.join(map(str, study['eval_seeds']))}; fixed, independent of the training seed), measured before "
        f"training and every {study['eval_every_images']} sampled images.",
        "",
        "| method | what it is | images per stage | trained interval | selection |",
        "|---|---|---|---|---|",
    ]
    for m, s in summaries.items():
        cfg = s["settings"]
        if cfg["trainer"] == "b2":
            branches = _plural(cfg["num_branches"], "branch", "branches")
            shape = f"{_plural(cfg['sample_batch_size'], 'prompt')} × {branches}"
            selection = f"{cfg['selection_rule']} (τ {cfg['selection_threshold_best']} / " \
                        f"{cfg['selection_threshold_worst']})" if cfg["selection_rule"] == "best_worst" \
                else cfg["selection_rule"]
            if cfg.get("loss_type", "ppo") != "ppo":
                selection += f", {cfg['loss_type'].upper()} loss"
        else:
            shape, selection = f"{_plural(cfg['sample_batch_size'], 'prompt')} × 1", "all"
        lines.append(f"| `{m}` | {DESCRIPTIONS.get(m, '')} | {s['images_per_stage']} ({shape}) | "
                     f"{_schedule_text(cfg)} | {selection} |")

    lines += [
        "",
        "## Results",
        "",
        "Final held-out alignment: mean ± sample standard deviation over seeds, per-seed range in brackets (the "
        "value alone for a method with one seed so far). "
        "Template columns and diversity are means over seeds. Train time covers sampling, rewards and updates "
        "(evaluation excluded); sampling is the part spent generating images.",
        "",
        "| method | seeds | images | held-out alignment | single | binding | relation | relation attribute | "
        "diversity | train time (s) | sampling (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base model | – | 0 | {_f(base['overall']['mean'])} | "
        + " | ".join(_f(base["per_template"][t]["mean"]) for t in TEMPLATES)
        + f" | {_f(base['relation_attribute']['mean'])} | {_f(base['diversity']['mean'], 1)} | – | – |",
    ]
    for m, s in summaries.items():
        fin, wall = s["final"], s["wall"]
        o = fin["overall"]
        spread = f" [{_f(o['min'])}, {_f(o['max'])}]" if o["n"] > 1 else ""
        lines.append(
            f"| `{m}` | {len(s['seeds'])} | {', '.join(map(str, fin['images']))} | {_mean_sd(o)}{spread} | "
            + " | ".join(_f(fin["per_template"][t]["mean"]) for t in TEMPLATES)
            + f" | {_f(fin['relation_attribute']['mean'])} | {_f(fin['diversity']['mean'], 1)} | "
            f"{_f(wall['train_seconds']['mean'], 0)} | {_f(wall['sample_seconds']['mean'], 0)} |"
        )
    points = sorted({p["images"] for s in summaries.values() for p in s["points"]})
    lines += [
        "",
        "Held-out alignment at every evaluation point (mean ± sample standard deviation over seeds, the mean alone "
        "for one seed; a run that degrades late shows here what it reached on the way):",
        "",
        "| method | " + " | ".join(f"{n} images" for n in points) + " |",
        "|---|" + "---|" * len(points),
    ]
    for m, s in summaries.items():
        at = {p["images"]: p["overall"] for p in s["points"]}
        cells = [_mean_sd(at[n]) if n in at and at[n]["mean"] is not None else "–" for n in points]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines.append("")
    for path in plots:
        rel = os.path.relpath(path, md_path.parent)
        lines += [f"![{path.stem}]({rel})", ""]

    lines += ["## What the numbers say", "",
              "<!-- Computed from the runs on every regeneration: facts only. -->", ""]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", "### Interpretation", "", INTERPRETATION_START, _kept_interpretation(md_path), INTERPRETATION_END,
              ""]

    commands = list(dict.fromkeys(r["command"] for r in records))
    machines = {}
    for r in records:
        desc = {k: v for k, v in r["machine"].items() if k != "load_average_at_start"}
        machines.setdefault(json.dumps(desc, sort_keys=True), (desc, []))[1].append(r["machine"].get(
            "load_average_at_start"))
    lines += ["## How it was produced", "", "Runs:", "", "```bash"] + commands + ["```", ""]
    if command not in commands:
        lines += ["This page:", "", "```bash", command, "```", ""]
    for desc, loads in machines.values():
        loads = [x for x in loads if x is not None]
        load_text = f"; 1-minute load average at the start of a run {min(loads):.1f}–{max(loads):.1f}" if loads else ""
        lines.append(
            f"Machine: {desc['cpu']}, {desc['cpu_count']} CPUs ({desc['cpus_usable']} usable), "
            f"{desc['torch_threads']} torch thread(s), {desc['system']}; Python {desc['python']}, "
            f"torch {desc['torch']}, diffusers {desc['diffusers']}, trl {desc['trl']}{load_text}. Finished "
            f"{max(r['finished_at'] for r in records)}."
        )
    codes = list(dict.fromkeys(r.get("code", "unknown") for r in records))
    lines += ["", f"Code: commit {', '.join(codes)}."]
    lines += ["", "## Settings", "", "The resolved configuration of each method (as recorded in its runs):", "",
              "```json", json.dumps({"study": {k: v for k, v in study.items()},
                                     **{m: s["settings"] for m, s in summaries.items()}}, indent=1), "```", ""]
    return "\n".join(lines)


def write_report(runs_dir, report_dir, command: str, allow_quick: bool, method_order=(),
                 page: str = "study.md") -> Path:
    """Aggregate the finished runs under `runs_dir` into `report_dir`/`page` and its plots,
    `report_dir`/img/<page's stem>_*.png."""
    records = load_runs(runs_dir)
    if not records:
        raise SystemExit(f"error: no finished runs under {runs_dir}")
    if not allow_quick and any(r.get("quick") for r in records):
        raise SystemExit("error: these runs come from --quick; their report does not go into docs/ "
                         "(pass --report_dir elsewhere)")
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    order = [m for m in method_order if m in by_method] + sorted(set(by_method) - set(method_order))
    summaries = {m: summarize_method(by_method[m]) for m in order}
    base = summarize_base(records)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    md_path = report_dir / page
    plots = plot_curves(summaries, report_dir / "img", Path(page).stem)
    md_path.write_text(render(summaries, base, computed_facts(summaries, base), records, plots, md_path, command))
    # the aggregated numbers stay beside the runs; docs/ gets only the page and its plots
    write_json(Path(runs_dir).parent / "summary.json",
               {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": base,
                "methods": summaries})
    return md_path
