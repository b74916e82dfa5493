"""A reward computed by a scoring server, over HTTP with JSON bodies (never pickle).

Protocol (version 1), also spoken by [`b2trl.rewards.serve`]:

- request: `POST <url>` with `Content-Type: application/json` and the body
  `{"prompts": [str, ...], "images": [str, ...], "metadata": [object, ...]}`, one entry per image; each image is
  a base64-encoded PNG of an 8-bit RGB image; each metadata entry is that prompt's metadata (`{}` when none).
- answer: status 200 with `{"rewards": [float | null, ...]}`, one per image (`null` for a reward that could not
  be computed, read as NaN), optionally with `"metadata": {...}`. Any other status is an error; its body may be
  `{"error": "message"}`.
- `GET <url>` may answer anything: the client only uses it to check that the server is reachable.

Standard library only (urllib, json, base64) plus PIL for PNG, which b2trl already needs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from .base import check_reward_inputs

PROTOCOL = "b2trl-reward/1"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteRewardError(RuntimeError):
    """A scoring server answered with an error status or a body that does not follow the protocol."""


class RemoteRewardTimeout(RemoteRewardError, TimeoutError):
    """A scoring server did not answer in time, after every retry."""


class RemoteRewardUnreachable(RemoteRewardError, ConnectionError):
    """A scoring server could not be reached (connection refused, unknown host, nothing listening)."""


def images_to_png_base64(images: torch.Tensor, compress_level: int = 1) -> list[str]:
    """`(B, 3, H, W)` images in `[0, 1]` as base64 PNG strings of 8-bit RGB (rounded to the nearest level).

    PNG is lossless at every `compress_level` (0-9); 1 is about 1.5x slower than 0 to write and 3-4x smaller on
    natural images, 6 (PIL's default) is several times slower again for little gain.
    """
    from PIL import Image

    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    encoded = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=compress_level)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def png_base64_to_images(encoded) -> torch.Tensor:
    """Inverse of [`images_to_png_base64`]: a float32 `(B, 3, H, W)` tensor in `[0, 1]` (all images one size).

    Raises:
        `ValueError`: an entry that is not base64 PNG/image data, or images of different sizes.
    """
    import binascii

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for index, text in enumerate(encoded):
        if not isinstance(text, str):
            raise ValueError(f"images[{index}] must be a base64 string, got {type(text).__name__}.")
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (binascii.Error, UnidentifiedImageError, OSError) as err:
            raise ValueError(f"images[{index}] is not a base64-encoded PNG: {err}") from None
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"all images of a request must have one size, got {sorted(s[:2] for s in sizes)}.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255


def _metadata_json(prompt_metadata, batch: int) -> list:
    items = [{}] * batch if prompt_metadata is None else list(prompt_metadata)
    for index, item in enumerate(items):
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"prompt_metadata[{index}] ({type(item).__name__}) cannot be sent as JSON ({err}); the remote reward "
                "sends metadata as JSON, so use dicts, lists, strings, finite numbers, booleans and None."
            ) from None
    return [{} if item is None else item for item in items]


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        return str(parsed["error"])
    return text[:300] + ("..." if len(text) > 300 else "")


class RemoteReward:
    """Client of a scoring server: sends each batch to `url` and returns the rewards it answers.

    Use it for a reward that needs another environment, another machine or its own GPUs (a VLM behind an inference
    server, GenEval's detector, an OCR model): run [`b2trl.rewards.serve`] (or any server speaking the protocol in
    this module's docstring) there, and point this client at it.

    Args:
        url (`str`): the server's `http://` or `https://` URL; requests are `POST`ed to it.
        timeout (`float`, *optional*, defaults to 120): seconds to wait for one answer.
        retries (`int`, *optional*, defaults to 2): extra attempts after a timeout or a dropped connection, each
            after a pause of `backoff * 2**k` seconds. Error statuses and malformed answers are not retried.
        backoff (`float`, *optional*, defaults to 1.0): the first pause between attempts, in seconds.
        batch_size (`int`, *optional*): send at most this many images per request (several requests in turn);
            default: the whole batch in one request.
        check (`bool`, *optional*, defaults to `True`): check when the reward is built that the server is reachable
            (a `GET`, whose status does not matter), so that a wrong URL fails before any sampling.
        headers (`dict`, *optional*): extra HTTP headers (e.g. `{"Authorization": "Bearer ..."}`).
        name (`str`, *optional*, defaults to `"remote"`): the part name in a [`CompositeReward`].
        png_compression (`int`, *optional*, defaults to 1): PNG `compress_level` (0-9; lossless at every level):
            0 writes fastest but sends ~4x more bytes, for a fast local link.

    Returns (when called):
        `(rewards, metadata)`: float32 `(B,)` rewards on the images' device (NaN where the server answered
        `null`), and `{"server": [...]}` with the `metadata` object of each answer (one per request, in order),
        plus `"components"` (`{part: float32 tensor}`, concatenated over requests) when the server reports parts
        in `metadata["components"]`, so that the trainer logs them as `reward/<part>`.

    Raises:
        [`RemoteRewardUnreachable`]: at construction, when nothing answers at `url`.
        [`RemoteRewardTimeout`]: no answer within `timeout`, `retries + 1` times.
        [`RemoteRewardError`]: an answer with a status other than 200, a body that is not the protocol's JSON, or
            a wrong number of rewards; the message names the URL and the status.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        batch_size: int | None = None,
        check: bool = True,
        headers: dict | None = None,
        name: str = "remote",
        png_compression: int = 1,
    ):
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"`url` must be an http:// or https:// URL such as 'http://127.0.0.1:8000/', got {url!r}.")
        if not timeout or timeout <= 0:
            raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be a non-negative integer, got {retries!r}.")
        if backoff < 0:
            raise ValueError(f"`backoff` must be >= 0 seconds, got {backoff!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}.")
        if png_compression not in range(10):
            raise ValueError(f"`png_compression` must be an integer from 0 to 9, got {png_compression!r}.")
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.batch_size = batch_size
        self.headers = dict(headers or {})
        self.name = name
        self.png_compression = png_compression
        # loopback traffic never goes through an HTTP proxy from the environment
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        if check:
            self.check_reachable()

    def check_reachable(self) -> None:
        """Raise [`RemoteRewardUnreachable`] unless something answers HTTP at `url` (any status)."""
        request = urllib.request.Request(self.url, headers=self.headers, method="GET")
        try:
            with self._opener.open(request, timeout=min(self.timeout, 10.0)):
                pass
        except urllib.error.HTTPError:
            return  # it answered: reachable, whatever it thinks of a GET
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RemoteRewardUnreachable(
                f"no scoring server answers at {self.url} ({reason}). Start it first (e.g. "
                "`python -m b2trl.rewards.serve <reward> --host 0.0.0.0 --port 8000` on the scoring machine) and check "
                "the host and port, or pass check=False to skip this check."
            ) from err

    def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        attempts = self.retries + 1
        last_error = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.status, self._read(response, time.monotonic() + self.timeout)
            except urllib.error.HTTPError as err:
                return err.code, err.read()
            except (TimeoutError, socket.timeout) as err:
                last_error = err
            except urllib.error.URLError as err:
                # a timeout while connecting arrives wrapped; a refused/reset connection (server restarting) too
                if not isinstance(err.reason, (TimeoutError, socket.timeout, ConnectionError)):
                    raise RemoteRewardUnreachable(f"scoring server {self.url} cannot be reached: {err.reason}") from err
                last_error = err.reason
            except (ConnectionError, http.client.HTTPException) as err:  # e.g. RemoteDisconnected
                last_error = err
        if isinstance(last_error, (TimeoutError, socket.timeout)):
            raise RemoteRewardTimeout(
                f"scoring server {self.url} did not answer within {self.timeout:g} s, {attempts} attempt(s) "
                f"(retries={self.retries}); raise `timeout=` for a slow scorer, or lower `batch_size=`."
            ) from last_error
        raise RemoteRewardUnreachable(
            f"scoring server {self.url} dropped the connection {attempts} time(s): {last_error}"
        ) from last_error

    @staticmethod
    def _read(response, deadline: float) -> bytes:
        # the socket timeout bounds each read; the deadline bounds a server that trickles its answer
        chunks = []
        while chunk := response.read(1 << 16):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("the answer took longer than the timeout to arrive")
        return b"".join(chunks)

    def _score_chunk(self, images, prompts, metadata) -> tuple[list[float], object]:
        body = json.dumps(
            {"prompts": list(prompts), "images": images_to_png_base64(images, self.png_compression),
             "metadata": metadata}
        ).encode("utf-8")
        status, payload = self._post(body)
        if status != 200:
            raise RemoteRewardError(f"scoring server {self.url} answered HTTP {status}: {_error_message(payload)}")
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or not all(
            r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)) for r in rewards
        ):
            raise RemoteRewardError(
                f"scoring server {self.url} answered HTTP {status} with a body that is not "
                f'{{"rewards": [numbers]}}: {_error_message(payload)!r}'
            )
        if len(rewards) != len(prompts):
            raise RemoteRewardError(
                f"scoring server {self.url} answered HTTP {status} with {len(rewards)} rewards for {len(prompts)} "
                "images; it must return one reward per image, in order."
            )
        return [math.nan if r is None else float(r) for r in rewards], answer.get("metadata", {})

    @torch.no_grad()
    def __call__(self, images, prompts, prompt_metadata=None):
        images = check_reward_inputs(images, prompts, prompt_metadata)
        batch = images.shape[0]
        metadata = _metadata_json(prompt_metadata, batch)
        step = self.batch_size or max(batch, 1)
        rewards, server = [], []
        for start in range(0, batch, step):
            values, meta = self._score_chunk(
                images[start : start + step], prompts[start : start + step], metadata[start : start + step]
            )
            rewards.extend(values)
            server.append(meta)
        result = {"server": server}
        components = _components(server, images.device)
        if components:
            result["components"] = components
        return torch.tensor(rewards, dtype=torch.float32, device=images.device), result

    def __repr__(self):
        return f"RemoteReward(url={self.url!r}, batch_size={self.batch_size})"


def _components(server_metadata, device) -> dict[str, torch.Tensor]:
    parts: dict[str, list[float]] = {}
    for meta in server_metadata:
        found = meta.get("components") if isinstance(meta, dict) else None
        if not isinstance(found, dict):
            continue
        for part, values in found.items():
            values = values if isinstance(values, list) else [values]
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                parts.setdefault(part, []).extend(math.nan if v is None else float(v) for v in values)
    return {part: torch.tensor(values, dtype=torch.float32, device=device) for part, values in parts.items()}
