"""The remote reward client and the scoring server, against servers on the loopback address (port 0)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from b2trl.rewards import (
    RemoteReward,
    RemoteRewardError,
    RemoteRewardTimeout,
    RemoteRewardUnreachable,
    get_reward,
)
from b2trl.rewards.remote import images_to_png_base64, png_base64_to_images
from b2trl.rewards.serve import make_server

PROMPTS = ["a cat", "a red car", "a lighthouse", "a tree", "a boat"]
WEIGHTS = torch.tensor([0.2, 0.7, 0.1])


def weighted_reward(images, prompts, prompt_metadata):
    """Depends on every pixel and on the prompt, and reports parts as the trainer expects."""
    colour = (images.float().mean(dim=(2, 3)) * WEIGHTS.to(images.device)).sum(-1)
    length = torch.tensor([len(p) / 10 for p in prompts], device=images.device)
    return colour + length, {"components": {"colour": colour, "length": length}, "note": "weighted"}


def metadata_reward(images, prompts, prompt_metadata):
    return torch.tensor([float(m["target"]) for m in prompt_metadata]), {}


def failing_reward(images, prompts, prompt_metadata):
    raise RuntimeError("the scorer ran out of memory")


def nan_reward(images, prompts, prompt_metadata):
    return torch.tensor([1.0, float("nan")]), {}


@pytest.fixture
def images():
    return torch.rand(5, 3, 24, 20, generator=torch.Generator().manual_seed(0))


def png_rounded(images):
    return (images * 255).round() / 255


@contextmanager
def running(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/score"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def reward_server(reward_fn, **kwargs):
    with running(make_server(reward_fn, port=0, quiet=True, **kwargs)) as url:
        yield url


@contextmanager
def raw_server(respond):
    """A server of our own that answers POSTs with `respond(request_number, body) -> (status, bytes, delay)`."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(json.loads(body))
            status, payload, delay = respond(len(calls), calls[-1])
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with running(server) as url:
        yield url, calls


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- codec


def test_png_round_trip_is_uint8_rounding(images):
    decoded = png_base64_to_images(images_to_png_base64(images))
    assert decoded.dtype == torch.float32 and decoded.shape == images.shape
    assert torch.equal(decoded, png_rounded(images))
    assert torch.equal(png_base64_to_images(images_to_png_base64(images, compress_level=0)), decoded)
    with pytest.raises(ValueError, match=r"images\[0\] is not a base64-encoded PNG"):
        png_base64_to_images(["bm90IGEgcG5n"])
    with pytest.raises(ValueError, match="one size"):
        png_base64_to_images(images_to_png_base64(images[:1]) + images_to_png_base64(torch.rand(1, 3, 8, 8)))


# --------------------------------------------------------------------------------------- normal use


def test_rewards_equal_the_wrapped_reward_on_png_rounded_images(images):
    with reward_server(weighted_reward) as url:
        client = get_reward("remote", url=url, timeout=10)
        rewards, meta = client(images, PROMPTS, None)
    expected, parts = weighted_reward(png_rounded(images), PROMPTS, None)
    assert rewards.dtype == torch.float32 and rewards.device == images.device
    assert torch.equal(rewards, expected)  # exact: same uint8 pixels, float32 values survive JSON
    assert set(meta["components"]) == {"colour", "length"}
    assert torch.equal(meta["components"]["colour"], parts["components"]["colour"])
    assert meta["server"][0]["note"] == "weighted"
    # the rounding to uint8 is the only change: the raw images score a little differently
    assert not torch.equal(weighted_reward(images, PROMPTS, None)[0], rewards)


def test_batch_size_splits_into_several_posts(images):
    calls = []

    def counting(images, prompts, metadata):
        calls.append(len(prompts))
        return weighted_reward(images, prompts, metadata)

    with reward_server(counting) as url:
        whole, _ = RemoteReward(url)(images, PROMPTS, None)
        split, meta = RemoteReward(url, batch_size=2)(images, PROMPTS, None)
    assert calls == [5, 2, 2, 1]
    assert torch.equal(whole, split)
    assert len(meta["server"]) == 3 and meta["components"]["length"].shape == (5,)


def test_prompt_metadata_reaches_the_server_and_must_be_json(images):
    with reward_server(metadata_reward) as url:
        client = RemoteReward(url)
        rewards, _ = client(images[:2], PROMPTS[:2], [{"target": 3}, {"target": -1.5}])
        assert rewards.tolist() == [3.0, -1.5]
        with pytest.raises(ValueError, match=r"prompt_metadata\[1\] \(dict\) cannot be sent as JSON"):
            client(images[:2], PROMPTS[:2], [{"target": 1}, {"target": torch.tensor(2.0)}])


def test_non_finite_rewards_travel_as_null(images):
    with reward_server(nan_reward) as url:
        rewards, _ = RemoteReward(url)(images[:2], PROMPTS[:2], None)
    assert rewards[0] == 1.0 and torch.isnan(rewards[1])


# ------------------------------------------------------------------------------------- failure modes


def test_server_down_at_build_time_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    start = time.monotonic()
    with pytest.raises(RemoteRewardUnreachable, match=f"no scoring server answers at {url}"):
        get_reward("remote", url=url)
    assert time.monotonic() - start < 5
    assert isinstance(RemoteRewardUnreachable("x"), ConnectionError)
    RemoteReward(url, check=False)  # the check can be skipped


def test_server_that_goes_down_after_build(images):
    with reward_server(weighted_reward) as url:
        client = RemoteReward(url, retries=1, backoff=0.01)
    with pytest.raises(RemoteRewardUnreachable, match=f"{url}"):
        client(images, PROMPTS, None)


def test_slow_server_times_out_after_retries_naming_the_url(images):
    with raw_server(lambda n, body: (200, b'{"rewards": [0, 0, 0, 0, 0]}', 1.0)) as (url, calls):
        client = RemoteReward(url, timeout=0.2, retries=2, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(RemoteRewardTimeout, match=rf"{url} did not answer within 0.2 s, 3 attempt\(s\)"):
            client(images, PROMPTS, None)
        elapsed = time.monotonic() - start
    assert len(calls) == 3 and elapsed < 2.0
    assert isinstance(RemoteRewardTimeout("x"), TimeoutError)


def test_a_retry_recovers_from_one_slow_answer(images):
    answer = json.dumps({"rewards": [1, 2, 3, 4, 5]}).encode()
    with raw_server(lambda n, body: (200, answer, 1.0 if n == 1 else 0.0)) as (url, calls):
        rewards, _ = RemoteReward(url, timeout=0.3, retries=1, backoff=0.01)(images, PROMPTS, None)
    assert rewards.tolist() == [1, 2, 3, 4, 5] and len(calls) == 2
    assert calls[1]["prompts"] == PROMPTS and len(calls[1]["images"]) == 5 and calls[1]["metadata"] == [{}] * 5


def test_error_status_names_url_status_and_message(images):
    with reward_server(failing_reward) as url:
        with pytest.raises(RemoteRewardError, match=rf"{url} answered HTTP 500: .*RuntimeError: the scorer ran out"):
            RemoteReward(url)(images, PROMPTS, None)
    with raw_server(lambda n, body: (503, b"<html>busy</html>", 0.0)) as (url, calls):
        with pytest.raises(RemoteRewardError, match=rf"{url} answered HTTP 503: <html>busy</html>"):
            RemoteReward(url, retries=3)(images, PROMPTS, None)
        assert len(calls) == 1  # an error status is not retried


def test_wrong_number_of_rewards(images):
    with raw_server(lambda n, body: (200, b'{"rewards": [0.5, 0.25]}', 0.0)) as (url, _):
        with pytest.raises(RemoteRewardError, match=rf"{url} answered HTTP 200 with 2 rewards for 5 images"):
            RemoteReward(url)(images, PROMPTS, None)


@pytest.mark.parametrize("body", [b"not json", b'{"scores": [1, 2, 3, 4, 5]}', b'{"rewards": ["1", 2, 3, 4, 5]}',
                                  b"[1, 2, 3, 4, 5]"])
def test_malformed_body(body, images):
    with raw_server(lambda n, _: (200, body, 0.0)) as (url, _):
        with pytest.raises(RemoteRewardError, match=rf"{url} answered HTTP 200 with a body that is not"):
            RemoteReward(url)(images, PROMPTS, None)


def test_client_argument_errors():
    with pytest.raises(ValueError, match="`url` must be an http:// or https:// URL"):
        RemoteReward("localhost:8000")
    for kwargs, field in [({"timeout": 0}, "timeout"), ({"retries": -1}, "retries"), ({"batch_size": 0}, "batch_size"),
                          ({"png_compression": 10}, "png_compression")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            RemoteReward("http://127.0.0.1:1/", check=False, **kwargs)


# ------------------------------------------------------------------------------------------- server


def _post(url, payload: bytes):
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_refuses_bad_requests_with_4xx(images):
    good = {"prompts": PROMPTS[:1], "images": images_to_png_base64(images[:1]), "metadata": [{}]}
    with reward_server(weighted_reward, max_request_bytes=50_000) as url:
        with urllib.request.urlopen(url, timeout=10) as response:  # GET: what is served here
            assert json.loads(response.read()) == {"reward": "weighted_reward", "protocol": "b2trl-reward/1",
                                                   "method": "POST"}
        assert _post(url, json.dumps(good).encode())[0] == 200
        assert _post(url, json.dumps({**good, "metadata": None}).encode())[0] == 200  # metadata is optional
        status, answer = _post(url, b"{not json")
        assert status == 400 and "not JSON" in answer["error"]
        status, answer = _post(url, json.dumps({**good, "prompts": PROMPTS[:2]}).encode())
        assert status == 400 and "one base64 PNG per prompt" in answer["error"]
        status, answer = _post(url, json.dumps({**good, "images": ["%%%"]}).encode())
        assert status == 400 and "not a base64-encoded PNG" in answer["error"]
        # ~100 kB: over the limit, yet small enough to sit in the socket buffers while the server answers unread
        noise = images_to_png_base64(torch.rand(1, 3, 160, 160))
        status, answer = _post(url, json.dumps({**good, "images": noise}).encode())
        assert status == 413 and "exceeds the limit" in answer["error"]


def test_server_reports_a_reward_returning_the_wrong_shape(images):
    with reward_server(lambda images, prompts, metadata: (torch.zeros(2), {})) as url:
        with pytest.raises(RemoteRewardError, match=r"HTTP 500: .*expected \(5,\)"):
            RemoteReward(url)(images, PROMPTS, None)


def test_command_line_server_answers(tmp_path):
    from b2trl.toy import alignment_reward, render, train_prompts

    prompts = train_prompts()[:4]
    images = torch.from_numpy(render(prompts, seed=1))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's b2trl, wherever pytest runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "b2trl.rewards.serve", "toy_alignment", "--host", "127.0.0.1", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert lines and lines[0].startswith("Serving reward 'toy_alignment' on http://127.0.0.1:"), (
            lines, process.poll() is not None and process.stderr.read())
        url = lines[0].split(" on ")[1].split(" ")[0]
        rewards, meta = RemoteReward(url, timeout=30)(images, prompts, None)
        expected, per_image = alignment_reward(png_rounded(images), prompts)
        assert torch.equal(rewards, expected)
        assert meta["server"][0]["value"] == per_image  # a list of per-image dicts, wrapped in an object
    finally:
        process.terminate()
        process.wait(timeout=10)
