"""The scene grammar's vocabulary, GenEval's caption templates and their include / exclude rules.

Prompts follow GenEval (djghosh13/geneval, prompts/create_prompts.py) with shapes for its COCO classes:

| tag | caption | include | exclude |
|---|---|---|---|
| single_object | a photo of a circle | circle >= 1 | |
| two_object | a photo of a circle and a square | circle >= 1, square >= 1 | |
| counting | a photo of three triangles | triangle >= 3 | triangle >= 4 |
| colors | a photo of a red circle | red circle >= 1 | |
| position | a photo of a circle left of a square | square >= 1, circle >= 1 left of rule 0 | |
| color_attr | a photo of a red circle and a blue square | red circle >= 1, blue square >= 1 | |

Two-object prompts use two different shapes, colour attribution two different colours, counting 2-4 objects.
Every tag's prompts can be listed exhaustively (:func:`all_prompts`): 1110 captions in all.

The held-out split (:class:`HeldOut`) names compositions never seen together in training: three disjoint
shape pairs (never in one training image) and one colour per shape (that colour-shape binding never rendered
in training). A prompt is held out iff its rules mention a held-out pair or a held-out binding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ...data.shapes import COLOURS, SHAPES

__all__ = ["COLOUR_NAMES", "HeldOut", "NUMBERS", "Prompt", "RELATIONS", "Rule", "SHAPE_NAMES", "TAGS",
           "all_prompts", "make_prompts", "plural"]

SHAPE_NAMES: tuple[str, ...] = SHAPES
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Rule:
    """One GenEval clause: at least ``count`` objects of ``shape`` (of ``colour``, at ``position``).

    ``position`` is (relation, index of the include rule whose objects are the reference), e.g.
    ("left of", 0): each of this rule's objects lies left of each object matched by include rule 0.
    """

    shape: str
    count: int = 1
    colour: str | None = None
    position: tuple[str, int] | None = None

    def to_dict(self) -> dict:
        """GenEval's metadata form: {"class", "count", "color"?, "position"?}."""
        d = {"class": self.shape, "count": self.count}
        if self.colour is not None:
            d["color"] = self.colour
        if self.position is not None:
            d["position"] = list(self.position)
        return d


@dataclass(frozen=True)
class Prompt:
    """A caption with its GenEval tag and rules. An image is correct iff every include rule holds and no
    exclude rule does (an exclude rule "holds" when at least ``count`` objects of its shape are found)."""

    tag: str
    caption: str
    include: tuple[Rule, ...]
    exclude: tuple[Rule, ...] = ()

    def to_dict(self) -> dict:
        """GenEval's evaluation_metadata.jsonl line for this prompt."""
        d = {"tag": self.tag, "prompt": self.caption, "include": [r.to_dict() for r in self.include]}
        if self.exclude:
            d["exclude"] = [r.to_dict() for r in self.exclude]
        return d

    @property
    def shapes(self) -> tuple[str, ...]:
        """The distinct shapes the prompt asks for, in rule order."""
        return tuple(dict.fromkeys(r.shape for r in self.include))


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _single(shape: str) -> Prompt:
    return Prompt("single_object", f"a photo of a {shape}", (Rule(shape),))


def _two(a: str, b: str) -> Prompt:
    return Prompt("two_object", f"a photo of a {a} and a {b}", (Rule(a), Rule(b)))


def _counting(shape: str, n: int) -> Prompt:
    return Prompt("counting", f"a photo of {NUMBERS[n]} {plural(shape)}", (Rule(shape, n),), (Rule(shape, n + 1),))


def _colour(colour: str, shape: str) -> Prompt:
    return Prompt("colors", f"a photo of a {colour} {shape}", (Rule(shape, colour=colour),))


def _position(a: str, relation: str, b: str) -> Prompt:
    return Prompt("position", f"a photo of a {a} {relation} a {b}", (Rule(b), Rule(a, position=(relation, 0))))


def _colour_attr(ca: str, a: str, cb: str, b: str) -> Prompt:
    return Prompt("color_attr", f"a photo of a {ca} {a} and a {cb} {b}", (Rule(a, colour=ca), Rule(b, colour=cb)))


def _enumerate(tag: str) -> list[Prompt]:
    pairs = list(itertools.permutations(SHAPE_NAMES, 2))  # ordered, distinct shapes
    if tag == "single_object":
        return [_single(s) for s in SHAPE_NAMES]
    if tag == "two_object":
        return [_two(a, b) for a, b in pairs]
    if tag == "counting":
        return [_counting(s, n) for s in SHAPE_NAMES for n in NUMBERS]
    if tag == "colors":
        return [_colour(c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]
    if tag == "position":
        return [_position(a, r, b) for a, b in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [_colour_attr(ca, a, cb, b) for a, b in pairs for ca, cb in itertools.permutations(COLOUR_NAMES, 2)]
    raise ValueError(f"tag must be one of {TAGS}, got {tag!r}")


@dataclass(frozen=True)
class HeldOut:
    """Compositions kept out of training, drawn from ``seed``.

    ``pairs``: three disjoint unordered shape pairs (a perfect matching of the six shapes), so every shape still
    meets four others in training. ``bindings``: one (colour, shape) per shape, each with a different colour, so
    every colour and every shape is still seen in training, just not in these combinations.
    """

    seed: int = 0

    @property
    def pairs(self) -> frozenset[frozenset[str]]:
        order = np.random.default_rng([self.seed, 1]).permutation(len(SHAPE_NAMES))
        shapes = [SHAPE_NAMES[i] for i in order]
        return frozenset(frozenset(shapes[i:i + 2]) for i in range(0, len(shapes) - 1, 2))

    @property
    def bindings(self) -> frozenset[tuple[str, str]]:
        order = np.random.default_rng([self.seed, 2]).permutation(len(COLOUR_NAMES))[: len(SHAPE_NAMES)]
        return frozenset((COLOUR_NAMES[c], s) for c, s in zip(order, SHAPE_NAMES))

    def holds_out(self, prompt: Prompt) -> bool:
        """True iff ``prompt`` names a held-out shape pair or colour-shape binding."""
        shapes = prompt.shapes
        if any(frozenset(p) in self.pairs for p in itertools.combinations(shapes, 2)):
            return True
        return any((r.colour, r.shape) in self.bindings for r in prompt.include if r.colour is not None)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "pairs": sorted(sorted(p) for p in self.pairs),
                "bindings": sorted(list(b) for b in self.bindings)}


def all_prompts(tag: str | None = None, *, split: str | None = None, heldout: HeldOut | None = None) -> list[Prompt]:
    """Every prompt of ``tag`` (None: all six tags, in :data:`TAGS` order) in a fixed order.

    ``split``: None for all prompts, "train" for those not held out, "test" for the held-out ones
    (``heldout`` defaults to ``HeldOut()``).
    """
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    tags = TAGS if tag is None else (tag,)
    prompts = [p for t in tags for p in _enumerate(t)]
    if split is None:
        return prompts
    heldout = heldout or HeldOut()
    return [p for p in prompts if heldout.holds_out(p) == (split == "test")]


def make_prompts(n_per_tag: int, *, seed: int = 0, split: str | None = None,
                 heldout: HeldOut | None = None, tags: tuple[str, ...] = TAGS) -> list[Prompt]:
    """``n_per_tag`` prompts of each tag, grouped by tag in ``tags`` order, deterministic by ``seed``.

    Each tag's prompts are drawn without replacement from a seeded shuffle of :func:`all_prompts` (cycling
    through a new shuffle only when ``n_per_tag`` exceeds the tag's number of distinct prompts, e.g. six for
    single_object). With ``split="test"`` tags that have no held-out prompt (single_object, counting) are skipped.
    """
    if isinstance(n_per_tag, bool) or not isinstance(n_per_tag, int) or n_per_tag < 1:
        raise ValueError(f"n_per_tag must be an int >= 1, got {n_per_tag!r}")
    unknown = set(tags) - set(TAGS)
    if unknown:
        raise ValueError(f"tags must be a subset of {TAGS}, got unknown {sorted(unknown)}")
    out = []
    for t, tag in enumerate(tags):
        pool = all_prompts(tag, split=split, heldout=heldout)
        if not pool:
            continue
        rng = np.random.default_rng([seed, t])
        chosen = []
        while len(chosen) < n_per_tag:
            chosen += [pool[i] for i in rng.permutation(len(pool))[: n_per_tag - len(chosen)]]
        out += chosen
    return out
