"""The toy world: a palette, three shapes, prompt templates, a fixed train / held-out split and a renderer.

Every image is 32×32 RGB on a light background. A *scene* is one object (``"a red circle"``) or two objects
of different colours, either simply listed (``"a red circle and a blue square"``, attribute binding) or tied
by a spatial relation (``"a red circle left of a blue square"``).

The split is made on *canonical scenes*, so that two phrasings of the same picture
(``"A left of B"`` / ``"B right of A"``, ``"A and B"`` / ``"B and A"``) always fall on the same side. A scene is
held out when the MD5 digest of its canonical key is among the smallest of its template (a fixed number per
template, see :data:`HELDOUT_COUNTS`). Held-out scenes never reach the pretraining data nor the RL prompts.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 32

# Saturated colours whose hues (the chroma direction, see ``reward.py``) are far apart.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (160, 40, 200),
    "cyan": (20, 190, 205),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Relation word -> (axis, sign): "A left of B" means A's x is smaller than B's.
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
TEMPLATES = ("single", "binding", "relation")
# Number of held-out canonical scenes per template (out of 18 / 135 / 540).
HELDOUT_COUNTS = {"single": 3, "binding": 15, "relation": 27}
# Number of training scenes per template in the RL prompt list ``train_prompts()``.
RL_TRAIN_COUNTS = {"single": 4, "binding": 30, "relation": 30}


@dataclass(frozen=True)
class Scene:
    """A parsed prompt.

    Parameters:
        template (`str`): ``"single"``, ``"binding"`` or ``"relation"``.
        objects (`tuple`): one or two ``(colour, shape)`` pairs, in the prompt's order.
        relation (`str` or `None`): one of :data:`RELATIONS` for the relation template.
    """

    template: str
    objects: tuple
    relation: str | None = None

    @property
    def prompt(self) -> str:
        words = [f"a {c} {s}" for c, s in self.objects]
        if self.template == "single":
            return words[0]
        if self.template == "binding":
            return f"{words[0]} and {words[1]}"
        return f"{words[0]} {self.relation} {words[1]}"

    @property
    def key(self) -> tuple:
        """Canonical key: equal for every phrasing of the same picture."""
        if self.template == "single":
            return ("single",) + self.objects
        if self.template == "binding":
            return ("binding",) + tuple(sorted(self.objects))
        a, b = self.objects
        if self.relation == "right of":
            return ("relation", "left of", b, a)
        if self.relation == "below":
            return ("relation", "above", b, a)
        return ("relation", self.relation, a, b)


_OBJ = r"an? (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
_REL = "|".join(RELATIONS)
_PATTERNS = (
    ("single", re.compile(rf"^{_OBJ}$")),
    ("binding", re.compile(rf"^{_OBJ} and {_OBJ}$")),
    ("relation", re.compile(rf"^{_OBJ} ({_REL}) {_OBJ}$")),
)


def parse_prompt(prompt: str) -> Scene:
    """Parse a prompt of any template into a :class:`Scene`; raise `ValueError` naming it if it does not fit."""
    text = " ".join(str(prompt).lower().strip().rstrip(".").split())
    for template, pattern in _PATTERNS:
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        if template == "single":
            return Scene("single", ((g[0], g[1]),))
        if template == "binding":
            objects, relation = ((g[0], g[1]), (g[2], g[3])), None
        else:
            objects, relation = ((g[0], g[1]), (g[3], g[4])), g[2]
        if objects[0][0] == objects[1][0]:
            raise ValueError(f"the two objects of a toy-world prompt need different colours: {prompt!r}")
        return Scene(template, objects, relation)
    raise ValueError(f"not a toy-world prompt: {prompt!r}")


def _digest(key: tuple) -> str:
    return hashlib.md5(repr(key).encode()).hexdigest()


@lru_cache(maxsize=None)
def _canonical_scenes(template: str) -> tuple:
    objects = list(itertools.product(COLOURS, SHAPES))
    if template == "single":
        scenes = [Scene("single", (o,)) for o in objects]
    elif template == "binding":
        scenes = [Scene("binding", (a, b)) for a, b in itertools.combinations(sorted(objects), 2) if a[0] != b[0]]
    else:
        scenes = [
            Scene("relation", (a, b), rel)
            for rel in ("left of", "above")
            for a, b in itertools.permutations(objects, 2)
            if a[0] != b[0]
        ]
    return tuple(sorted(scenes, key=lambda s: _digest(s.key)))


def _split(template: str, heldout: bool) -> tuple:
    scenes = _canonical_scenes(template)
    n = HELDOUT_COUNTS[template]
    return scenes[:n] if heldout else scenes[n:]


@lru_cache(maxsize=None)
def heldout_keys() -> frozenset:
    """Canonical keys of every held-out scene."""
    return frozenset(s.key for t in TEMPLATES for s in _split(t, heldout=True))


def is_heldout(prompt_or_scene) -> bool:
    """Whether a prompt (any phrasing) shows a held-out scene."""
    scene = prompt_or_scene if isinstance(prompt_or_scene, Scene) else parse_prompt(prompt_or_scene)
    return scene.key in heldout_keys()


def _phrasing(scene: Scene) -> Scene:
    """A deterministic, hash-chosen phrasing of a canonical scene (so both word orders occur in the lists)."""
    if scene.template == "single" or int(_digest(scene.key)[-1], 16) % 2 == 0:
        return scene
    a, b = scene.objects
    flipped = {"left of": "right of", "above": "below"}.get(scene.relation)
    return Scene(scene.template, (b, a), flipped)


def heldout_prompts() -> list[str]:
    """The held-out evaluation prompts (45: 3 single, 15 binding, 27 relation), in a fixed order."""
    return [_phrasing(s).prompt for t in TEMPLATES for s in _split(t, heldout=True)]


def train_prompts() -> list[str]:
    """The RL training prompts (64: 4 single, 30 binding, 30 relation), in a fixed order.

    A fixed subset of the pretraining scenes; mostly two-object prompts, where the base model errs.
    """
    out = []
    for t in TEMPLATES:
        out += [_phrasing(s).prompt for s in _split(t, heldout=False)[: RL_TRAIN_COUNTS[t]]]
    return out


def all_train_scenes(template: str) -> tuple:
    """Every canonical training scene of a template (what pretraining draws from)."""
    return _split(template, heldout=False)


def sample_train_prompts(n: int, rng: np.random.Generator, weights=(0.15, 0.35, 0.5)) -> list[str]:
    """Draw ``n`` pretraining prompts: a template by ``weights``, a training scene, a random phrasing."""
    out = []
    templates = rng.choice(len(TEMPLATES), size=n, p=np.asarray(weights) / np.sum(weights))
    for t in templates:
        scenes = all_train_scenes(TEMPLATES[t])
        scene = scenes[rng.integers(len(scenes))]
        if scene.template != "single" and rng.random() < 0.5:
            a, b = scene.objects
            scene = Scene(scene.template, (b, a), {"left of": "right of", "above": "below"}.get(scene.relation))
        out.append(scene.prompt)
    return out


# ----------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    r = size / 2
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(_XX - cx) <= r) & (np.abs(_YY - cy) <= r)
    # Upright isosceles triangle inscribed in the same box: apex on top, base at the bottom.
    t = (_YY - (cy - r)) / size  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(_XX - cx) <= r * t)


def _layout(scene: Scene, rng: np.random.Generator) -> list:
    """Centres and sizes of the scene's objects (pixels)."""
    c = IMAGE_SIZE / 2
    if scene.template == "single":
        return [(c + rng.uniform(-4, 4), c + rng.uniform(-4, 4), rng.uniform(12, 15))]
    if scene.template == "relation":
        axis, sign = RELATIONS[scene.relation]
    else:  # binding: any arrangement
        axis, sign = ("x", "y")[rng.integers(2)], (-1, 1)[rng.integers(2)]
    near, far = 8.5 + rng.uniform(-1.5, 1.5), 23.5 + rng.uniform(-1.5, 1.5)
    first, second = (near, far) if sign < 0 else (far, near)
    out = []
    for main in (first, second):
        other = c + rng.uniform(-5, 5)
        size = rng.uniform(10, 12.5)
        out.append((main, other, size) if axis == "x" else (other, main, size))
    return out


def render(prompts, seed: int | None = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ground-truth images for prompts.

    Args:
        prompts (`str` or `list[str]`): toy-world prompts (any template).
        seed (`int`, *optional*): seeds the jitter (layout, sizes, colours, background) when ``rng`` is not given.
        rng (`np.random.Generator`, *optional*): a generator to draw from instead of ``seed``.

    Returns:
        `np.ndarray` of shape ``(B, 3, 32, 32)``, float32 in [0, 1].
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rng = rng if rng is not None else np.random.default_rng(seed)
    out = np.empty((len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, p in enumerate(prompts):
        scene = parse_prompt(p)
        bg = 240 + rng.uniform(-10, 10) + rng.uniform(-4, 4, size=3)
        img = np.broadcast_to(bg[:, None, None], (3, IMAGE_SIZE, IMAGE_SIZE)).copy()
        img += rng.normal(0, 2.0, size=img.shape)  # faint paper texture
        for (colour, shape), (cx, cy, size) in zip(scene.objects, _layout(scene, rng)):
            rgb = np.asarray(PALETTE[colour], dtype=np.float32) + rng.uniform(-12, 12, size=3)
            mask = _shape_mask(shape, cx, cy, size)
            img[:, mask] = rgb[:, None]
        out[i] = np.clip(img / 255.0, 0.0, 1.0)
    return out
