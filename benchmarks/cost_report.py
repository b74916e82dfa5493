"""The cost benchmark's report: B²/DDPO ratios, the checks of denoiser rows against the settings, the comparison with
reference figures measured on an H100, and the printed tables."""

from __future__ import annotations

import common
from cost_measure import METHODS, expected_unet_rows

# Figures measured on one NVIDIA H100 80GB (SD1.5 shape, random weights, 512 px, 20 DDIM steps, eta 1.0,
# guidance 5.0, fp16, batch 8, LoRA r4), and what b2trl should reach on the same card.
REFERENCE_H100 = {
    "plain_images_per_s": 6.04,
    "ddpo_sampling_images_per_s": 4.25,
    "ddpo_training_transitions_per_s": 24.2,
    "ddpo_epoch_16_images_s": 17.0,
    "peak_memory_gb_plain": 6.5,
    "peak_memory_gb_ddpo_epoch": 11.6,
}
TARGETS_H100 = {
    "b2_sampling_images_per_s": 8.5,
    "b2_training_transitions_per_s": 72.0,
    "stage_cost_per_image_vs_ddpo": 1 / 3,
}


def ratio(a, b):
    return a / b if a is not None and b else None


def ratios(b2: dict, ddpo: dict) -> dict:
    out = {
        "unet_rows_sampling": ratio(b2["unet_rows"]["sampling"], ddpo["unet_rows"]["sampling"]),
        "unet_rows_training": ratio(b2["unet_rows"]["training"], ddpo["unet_rows"]["training"]),
        "seconds_sampling": ratio(b2["seconds"]["sampling"], ddpo["seconds"]["sampling"]),
        "seconds_training": ratio(b2["seconds"]["training"], ddpo["seconds"]["training"]),
        "seconds_total": ratio(b2["seconds"]["total"], ddpo["seconds"]["total"]),
        "images_per_s": ratio(b2["images_per_s"], ddpo["images_per_s"]),
        "transitions_per_s": ratio(b2["transitions_per_s"], ddpo["transitions_per_s"]),
        "peak_memory": ratio(b2["peak_memory_bytes"]["step"], ddpo["peak_memory_bytes"]["step"]),
    }
    total_rows = ratio(
        b2["unet_rows"]["sampling"] + b2["unet_rows"]["training"],
        ddpo["unet_rows"]["sampling"] + ddpo["unet_rows"]["training"],
    )
    out["unet_rows_total"] = total_rows
    return out


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def print_report(report: dict) -> None:
    machine = report["machine"]
    print(f"{machine['device']}: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads")
    if report["methods"]:
        print_methods(report)
    if "optimisations" in report:
        print_optimisations(report["optimisations"])
    if "reference_comparison" in report:
        print("\nAgainst the H100 reference figures:")
        for item in report["reference_comparison"]:
            print(f"  {item['what']:<48} measured {_fmt(item['measured'])}  reference {_fmt(item['reference'])}")


def print_methods(report: dict) -> None:
    methods = report["methods"]
    names = [m for m in METHODS if m in methods]
    header = {"b2": "B²-DiffuRL stage", "b2_dpo": "B² stage, DPO loss", "ddpo": "TRL DDPO epoch",
              "plain": "plain diffusers"}
    # rows of the denoiser: the UNet, or SD3's transformer (the JSON keys keep the name unet_rows)
    gib = 1 / 2**30
    rows = [
        ("images sampled", lambda r: r["images"]),
        ("denoiser rows, sampling", lambda r: r["unet_rows"]["sampling"]),
        ("denoiser rows, training", lambda r: r["unet_rows"]["training"]),
        ("VAE decode rows", lambda r: r["vae_decode_rows"]),
        ("transitions trained", lambda r: r["transitions_trained"]),
        ("seconds, sampling", lambda r: r["seconds"]["sampling"]),
        ("seconds, reward", lambda r: r["seconds"]["reward"]),
        ("seconds, training", lambda r: r["seconds"]["training"]),
        ("seconds, total step", lambda r: r["seconds"]["total"]),
        ("images/s (sampling)", lambda r: r["images_per_s"]),
        ("transitions/s (training)", lambda r: r["transitions_per_s"]),
        ("seconds per sampled image", lambda r: r["seconds_per_image"]),
        ("peak memory, step (GiB)", lambda r: (r["peak_memory_bytes"]["step"] or 0) * gib),
    ]
    ratio_keys = {
        "denoiser rows, sampling": "unet_rows_sampling", "denoiser rows, training": "unet_rows_training",
        "seconds, sampling": "seconds_sampling", "seconds, training": "seconds_training",
        "seconds, total step": "seconds_total", "images/s (sampling)": "images_per_s",
        "transitions/s (training)": "transitions_per_s", "seconds per sampled image": "seconds_total",
        "peak memory, step (GiB)": "peak_memory",
    }
    widths = [28] + [18] * len(names) + [10]
    line = "".join(h.ljust(w) for h, w in zip(["", *[header[n] for n in names], "B²/DDPO"], widths))
    print(line)
    print("-" * len(line))
    for label, get in rows:
        cells = [label] + [_fmt(get(methods[n])) for n in names]
        cells.append(_fmt(report.get("ratios", {}).get(ratio_keys.get(label))))
        print("".join(c.ljust(w) for c, w in zip(cells, widths)))
    print(f"(memory: {methods[names[0]]['memory_kind']})")
    if "b2" in methods:
        b2 = methods["b2"]
        print(f"B² kept {b2['samples_kept']} of {b2['images']} samples ({b2['groups_kept']} groups), "
              f"interval {b2['interval_length']} of {report['settings']['num_steps']} steps")
    if "b2_dpo" in methods:
        dpo = methods["b2_dpo"]
        print(f"B² with the DPO loss kept {dpo['samples_kept']} samples ({dpo['groups_kept']} pairs); reference pass "
              f"{_fmt(dpo['reference_seconds'])} s of {_fmt(dpo['seconds']['training'])} s training")
        for key, value in report.get("dpo_vs_ppo", {}).items():
            print(f"  DPO / PPO stage, {key}: {_fmt(value)}")
    for name, check in report.get("checks", {}).items():
        print(f"check {name}: measured {check['measured']}, expected {check['expected']} "
              f"-> {'ok' if check['ok'] else 'MISMATCH'}")


def print_optimisations(opt: dict) -> None:
    print(f"\nMicro-benchmarks (attention processors: {', '.join(opt['attention_processors'])}):")
    stack = opt.get("stacking", {})
    for name, speedup in stack.get("speedup_vs_k1", {}).items():
        print(f"  training, {name} interval steps per UNet call: {speedup:.2f}x transitions/s of k=1 "
              f"(gradient rel. diff {stack['gradient_max_relative_difference_vs_k1'][name]:.1e})")
    if stack.get("out_of_memory"):
        print(f"  training, k={stack['out_of_memory']} interval steps per UNet call: out of memory")
    for key, label in (("sdpa", "SDPA vs classic attention"), ("channels_last", "channels-last vs contiguous"),
                       ("compile", "torch.compile vs eager")):
        if key in opt:
            print(f"  {label}: sampling {opt[key]['speedup_sampling']:.2f}x, "
                  f"training {opt[key]['speedup_training']:.2f}x")
    if "compile" in opt:
        c = opt["compile"]
        first = c["first_call_seconds"]
        print(f"  compile first calls: sampling {first['sampling']:.0f} s, training {first['training']:.0f} s; "
              f"log-prob difference {c['log_prob_max_abs_difference']:.1e}")


def reference_comparison(report: dict) -> list:
    methods, out = report["methods"], []

    def add(what, measured, reference):
        out.append({"what": what, "measured": measured, "reference": reference})

    if "plain" in methods:
        add("plain diffusers images/s", methods["plain"]["images_per_s"], REFERENCE_H100["plain_images_per_s"])
        add("plain diffusers peak memory GiB", (methods["plain"]["peak_memory_bytes"]["step"] or 0) / 2**30,
            REFERENCE_H100["peak_memory_gb_plain"])
    if "ddpo" in methods:
        add("TRL DDPO sampling images/s", methods["ddpo"]["images_per_s"], REFERENCE_H100["ddpo_sampling_images_per_s"])
        add("TRL DDPO training transitions/s", methods["ddpo"]["transitions_per_s"],
            REFERENCE_H100["ddpo_training_transitions_per_s"])
        add("TRL DDPO epoch seconds per image", methods["ddpo"]["seconds_per_image"],
            REFERENCE_H100["ddpo_epoch_16_images_s"] / 16)
        add("TRL DDPO peak memory GiB", (methods["ddpo"]["peak_memory_bytes"]["step"] or 0) / 2**30,
            REFERENCE_H100["peak_memory_gb_ddpo_epoch"])
    if "b2" in methods:
        add("B² sampling images/s (target)", methods["b2"]["images_per_s"], TARGETS_H100["b2_sampling_images_per_s"])
        add("B² training transitions/s (target)", methods["b2"]["transitions_per_s"],
            TARGETS_H100["b2_training_transitions_per_s"])
    if "ratios" in report:
        add("B²/DDPO cost per sampled image (target, at most)", report["ratios"]["seconds_total"],
            TARGETS_H100["stage_cost_per_image_vs_ddpo"])
    return out


def build_report(args, methods: dict, optimisations=None) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "out")}
    machine = common.machine_description(args.device, ("torch", "diffusers", "transformers", "trl", "peft"))
    report = {"settings": settings, "machine": machine, "methods": methods}
    expected = expected_unet_rows(args)
    checks = {}
    if "b2" in methods:
        checks["b2_sampling_rows"] = (methods["b2"]["unet_rows"]["sampling"], expected["b2_sampling"])
        b2 = methods["b2"]
        checks["b2_training_rows"] = (b2["unet_rows"]["training"], args.cfg_rows * b2["transitions_trained"])
    if "b2_dpo" in methods:
        dpo = methods["b2_dpo"]
        checks["b2_dpo_sampling_rows"] = (dpo["unet_rows"]["sampling"], expected["b2_sampling"])
        # the policy's rows plus one reference row per kept transition (CFG doubles both)
        reference_rows = args.cfg_rows * dpo["samples_kept"] * dpo["interval_length"]
        checks["b2_dpo_training_rows"] = (dpo["unet_rows"]["training"],
                                          args.cfg_rows * dpo["transitions_trained"] + reference_rows)
    for name in ("b2", "b2_dpo"):
        counted = methods.get(name, {}).get("compute_counter_rows")
        if counted:
            # the trainer's compute/denoiser_rows counter against the hook's count (the reference pass runs in the
            # training phase)
            rows = methods[name]["unet_rows"]
            checks[f"{name}_compute_counter_sampling"] = (counted["sampling"], rows["sampling"])
            checks[f"{name}_compute_counter_training"] = (counted["training"] + counted["reference"], rows["training"])
    if "ddpo" in methods:
        checks["ddpo_sampling_rows"] = (methods["ddpo"]["unet_rows"]["sampling"], expected["ddpo_sampling"])
        checks["ddpo_training_rows"] = (methods["ddpo"]["unet_rows"]["training"], expected["ddpo_training"])
    report["checks"] = {k: {"measured": m, "expected": e, "ok": m == e} for k, (m, e) in checks.items()}
    if "b2" in methods and "ddpo" in methods:
        report["ratios"] = ratios(methods["b2"], methods["ddpo"])
    if "b2" in methods and "b2_dpo" in methods:
        ppo, dpo = methods["b2"], methods["b2_dpo"]
        per_transition = [m["seconds"]["training"] / m["transitions_trained"] if m["transitions_trained"] else None
                          for m in (dpo, ppo)]
        report["dpo_vs_ppo"] = {
            "seconds_total": ratio(dpo["seconds"]["total"], ppo["seconds"]["total"]),
            "seconds_training": ratio(dpo["seconds"]["training"], ppo["seconds"]["training"]),
            "training_seconds_per_trained_transition": ratio(*per_transition),
            "reference_share_of_training": ratio(dpo["reference_seconds"], dpo["seconds"]["training"]),
        }
    if optimisations is not None:
        report["optimisations"] = optimisations
    if args.device == "cuda" and args.sd15_random and not args.tiny_width and args.resolution == 512:
        report["reference_comparison"] = reference_comparison(report)
    return report
