"""Captions of the procedural testbed videos: attribute vocabularies, a small grammar, the held-out split
and the word-level tokenizer used by the testbed's text encoder.

Grammar (one canonical sentence per scene, so captions and attributes map one to one)::

    caption    := object ( " and " object ){0,2} " on a " background " background"
    object     := ("a " | "an ") [size " "] color " " shape " " motion_phrase
    size       := "small" | "large"           (a medium object has no size word)
    motion_phrase := "moving " direction | "bouncing" | "pulsing"

e.g. ``"a small red circle moving left and a blue star bouncing on a striped background"``.

Labels are attribute indices into :data:`ATTRIBUTES`; object attributes are padded to
:data:`MAX_OBJECTS` with ``-1``.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

__all__ = [
    "ATTRIBUTES",
    "OBJECT_ATTRIBUTES",
    "MAX_OBJECTS",
    "VOCAB",
    "SceneObject",
    "Scene",
    "make_caption",
    "parse_caption",
    "caption_labels",
    "scenes_from_labels",
    "is_heldout",
    "heldout_table",
    "tokenize",
]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "ring", "cross", "heart", "moon"),
    "color": ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white"),
    "size": ("small", "medium", "large"),
    "motion": (
        "left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right",
        "bouncing", "pulsing",
    ),
    "background": ("plain", "striped", "checkered", "gradient", "cloudy", "dotted"),
}
"""Ordered vocabulary of every attribute; label index ``i`` of attribute ``a`` means ``ATTRIBUTES[a][i]``.

``motion``: the eight directions are straight moves (no wall contact within the clip); ``bouncing`` is a fast
move that reflects off the frame's walls at least once; ``pulsing`` stays in place and grows and shrinks.
"""

OBJECT_ATTRIBUTES: tuple[str, ...] = ("shape", "color", "size", "motion")
"""Attributes that every object has (the scene-level one is ``background``)."""

MAX_OBJECTS: int = 3
"""A scene holds one to ``MAX_OBJECTS`` objects."""

DIRECTIONS: tuple[str, ...] = ATTRIBUTES["motion"][:8]
"""The motions spoken as ``"moving <direction>"``."""

_OPPOSITE_DIRECTION: dict[str, str] = {
    "left": "right", "right": "left", "up": "down", "down": "up",
    "up-left": "down-right", "down-right": "up-left", "up-right": "down-left", "down-left": "up-right",
}


def reverse_directions(caption: str) -> str:
    """``caption`` with every direction word replaced by its opposite (``left`` <-> ``right``, ``up-left`` <->
    ``down-right``, ...); other words unchanged. Used to measure whether a model uses the direction words."""
    return " ".join(_OPPOSITE_DIRECTION.get(w, w) for w in caption.split())


_FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and", "on", "background", "moving")

VOCAB: tuple[str, ...] = (
    ("<pad>",)
    + _FUNCTION_WORDS
    + ("small", "large")
    + ATTRIBUTES["color"]
    + ATTRIBUTES["shape"]
    + DIRECTIONS
    + ("bouncing", "pulsing")
    + ATTRIBUTES["background"]
)
"""Every word the tokenizer knows; ``"<pad>"`` is id 0."""

_WORD_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

HELDOUT_MODULUS: int = 10
"""About one in ``HELDOUT_MODULUS`` (shape, color, motion, background) combinations is held out."""


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, by attribute names."""

    shape: str
    """Object kind, one of ``ATTRIBUTES["shape"]``."""
    color: str
    """One of ``ATTRIBUTES["color"]``."""
    size: str
    """One of ``ATTRIBUTES["size"]``."""
    motion: str
    """One of ``ATTRIBUTES["motion"]``."""


@dataclass(frozen=True)
class Scene:
    """The captioned content of one video: its objects (in caption order) and background."""

    objects: tuple[SceneObject, ...]
    """One to ``MAX_OBJECTS`` objects; the first is drawn on top."""
    background: str
    """One of ``ATTRIBUTES["background"]``."""


def _check_value(attribute: str, value: str) -> None:
    if value not in ATTRIBUTES[attribute]:
        raise ValueError(f"unknown {attribute} {value!r}; allowed: {ATTRIBUTES[attribute]}")


def _object_phrase(obj: SceneObject) -> str:
    for attribute in OBJECT_ATTRIBUTES:
        _check_value(attribute, getattr(obj, attribute))
    words = []
    if obj.size != "medium":
        words.append(obj.size)
    words += [obj.color, obj.shape]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    words += ["moving", obj.motion] if obj.motion in DIRECTIONS else [obj.motion]
    return " ".join(words)


def make_caption(scene: Scene) -> str:
    """The grammar's caption of ``scene`` (see the module docstring)."""
    if not 1 <= len(scene.objects) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(scene.objects)}")
    _check_value("background", scene.background)
    objects = " and ".join(_object_phrase(o) for o in scene.objects)
    return f"{objects} on a {scene.background} background"


def _words(caption: str) -> list[str]:
    # Tolerate case, commas and a final full stop; the grammar itself has none.
    return caption.lower().replace(",", " ").replace(".", " ").split()


def parse_caption(caption: str) -> dict[str, object]:
    """Attribute labels (names) of a caption that follows the grammar.

    Returns ``{"shape": [...], "color": [...], "size": [...], "motion": [...]`` (one entry per object, in
    caption order), ``"background": str, "count": int}``. Raises ValueError naming the first word that breaks
    the grammar.
    """
    words = _words(caption)
    grammar = "a|an [small|large] <color> <shape> (moving <direction>|bouncing|pulsing) [and ...] on a <background> background"

    def fail(pos: int, expected: str) -> ValueError:
        got = repr(words[pos]) if pos < len(words) else "end of caption"
        return ValueError(
            f"caption {caption!r} does not follow the grammar {grammar!r}: at word {pos} got {got}, expected {expected}"
        )

    out: dict[str, list[str]] = {a: [] for a in OBJECT_ATTRIBUTES}
    pos = 0
    while True:
        if pos >= len(words) or words[pos] not in ("a", "an"):
            raise fail(pos, "'a' or 'an'")
        pos += 1
        size = "medium"
        if pos < len(words) and words[pos] in ("small", "large"):
            size = words[pos]
            pos += 1
        if pos >= len(words) or words[pos] not in ATTRIBUTES["color"]:
            raise fail(pos, f"a color {ATTRIBUTES['color']}")
        color = words[pos]
        pos += 1
        if pos >= len(words) or words[pos] not in ATTRIBUTES["shape"]:
            raise fail(pos, f"a shape {ATTRIBUTES['shape']}")
        shape = words[pos]
        pos += 1
        if pos < len(words) and words[pos] == "moving":
            pos += 1
            if pos >= len(words) or words[pos] not in DIRECTIONS:
                raise fail(pos, f"a direction {DIRECTIONS}")
        elif pos >= len(words) or words[pos] not in ("bouncing", "pulsing"):
            raise fail(pos, "'moving', 'bouncing' or 'pulsing'")
        motion = words[pos]
        pos += 1
        for attribute, value in zip(OBJECT_ATTRIBUTES, (shape, color, size, motion)):
            out[attribute].append(value)
        if pos < len(words) and words[pos] == "and":
            pos += 1
            if len(out["shape"]) == MAX_OBJECTS:
                raise fail(pos - 1, f"at most {MAX_OBJECTS} objects ('on')")
            continue
        break
    for expected in ("on", "a"):
        if pos >= len(words) or words[pos] != expected:
            raise fail(pos, repr(expected))
        pos += 1
    if pos >= len(words) or words[pos] not in ATTRIBUTES["background"]:
        raise fail(pos, f"a background {ATTRIBUTES['background']}")
    background = words[pos]
    pos += 1
    if pos >= len(words) or words[pos] != "background":
        raise fail(pos, "'background'")
    pos += 1
    if pos != len(words):
        raise fail(pos, "end of caption")
    return {**out, "background": background, "count": len(out["shape"])}


def caption_labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """Label tensors of grammatical captions, in the layout of ``VideoBatch.labels``.

    ``shape``/``color``/``size``/``motion``: LongTensor (B, MAX_OBJECTS), ``-1`` where no object;
    ``background``/``count``: LongTensor (B,).
    """
    b = len(captions)
    labels = {a: torch.full((b, MAX_OBJECTS), -1, dtype=torch.long) for a in OBJECT_ATTRIBUTES}
    background = torch.empty(b, dtype=torch.long)
    count = torch.empty(b, dtype=torch.long)
    for i, caption in enumerate(captions):
        parsed = parse_caption(caption)
        for a in OBJECT_ATTRIBUTES:
            for j, value in enumerate(parsed[a]):  # type: ignore[arg-type]
                labels[a][i, j] = ATTRIBUTES[a].index(value)
        background[i] = ATTRIBUTES["background"].index(parsed["background"])  # type: ignore[arg-type]
        count[i] = parsed["count"]  # type: ignore[assignment]
    return {**labels, "background": background, "count": count}


def scenes_from_labels(labels: dict[str, torch.Tensor]) -> list[Scene]:
    """The scenes described by label tensors (layout of ``VideoBatch.labels``)."""
    cpu = {k: v.detach().cpu() for k, v in labels.items()}
    scenes = []
    for i in range(cpu["background"].shape[0]):
        objects = []
        for j in range(MAX_OBJECTS):
            if int(cpu["shape"][i, j]) < 0:
                continue
            objects.append(SceneObject(*(ATTRIBUTES[a][int(cpu[a][i, j])] for a in OBJECT_ATTRIBUTES)))
        scenes.append(Scene(tuple(objects), ATTRIBUTES["background"][int(cpu["background"][i])]))
    return scenes


def is_heldout(shape: str, color: str, motion: str, background: str) -> bool:
    """Whether this (shape, color, motion, background) combination is held out of training.

    Deterministic (a CRC32 of the names), about ``1 / HELDOUT_MODULUS`` of all combinations. Training scenes
    never contain a held-out combination in any object; held-out scenes have one as their first object, so
    their captions are never seen in training.
    """
    for attribute, value in (("shape", shape), ("color", color), ("motion", motion), ("background", background)):
        _check_value(attribute, value)
    key = f"{shape}|{color}|{motion}|{background}".encode()
    return zlib.crc32(key) % HELDOUT_MODULUS == 0


@functools.lru_cache(maxsize=1)
def _heldout_table_cached() -> torch.Tensor:
    a = ATTRIBUTES
    table = torch.zeros(len(a["shape"]), len(a["color"]), len(a["motion"]), len(a["background"]), dtype=torch.bool)
    for i, s in enumerate(a["shape"]):
        for j, c in enumerate(a["color"]):
            for k, m in enumerate(a["motion"]):
                for l, b in enumerate(a["background"]):
                    table[i, j, k, l] = is_heldout(s, c, m, b)
    return table


def heldout_table() -> torch.Tensor:
    """BoolTensor (shape, color, motion, background) of :func:`is_heldout`, indexed by attribute indices."""
    return _heldout_table_cached().clone()


def tokenize(captions: list[str], max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids and attention mask of captions.

    Returns ``(ids, mask)``: LongTensor (B, max_length) padded with 0 (``"<pad>"``) and BoolTensor
    (B, max_length), True on real words. Words are lower-cased; commas and full stops are ignored.
    Raises ValueError on a word outside :data:`VOCAB` (naming it and listing the vocabulary) or a caption
    longer than ``max_length`` words.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a list of captions, got a single str")
    ids = torch.zeros(len(captions), max_length, dtype=torch.long)
    mask = torch.zeros(len(captions), max_length, dtype=torch.bool)
    for i, caption in enumerate(captions):
        words = _words(caption)
        if len(words) > max_length:
            raise ValueError(f"caption {caption!r} has {len(words)} words, more than max_length={max_length}")
        for j, w in enumerate(words):
            if w not in _WORD_ID or w == "<pad>":
                raise ValueError(
                    f"unknown word {w!r} in caption {caption!r}; the testbed vocabulary is: {' '.join(VOCAB[1:])}"
                )
            ids[i, j] = _WORD_ID[w]
        mask[i, : len(words)] = True
    return ids, mask
