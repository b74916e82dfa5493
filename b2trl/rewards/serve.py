"""Run any reward function of b2trl's protocol as a scoring server for [`RemoteReward`] (standard library only).

```bash
python -m b2trl.rewards.serve hpsv2 --host 0.0.0.0 --port 8000 --device cuda:1 --arg dtype=float16
```

The protocol is described in [`b2trl.rewards.remote`]: `POST` JSON with base64 PNG images, JSON answer with one
reward per image. The server binds `127.0.0.1` unless told otherwise, calls the reward one request at a time (a
GPU scorer is not re-entrant) and answers `GET` with a short JSON description, which doubles as a health check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .base import as_reward_tensor
from .remote import PROTOCOL, png_base64_to_images

MAX_REQUEST_BYTES = 1 << 30  # 1 GiB: about 2000 noisy 512 px PNGs


def to_json(value):
    """`value` with tensors and arrays turned into lists, non-finite floats into `None` and unknown objects into
    their `str`, so that any reward metadata can be answered as JSON."""
    if isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and type(value).__module__.startswith("numpy"):
        return to_json(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


class _BadRequest(ValueError):
    pass


def _parse_request(body: bytes):
    try:
        request = json.loads(body)
    except ValueError as err:
        raise _BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise _BadRequest('the body must be a JSON object {"prompts": [...], "images": [...], "metadata": [...]}.')
    prompts, images = request.get("prompts"), request.get("images")
    metadata = request.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest('"prompts" must be a list of strings.')
    if not isinstance(images, list) or len(images) != len(prompts):
        raise _BadRequest(f'"images" must be a list with one base64 PNG per prompt ({len(prompts)}).')
    if metadata is None:
        metadata = [{}] * len(prompts)
    if not isinstance(metadata, list) or len(metadata) != len(prompts):
        raise _BadRequest(f'"metadata" must be a list with one object per prompt ({len(prompts)}), or absent.')
    try:
        tensor = png_base64_to_images(images)
    except ValueError as err:
        raise _BadRequest(str(err)) from None
    return tensor, prompts, metadata


def make_server(
    reward_fn: Callable | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | torch.device | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    quiet: bool = False,
    reward_kwargs: dict | None = None,
) -> ThreadingHTTPServer:
    """Build (and bind) a scoring server for `reward_fn`; call `.serve_forever()` on it, or use [`serve`].

    Args:
        reward_fn (callable or `str`): a reward of b2trl's protocol, or a name/`"module:function"` for [`get_reward`].
        host (`str`, *optional*, defaults to `"127.0.0.1"`): the address to bind; `"0.0.0.0"` accepts other
            machines (the server has no authentication: expose it only on a trusted network).
        port (`int`, *optional*, defaults to 8000): the port; 0 picks a free one (read it from
            `server.server_address`).
        device (`str` or `torch.device`, *optional*): where the decoded images are put before the reward is called
            (the built-in scorers also take their own `device=`); default: the CPU.
        max_request_bytes (`int`, *optional*): larger request bodies are refused with status 413.
        quiet (`bool`, *optional*, defaults to `False`): do not log each request to stderr.
        reward_kwargs (`dict`, *optional*): keyword arguments for [`get_reward`] when `reward_fn` is a name.

    Returns:
        `ThreadingHTTPServer`: the bound server. Requests are read concurrently, but the reward is called for one
        request at a time.
    """
    if isinstance(reward_fn, str):
        from .registry import get_reward

        name = reward_fn
        reward_fn = get_reward(reward_fn, **(reward_kwargs or {}))
    else:
        if reward_kwargs:
            raise TypeError("keyword arguments for the reward are only accepted with a reward name.")
        name = getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", None) or type(reward_fn).__name__
    device = torch.device(device) if device is not None else None
    lock = threading.Lock()
    info = json.dumps({"reward": str(name), "protocol": PROTOCOL, "method": "POST"}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _error(self, status: int, message: str) -> None:
            self._answer(status, json.dumps({"error": message}).encode())

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._answer(200, info)

        def do_POST(self):  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._error(411, "a Content-Length header is required.")
            if length > max_request_bytes:
                self.close_connection = True
                return self._error(413, f"request of {length} bytes exceeds the limit of {max_request_bytes}.")
            try:
                images, prompts, metadata = _parse_request(self.rfile.read(length))
            except _BadRequest as err:
                return self._error(400, str(err))
            try:
                with lock, torch.no_grad():
                    out = reward_fn(images.to(device) if device is not None else images, prompts, metadata)
                    rewards, meta = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
                    rewards = as_reward_tensor(rewards, len(prompts), torch.device("cpu"), str(name))
                answer = {"rewards": to_json(rewards.tolist())}
                meta = to_json(meta)
                if meta not in (None, {}):
                    answer["metadata"] = meta if isinstance(meta, dict) else {"value": meta}
                payload = json.dumps(answer).encode()
            except Exception as err:  # the client gets the message; the traceback goes to the server's log
                traceback.print_exc(file=sys.stderr)
                return self._error(500, f"reward {name!r} failed: {type(err).__name__}: {err}")
            self._answer(200, payload)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            if not quiet:
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.reward_name = str(name)
    return server


def serve(reward_fn: Callable | str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Serve `reward_fn` until interrupted (Ctrl-C); see [`make_server`] for the arguments."""
    server = make_server(reward_fn, host=host, port=port, **kwargs)
    bound_host, bound_port = server.server_address[:2]
    print(f"Serving reward {server.reward_name!r} on http://{bound_host}:{bound_port}/ ({PROTOCOL})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _parse_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--arg expects KEY=VALUE, got {text!r}.")
    try:
        return key, json.loads(value)  # numbers, booleans, null, lists, quoted strings
    except ValueError:
        return key, value  # anything else is a plain string (a path, a dtype name, ...)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m b2trl.rewards.serve",
        description="Serve a b2trl reward over HTTP (JSON, base64 PNG images) for b2trl.rewards.RemoteReward.",
    )
    parser.add_argument("reward", help="a reward name (see b2trl.rewards.list_rewards()) or 'package.module:function'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default=None, help="device for the decoded images, e.g. cuda:1 (default: cpu)")
    parser.add_argument("--arg", action="append", type=_parse_arg, default=[], metavar="KEY=VALUE",
                        help="keyword argument for the reward (repeatable), e.g. --arg dtype=float16")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    serve(args.reward, host=args.host, port=args.port, device=args.device, quiet=args.quiet,
          reward_kwargs=dict(args.arg))


if __name__ == "__main__":
    main()
