"""`b2trl train` as separate processes: killed and resumed, and launched with torchrun as one two-process run."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from b2trl.cli import main

TESTS = Path(__file__).resolve().parent
PROBE = TESTS / "scripts" / "run_cli.py"
TINY_RUN = [
    "--sample_num_steps", "6", "--sample_batch_size", "2", "--sample_num_batches_per_epoch", "1",
    "--num_branches", "3", "--initial_length", "2", "--train_gradient_accumulation_steps", "1",
    "--train_learning_rate", "1e-2", "--reward", "helpers:brightness_reward", "--prompts", "a cat", "a dog",
    "--selection_rule", "best_worst",  # see helpers.small_config
]


def _stages(out: Path) -> tuple[list, list]:
    jsonl = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    with open(out / "metrics.csv") as f:
        table = [int(row["stage"]) for row in csv.DictReader(f)]
    return jsonl, table


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_killed_then_resumed_run_has_every_stage_once(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = ["--pretrained_model", tiny_model_dir, "--output_dir", str(out), *TINY_RUN, "--num_epochs", "6",
             "--num_stages", "6", "--save_freq", "1", "--branch_images", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "b2trl", "train", *flags], cwd=TESTS, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run never logged two stages"
            time.sleep(0.02)
        assert process.poll() is None  # killed mid-run, not after it
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    logged_before = _stages(out)[0]
    assert 2 <= len(logged_before) < 6

    monkeypatch.chdir(TESTS)
    main(["train", *flags, "--resume_from", "latest"])
    jsonl, table = _stages(out)
    assert jsonl == table == list(range(6))  # rows of stages that ran again were replaced, not repeated
    assert json.loads((out / "summary.json").read_text())["reward"] == "helpers:brightness_reward"


def test_torchrun_makes_one_run_of_two_processes(tiny_model_dir, tmp_path):
    out, probes = tmp_path / "run", tmp_path / "probes"
    probes.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_DIR=str(probes))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(PROBE), "train", "--pretrained_model", tiny_model_dir, "--output_dir", str(out), *TINY_RUN,
           "--num_epochs", "2", "--num_stages", "2", "--accelerator_kwargs", '{"cpu": true}']
    try:
        done = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the two-process run did not finish in 300 s (a hang)")
    assert done.returncode == 0, done.stderr[-4000:]
    # the main process alone reports, samples for the card and writes the metrics
    assert done.stdout.count("Done in") == 1 and done.stdout.count("2 process(es)") == 1, done.stdout
    jsonl, table = _stages(out)
    assert jsonl == table == [0, 1]
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert row["groups_total"] == 2 * 2  # 2 prompts per stage on each of the 2 processes
        assert row["samples_total"] == 2 * 2 * 3
    ranks = [torch.load(probes / f"rank{i}.pt") for i in range(2)]
    for a, b in zip(ranks[0]["trained"], ranks[1]["trained"]):
        assert torch.equal(a, b)  # one model, trained together
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["initial"], ranks[0]["trained"]))  # and it trained
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
