"""Exact prompt–image alignment for the toy world, measured from pixels.

For every palette colour the checker finds the pixels of that hue, keeps the largest connected blob and
measures it (area, compactness, shape descriptors, centroid). Attributes are then read *through the prompt's
colours*, which is what makes binding measurable: for "a red circle and a blue square" the shape credited to
the first object is the shape of the red blob. A blue circle with a red square therefore gets both colours but
neither shape right (0.5), while the correct picture gets 1.0.

Per image, the attributes of its template are scored 0/1:

- single: ``colour_a`` (a compact blob of the colour exists), ``shape_a`` (that blob has the named shape, read
  from how its area sits in its bounding box, see :func:`measure_blobs`);
- binding: ``colour_a``, ``shape_a``, ``colour_b``, ``shape_b``;
- relation: the four above and ``relation`` (centroids ordered along the named axis by at least 2 px).

The reward is their mean divided by ``1 + extra``, where ``extra`` counts compact blobs of colours the prompt
does not name (so painting every colour everywhere does not pay).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .world import COLOURS, PALETTE, RELATIONS, SHAPES, parse_prompt

CHROMA_MIN = 0.3  # max - min channel (in [0, 1]) above which a pixel counts as coloured
HUE_TOLERANCE = 0.4  # distance in normalised-chroma space to the nearest palette hue
MIN_AREA = 15  # pixels of a blob for an object to be present (rendered objects have 50-180)
MIN_FILL = 0.35  # a present blob must fill this much of its bounding box (rejects speckle)
RELATION_MARGIN = 2.0  # pixels
# Shape descriptors (see ``measure_blobs``): share of the area in the top half, cover of the corner cells.
TRIANGLE_MAX_TOP = 0.55  # area of the top third over the bottom third: upright triangle ~0.2, others ~1
SQUARE_MIN_CORNER = 0.65  # square ~1.0, circle ~0.3


def _hue(rgb: torch.Tensor, dim: int) -> torch.Tensor:
    """Normalised chroma direction: invariant to mixing a colour with grey or white."""
    lo = rgb.amin(dim, keepdim=True)
    return (rgb - lo) / (rgb.amax(dim, keepdim=True) - lo).clamp_min(1e-6)


_PALETTE_HUES = _hue(torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255.0, 1)


def colour_masks(images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) boolean masks: pixels whose hue is that of palette colour k."""
    chroma = images.amax(1) - images.amin(1)
    hue = _hue(images, 1)
    dist = torch.cdist(hue.permute(0, 2, 3, 1).reshape(-1, 3), _PALETTE_HUES.to(images.device))
    best, k = dist.min(1)
    b, _, h, w = images.shape
    ok = (chroma.reshape(-1) > CHROMA_MIN) & (best < HUE_TOLERANCE)
    onehot = F.one_hot(k, len(COLOURS)).bool() & ok[:, None]
    return onehot.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def largest_component(masks: torch.Tensor) -> torch.Tensor:
    """Keep the largest 8-connected component of each (…, H, W) mask, by max-label propagation."""
    shape = masks.shape
    m = masks.reshape(-1, 1, shape[-2], shape[-1]).float()
    labels = torch.arange(1, shape[-2] * shape[-1] + 1, dtype=torch.float32, device=m.device)
    labels = labels.reshape(1, 1, shape[-2], shape[-1]) * m
    for i in range(shape[-2] * shape[-1]):
        new = F.max_pool2d(labels, 3, 1, 1) * m
        if i % 4 == 3 and torch.equal(new, labels):
            break
        labels = new
    flat = labels.reshape(labels.shape[0], -1).long()
    counts = torch.zeros(flat.shape[0], flat.shape[1] + 1, device=m.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    counts[:, 0] = 0
    keep = counts.argmax(1, keepdim=True)
    return ((flat == keep) & (flat > 0)).reshape(shape)


def measure_blobs(images: torch.Tensor) -> dict:
    """Per image and palette colour (B, K): area, fill ratio, centroid (x, y), presence and shape index.

    Shape is read from two blur-tolerant descriptors of the blob inside its bounding box: the area in its top
    third over the area in its bottom third (an upright triangle ~0.2, a circle or square ~1) and how much of the
    four corner cells of a 4×4 grid over the box it covers (a square ~1, a circle ~0.3). A plain fill ratio
    confuses a decoder's rounded square with a circle.
    """
    blobs = largest_component(colour_masks(images)).float()
    b, k, h, w = blobs.shape
    ys = torch.arange(h, dtype=torch.float32, device=blobs.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=blobs.device) + 0.5
    area = blobs.sum((2, 3))
    rows, cols = blobs.amax(3), blobs.amax(2)  # (B, K, H), (B, K, W)
    y0 = torch.where(rows > 0, ys, float("inf")).amin(2) - 0.5
    y1 = (rows * ys).amax(2) + 0.5
    x0 = torch.where(cols > 0, xs, float("inf")).amin(2) - 0.5
    x1 = (cols * xs).amax(2) + 0.5
    height, width = (y1 - y0).clamp_min(1), (x1 - x0).clamp_min(1)
    fill = torch.where(area > 0, area / (height * width), torch.zeros_like(area))
    safe = area.clamp_min(1)
    cx = (blobs.sum(2) * xs).sum(2) / safe
    cy = (blobs.sum(3) * ys).sum(2) / safe
    ry = ((ys[None, None, :] - y0[..., None]) / height[..., None]).nan_to_num(-1.0)  # (B, K, H) in [0, 1]
    rx = ((xs[None, None, :] - x0[..., None]) / width[..., None]).nan_to_num(-1.0)  # (B, K, W)
    row_area = blobs.sum(3)
    top = (row_area * ((ry >= 0) & (ry < 1 / 3))).sum(2) / (row_area * (ry > 2 / 3) * (ry <= 1)).sum(2).clamp_min(1)
    edge_y = ((ry >= 0) & (ry < 0.25)) | ((ry > 0.75) & (ry <= 1))
    edge_x = ((rx >= 0) & (rx < 0.25)) | ((rx > 0.75) & (rx <= 1))
    corner = (edge_y[..., :, None] & edge_x[..., None, :]).float()
    corner_fill = (blobs * corner).sum((2, 3)) / corner.sum((2, 3)).clamp_min(1)
    present = (area >= MIN_AREA) & (fill >= MIN_FILL)
    is_triangle = top < TRIANGLE_MAX_TOP
    is_square = ~is_triangle & (corner_fill > SQUARE_MIN_CORNER)
    shape = torch.where(
        is_triangle, SHAPES.index("triangle"), torch.where(is_square, SHAPES.index("square"), SHAPES.index("circle"))
    )
    return {
        "area": area,
        "fill": fill,
        "cx": cx,
        "cy": cy,
        "top": top,
        "corner_fill": corner_fill,
        "present": present,
        "shape": shape,
    }


@lru_cache(maxsize=4096)
def _prompt_codes(prompt: str) -> tuple:
    """(template id, colour a, shape a, colour b, shape b, axis, sign); -1 where absent."""
    scene = parse_prompt(prompt)
    (ca, sa), *rest = scene.objects
    cb, sb = rest[0] if rest else (None, None)
    axis, sign = RELATIONS.get(scene.relation, ("x", 0))
    return (
        ("single", "binding", "relation").index(scene.template),
        COLOURS.index(ca),
        SHAPES.index(sa),
        COLOURS.index(cb) if cb else -1,
        SHAPES.index(sb) if sb else -1,
        int(axis == "y"),
        sign,
    )


_ATTRIBUTES = {
    0: ("colour_a", "shape_a"),
    1: ("colour_a", "shape_a", "colour_b", "shape_b"),
    2: ("colour_a", "shape_a", "colour_b", "shape_b", "relation"),
}
_TEMPLATE_NAMES = ("single", "binding", "relation")


@torch.no_grad()
def score_attributes(images: torch.Tensor, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Attribute matrix (B, 5) in column order colour_a, shape_a, colour_b, shape_b, relation (NaN where the
    template lacks the attribute), the count of extra objects (B,), the reward (B,), and template names."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(f"expected images (B, 3, H, W) with B = {len(prompts)} prompts, got {tuple(images.shape)}")
    device = images.device
    x = images.detach().to(torch.float32).clamp(0, 1)
    codes = torch.tensor([_prompt_codes(p) for p in prompts], dtype=torch.long, device=device)
    tpl, ca, sa, cb, sb, axis, sign = codes.unbind(1)
    m = measure_blobs(x)
    rows = torch.arange(len(prompts), device=device)
    cb_safe = cb.clamp_min(0)
    pres_a, pres_b = m["present"][rows, ca], m["present"][rows, cb_safe] & (cb >= 0)
    shape_a = pres_a & (m["shape"][rows, ca] == sa)
    shape_b = pres_b & (m["shape"][rows, cb_safe] == sb)
    pos = torch.where(axis.bool()[:, None], m["cy"], m["cx"])
    delta = (pos[rows, ca] - pos[rows, cb_safe]) * sign
    relation = pres_a & pres_b & (delta >= RELATION_MARGIN)
    attrs = torch.stack([pres_a, shape_a, pres_b, shape_b, relation], 1).float()
    n_attr = torch.tensor([2, 4, 5], device=device)[tpl]
    valid = torch.arange(5, device=device)[None, :] < n_attr[:, None]
    attrs = torch.where(valid, attrs, torch.full_like(attrs, float("nan")))
    named = F.one_hot(ca, len(COLOURS)).bool() | (F.one_hot(cb_safe, len(COLOURS)).bool() & (cb >= 0)[:, None])
    extra = (m["present"] & ~named).sum(1).float()
    reward = torch.nan_to_num(attrs, nan=0.0).sum(1) / n_attr / (1 + extra)
    return attrs, extra, reward, [_TEMPLATE_NAMES[t] for t in tpl.tolist()]


_COLUMNS = ("colour_a", "shape_a", "colour_b", "shape_b", "relation")


def alignment_reward(images: torch.Tensor, prompts, prompt_metadata=None):
    """Exact prompt–image alignment reward in TRL's reward-function protocol.

    Args:
        images (`torch.Tensor` of shape ``(B, 3, H, W)``): images in [0, 1], any float dtype and device.
        prompts (`list[str]`): one toy-world prompt per image.
        prompt_metadata: ignored (part of TRL's protocol).

    Returns:
        `tuple(torch.Tensor, list[dict])`: rewards (float32, shape ``(B,)``, in [0, 1], on the images' device)
        and, per image, a dict with the template, its 0/1 attribute results and the number of extra objects.

    Raises:
        `ValueError`: for a prompt that is not a toy-world prompt (the message names it).
    """
    attrs, extra, reward, templates = score_attributes(images, list(prompts))
    meta = []
    for row, e, t in zip(attrs.tolist(), extra.tolist(), templates):
        d = {"template": t}
        d.update({k: v for k, v in zip(_COLUMNS, row) if v == v})  # drop NaN (absent attributes)
        d["extra_objects"] = int(e)
        meta.append(d)
    return reward.to(torch.float32), meta


def alignment_reward_with_components(images: torch.Tensor, prompts, prompt_metadata=None):
    """:func:`alignment_reward` with its parts in the ``metadata["components"]`` form that b2trl's trainer logs.

    Returns:
        `tuple(torch.Tensor, dict)`: the same rewards, and ``{"components": {...}, "per_image": [...]}`` where
        ``per_image`` is :func:`alignment_reward`'s list and the components are float32 CPU tensors: ``colour``
        and ``shape`` (per image, the mean over its objects), ``extra_objects`` (per image) and ``relation``
        (one value per image whose prompt has a relation, so that its mean is the relation accuracy).
    """
    attrs, extra, reward, _ = score_attributes(images, list(prompts))
    attrs = attrs.cpu()
    has_relation = ~torch.isnan(attrs[:, 4])
    components = {
        "colour": attrs[:, [0, 2]].nanmean(1),
        "shape": attrs[:, [1, 3]].nanmean(1),
        "relation": attrs[has_relation, 4],
        "extra_objects": extra.cpu(),
    }
    per_image = alignment_reward(images, prompts)[1]
    return reward.to(torch.float32), {"components": components, "per_image": per_image}
