"""A griffe extension that lets mkdocstrings read b2trl's Hugging Face-style docstrings.

b2trl writes docstrings as the HF libraries do: cross-references as ``[`~trl.DDPOConfig`]`` or
``[`IntervalSchedule`]``, and argument types as ``name (`int`, *optional*, defaults to `5`):``. The Google
parser that mkdocstrings uses understands neither, so before the docstrings are parsed this extension

- turns a reference to a b2trl object into an autorefs link (``[`IntervalSchedule`][b2trl.schedule.IntervalSchedule]``),
  which a strict build checks: a reference to an object that no API page shows fails the build;
- turns a reference to another library (``~trl.DDPOTrainer``) into inline code, as no inventory of those
  libraries is fetched at build time;
- reduces an HF argument type to the type itself (``int``; the default is shown from the signature).

Sphinx roles (``:func:`alignment_reward```) are read as references too.
"""

from __future__ import annotations

import re

import griffe

PACKAGE = "b2trl"

# [`~trl.DDPOConfig`], [`IntervalSchedule.from_last_step`]
_HF_REF = re.compile(r"\[`(~?)([A-Za-z_][\w.]*)`\]")
# :func:`alignment_reward`, :class:`~b2trl.schedule.IntervalSchedule`
_SPHINX_REF = re.compile(r":(?:func|class|meth|attr|data|mod|obj):`(~?)([A-Za-z_][\w.]*)`")
# an argument line of an Args/Parameters/Attributes block: "    name (`int`, *optional*, defaults to `5`):"
_ARG_LINE = re.compile(r"^(\s+\*{0,2}\w+) \((.+)\):", re.MULTILINE)
# several arguments sharing one line: "    steps, guidance_scale, eta: sampling settings"
_SHARED_ARG_LINE = re.compile(r"^(\s+)(\w+(?:, \w+)+):(.*)$", re.MULTILINE)


def _objects(obj):
    """Every module, class, function and attribute defined in `obj`, `obj` included (aliases skipped)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _plain_type(text: str) -> str:
    """``"`int` or `None`, *optional*, defaults to `None`"`` -> ``"int or None"``; ``[`~trl.X`]`` -> ``X``.

    The result is read as a Python annotation, which mkdocstrings links by itself where it can.
    """
    text = re.split(r",\s*\*optional\*|,\s*defaults to", text)[0]
    text = _HF_REF.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("`", "").strip() or text


def _canonical(obj, path: str) -> str:
    """Where the object at `path` is defined (``b2trl.toy.render`` -> ``b2trl.toy.world.render``)."""
    root = obj
    while root.parent is not None:
        root = root.parent
    try:
        found = root[path.split(".", 1)[1]] if "." in path else root
    except (KeyError, griffe.AliasResolutionError):
        return path
    return found.target_path if found.is_alias else found.path


class HFDocstrings(griffe.Extension):
    """Rewrites HF-style references and argument types once the package is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        objects = list(_objects(pkg))
        # "B2DiffuRLTrainer", "B2DiffuRLTrainer.save_pretrained", ... -> full paths (to resolve bare names)
        by_name: dict[str, set[str]] = {}
        for obj in objects:
            parts = obj.path.split(".")
            for start in range(1, len(parts)):
                by_name.setdefault(".".join(parts[start:]), set()).add(obj.path)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = self._rewrite(obj, obj.docstring.value, by_name)

    def _rewrite(self, obj, text: str, by_name: dict[str, set[str]]) -> str:
        def reference(match: re.Match) -> str:
            short, target = match.group(1) == "~", match.group(2)
            shown = target.rsplit(".", 1)[-1] if short else target
            path = self._resolve(obj, target, by_name)
            return f"[`{shown}`][{path}]" if path else f"`{shown}`"

        # argument types first: a reference inside a type becomes a plain name there, not a link
        text = _ARG_LINE.sub(lambda m: f"{m.group(1)} ({_plain_type(m.group(2))}):", text)
        text = _SHARED_ARG_LINE.sub(
            lambda m: "\n".join(f"{m.group(1)}{name}:{m.group(3)}" for name in m.group(2).split(", ")), text
        )
        text = _HF_REF.sub(reference, text)
        return _SPHINX_REF.sub(reference, text)

    @staticmethod
    def _resolve(obj, target: str, by_name: dict[str, set[str]]):
        """The full path of a b2trl object named `target` as seen from `obj`, or `None` for other libraries."""
        if target.split(".")[0] == PACKAGE:
            return _canonical(obj, target)
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except Exception:  # griffe raises NameResolutionError, or others for odd scopes
            path = None
        if path and path.split(".")[0] == PACKAGE:
            return f"{path}.{rest}" if rest else path
        if path:
            return None  # imported from another library
        candidates = by_name.get(target, set())
        if len(candidates) == 1:
            return next(iter(candidates))
        return None
