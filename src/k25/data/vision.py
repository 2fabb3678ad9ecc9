"""Visual task families: synthetic pictures to count, read and chart, for a model's vision tower.

Each sampler draws a scene with its own ``random.Random``, renders it with Pillow (shapes with
``ImageDraw``, text in the FreeType font Pillow ships, ``ImageFont.load_default(size=...)``, so
nothing is downloaded) and writes one record whose user turn holds the picture as an OpenAI
content part. Answers come from the scene the sampler drew, never from reading the pixels back.

Images are PNG files in ``FAMILY/images/`` named by their SHA-256; a record points at its image
with a URL relative to the folder of the JSONL file that holds it (as links in HTML do):
``{"type": "image_url", "image_url": {"url": "images/3f9a….png"}}`` in ``FAMILY/train.jsonl``.
:func:`resolve_image_urls` turns those into absolute paths for the server's media path;
:func:`record_image_paths` lists them for training.

The families are opt-in (``--families vision`` or by name): the default curriculum is text-only,
so ``make k25-mini`` and text-only models are unaffected.
"""

from __future__ import annotations

import copy
import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .conversation import Chat, record
from .families import Sample, World

VISION_FAMILIES = ("vision_count", "vision_read", "vision_chart")
IMAGE_DIR = "images"
IMAGE_TYPES = ("image_url", "image")  # the content-part types the chat template renders as an image
INSTANT_FRACTION = 0.5  # visual records written in Instant mode (the rest think first)


# ---------------------------------------------------------------------------------------------
# Images in records.


def png_bytes(img: Image.Image) -> bytes:
    """The PNG encoding of ``img`` (no metadata, so the same pixels give the same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _part_url(part: Any) -> str | None:
    """The URL of an image content part (``image_url.url``, or a bare string), else None."""
    if not isinstance(part, dict) or part.get("type") not in IMAGE_TYPES:
        return None
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    return url if isinstance(url, str) else ""


def image_urls(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The image URLs of the user messages, in prompt order (the order the template places them)."""
    urls = []
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            urls += [u for u in map(_part_url, m["content"]) if u is not None]
    return urls


def has_images(record: dict[str, Any]) -> bool:
    """Whether a record's conversation shows the model any image."""
    return bool(record.get("messages")) and bool(image_urls(record["messages"]))


def resolve_url(url: str, base_dir: str | Path) -> str:
    """A record's image URL as a path or data URL: relative paths are taken from ``base_dir``."""
    if url.startswith(("data:", "http://", "https://")):
        return url
    path = Path(url.removeprefix("file://"))
    return str(path if path.is_absolute() else Path(base_dir) / path)


def record_image_paths(record: dict[str, Any], base_dir: str | Path) -> list[str]:
    """The record's images (paths or data URLs) in prompt order, relative URLs resolved in ``base_dir``."""
    if not record.get("messages"):
        return []
    return [resolve_url(u, base_dir) for u in image_urls(record["messages"])]


def resolve_image_urls(messages: Sequence[dict[str, Any]], base_dir: str | Path) -> list[dict[str, Any]]:
    """A copy of ``messages`` whose relative image URLs are absolute paths (what a server is sent)."""
    out = copy.deepcopy(list(messages))
    for m in out:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                url = _part_url(part)
                if url:
                    key = part["type"]
                    if isinstance(part[key], dict):
                        part[key]["url"] = resolve_url(url, base_dir)
                    else:
                        part[key] = resolve_url(url, base_dir)
    return out


def check_images(record: dict[str, Any], base_dir: str | Path) -> list[str]:
    """Problems with a record's images: a media part outside a user turn, a missing or undecodable file.

    Decodes with Pillow as ``k25.media.load_image`` does, without importing torch (``k25 data check``
    stays quick).
    """
    rid = record.get("id", "?")
    errors = []
    for i, m in enumerate(record.get("messages") or []):
        content = m.get("content")
        if m.get("role") != "user" and isinstance(content, list) and any(_part_url(p) is not None for p in content):
            errors.append(f"{rid} messages[{i}]: images are only read from user messages")
    for url in image_urls(record.get("messages") or []):
        if not url:
            errors.append(f"{rid}: image part without a url")
            continue
        source = resolve_url(url, base_dir)
        if source.startswith(("data:", "http://", "https://")):
            continue  # not a file of the data directory
        try:
            with Image.open(source) as img:
                img.convert("RGB")
        except FileNotFoundError:
            errors.append(f"{rid}: image {source} does not exist")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            errors.append(f"{rid}: image {source} is not a readable image ({e})")
    return errors


def _sample(
    family: str, key: str, img: Image.Image, question: str, reasoning: str, final: str, answer: str,
    answer_type: str, thinking: bool, uid: str = "", **meta: Any,
) -> Sample:
    """One visual task: the PNG under ``FAMILY/images/`` and the record that shows it."""
    data = png_bytes(img)
    name = hashlib.sha256(data).hexdigest()[:20] + ".png"
    chat = Chat(None, thinking)
    chat.user(question, images=[f"{IMAGE_DIR}/{name}"])
    chat.answer(reasoning, final)
    rec = record(family, chat, answer, answer_type, key, size=list(img.size), **meta)
    return Sample(key, {family: [rec]}, uid=uid, images={f"{family}/{IMAGE_DIR}/{name}": data})


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font (Aileron) at ``size`` px: available offline everywhere."""
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(228, 255) for _ in range(3))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Counting shapes.

# Pictures are small and the content fills them: a tower trained from scratch has its tokens
# found by a language model's attention only where content covers a good share of them (a digit
# in a 56×56 frame is read through one attention query at ~80% after 400 probe steps, the same
# digit in a 224×112 frame stays near chance; docs/k25-mini.md, "Framing").
COUNT_SIZE = 112  # px square: 8×8 patches, 16 LM positions
GRID = 4  # shapes sit in distinct cells of a GRID×GRID grid, so they never overlap; one cell per LM position
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 90, 220), "yellow": (235, 185, 20),
    "purple": (140, 60, 180),
}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, centre (x, y), radius and its grid cell."""

    shape: str
    colour: str
    x: int
    y: int
    r: int
    row: int
    col: int

    def matches(self, shape: str | None, colour: str | None) -> bool:
        """Whether the shape is one of those asked for (None: any)."""
        return shape in (None, self.shape) and colour in (None, self.colour)


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    """A filled circle, square or triangle centred on (x, y); its centre pixel has the fill colour."""
    fill = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse((s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r), fill=fill)
    elif s.shape == "square":
        h = round(s.r * 0.85)
        draw.rectangle((s.x - h, s.y - h, s.x + h, s.y + h), fill=fill)
    else:
        dx, dy = round(s.r * 0.87), round(s.r * 0.5)
        draw.polygon([(s.x, s.y - s.r), (s.x + dx, s.y + dy), (s.x - dx, s.y + dy)], fill=fill)


def where(s: Shape) -> str:
    """The shape's grid cell, 1-based ("row 2 column 5"), for the reasoning."""
    return f"row {s.row + 1} column {s.col + 1}"


def _noun(shape: str | None, colour: str | None, n: int) -> str:
    """"red circles", "squares", "blue shapes" (singular for one)."""
    word = (shape or "shape") + ("" if n == 1 else "s")
    return f"{colour} {word}" if colour else word


def sample_count(rng: random.Random, world: World) -> Sample:
    """1-7 shapes of one kind and/or colour among 0-5 others: how many are there?"""
    kind = rng.choices(("both", "shape", "colour"), weights=(3, 1, 1))[0]
    shape = rng.choice(SHAPES) if kind != "colour" else None
    colour = rng.choice(list(COLOURS)) if kind != "shape" else None
    n, n_other = rng.randint(1, 7), rng.randint(0, 5)
    def asked(pick: tuple[str, str]) -> bool:
        return shape in (None, pick[0]) and colour in (None, pick[1])

    kinds = [(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS))) for _ in range(n)]
    while len(kinds) < n + n_other:  # distractors: anything that is not asked for
        pick = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
        if not asked(pick):
            kinds.append(pick)
    cell = COUNT_SIZE / GRID
    scene = []
    for (sh, co), c in zip(kinds, rng.sample(range(GRID * GRID), len(kinds)), strict=True):
        row, col = divmod(c, GRID)
        r = rng.randint(6, 10)
        room = int(cell / 2 - r - 2)
        x = round((col + 0.5) * cell) + rng.randint(-room, room)
        y = round((row + 0.5) * cell) + rng.randint(-room, room)
        scene.append(Shape(sh, co, x, y, r, row, col))
    img = Image.new("RGB", (COUNT_SIZE, COUNT_SIZE), _light(rng))
    draw = ImageDraw.Draw(img)
    for s in scene:
        draw_shape(draw, s)
    targets = sorted((s for s in scene if s.matches(shape, colour)), key=lambda s: (s.row, s.col))
    if len(targets) != n:
        raise AssertionError(f"drew {len(targets)} {shape}/{colour} shapes, meant {n}")
    ask = _noun(shape, colour, 2)
    question = rng.choice(("How many {x} are there?", "How many {x} are in the picture?",
                           "Count the {x} in the image.")).format(x=ask)
    skip = " and skip the other shapes" if n_other else ""
    steps = ", ".join(f"{i} in {where(s)}" for i, s in enumerate(targets, 1))
    reasoning = f"I look for {ask} row by row{skip}: {steps}. That makes {n}."
    final = f"There {'is' if n == 1 else 'are'} {n} {_noun(shape, colour, n)}."
    key = f"count:{shape or '*'}:{colour or '*'}:" + ";".join(f"{s.shape}/{s.colour}/{s.x}/{s.y}/{s.r}" for s in scene)
    thinking = rng.random() >= INSTANT_FRACTION
    return _sample(
        "vision_count", key, img, question, reasoning, final, str(n), "number", thinking,
        target={"shape": shape, "colour": colour}, scene=[asdict(s) for s in scene],
    )


# ---------------------------------------------------------------------------------------------
# Reading digits and words.

READ_SIZE = (140, 56)  # render_text's default frame (vision runs 1-4 drew free text in it)
READ_FONT = (28, 40)  # px, before shrinking to fit
WORDS = (
    "apple", "bird", "boat", "book", "cake", "cat", "cloud", "coin", "cup", "desk", "dog", "door", "drum", "duck",
    "fish", "flag", "frog", "gate", "goat", "hat", "hill", "horse", "house", "key", "kite", "lamp", "leaf", "lion",
    "map", "milk", "moon", "mouse", "nest", "owl", "pen", "pig", "plant", "rain", "ring", "river", "road", "rock",
    "rose", "salt", "ship", "shoe", "snow", "sock", "star", "stone", "sun", "table", "tent", "tiger", "train",
    "tree", "wave", "whale", "wind", "wolf",
)


def _text_layer(text: str, size: int, ink: tuple[int, int, int], stroke: int, angle: float) -> Image.Image:
    """The text on a transparent layer, rotated by ``angle`` degrees (cropped to the ink)."""
    font = _font(size)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    layer = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((4 - left, 4 - top), text, font=font, fill=(*ink, 255), stroke_width=stroke,
                               stroke_fill=(*ink, 255))
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    return layer.crop(layer.getbbox())


def render_text(
    rng: random.Random, text: str, frame: tuple[int, int] = READ_SIZE
) -> tuple[Image.Image, dict[str, Any]]:
    """``text`` drawn freely at a random size, tilt, weight, place and colour in a ``frame``-sized picture.

    How vision runs 1-4 drew ``vision_read`` (since run 5 it draws :func:`render_cells`); kept for
    ``recipes/digit_readout_probe.py``, whose framing figures in ``docs/k25-mini.md`` use it.
    """
    width, height = frame
    angle = round(rng.uniform(-10, 10), 1)
    stroke = rng.choice((0, 0, 1))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    size = rng.randint(*READ_FONT)
    while True:  # shrink until it fits with a margin
        layer = _text_layer(text, size, ink, stroke, angle)  # type: ignore[arg-type]
        if layer.width <= width - 12 and layer.height <= height - 12:
            break
        size -= 2
    x = rng.randint(6, width - 6 - layer.width)
    y = rng.randint(6, height - 6 - layer.height)
    img = Image.new("RGB", (width, height), _light(rng))
    img.paste(layer, (x, y), layer)
    return img, {"font_size": size, "angle": angle, "stroke": stroke, "x": x, "y": y}


READ_CELL = 28  # px: one glyph per cell, the patch merger's pitch, so one LM position per character
READ_CELL_FONT = (17, 24)  # px


def render_cells(rng: random.Random, text: str) -> tuple[Image.Image, dict[str, Any]]:
    """``text`` as a typewriter line: glyph ``i`` centred (±2 px) in the ``i``-th 28-px cell.

    The picture is one cell high and ``len(text)`` cells wide, so the tower's merged tokens are
    the characters in reading order, one LM position each (vision runs 1-4 drew the text freely
    in a wider frame, where a position held parts of two glyphs; read that way, the language
    model learned the text's length but not its glyphs). The glyphs share a baseline, so "l",
    "i" and "p" keep their heights; size, tilt, weight and colours vary per picture, the place
    per glyph.
    """
    angle = round(rng.uniform(-8, 8), 1)
    stroke = rng.choice((0, 0, 1))
    ink = (*(rng.randint(0, 90) for _ in range(3)), 255)
    size = rng.randint(*READ_CELL_FONT)
    font, base = _font(size), 2 * READ_CELL
    line = Image.new("RGBA", (READ_CELL * len(text), 3 * READ_CELL), (0, 0, 0, 0))
    for i, ch in enumerate(text):
        glyph = Image.new("RGBA", (READ_CELL, 3 * READ_CELL), (0, 0, 0, 0))
        x, y = READ_CELL // 2 + rng.randint(-2, 2), base + rng.randint(-1, 1)
        ImageDraw.Draw(glyph).text((x, y), ch, font=font, fill=ink, anchor="ms", stroke_width=stroke, stroke_fill=ink)
        glyph = glyph.rotate(angle, resample=Image.Resampling.BICUBIC, center=(x, y - size // 3))
        line.alpha_composite(glyph, (i * READ_CELL, 0))
    _, top, _, bottom = line.getbbox() or (0, 0, 0, READ_CELL)
    line = line.crop((0, top, line.width, bottom))
    if line.height > READ_CELL - 2:  # a tall glyph pair (e.g. "Q" beside "p"): shrink to fit
        line = line.resize((line.width, READ_CELL - 2), Image.Resampling.BICUBIC)
    img = Image.new("RGB", (line.width, READ_CELL), _light(rng))
    img.paste(line, (0, (READ_CELL - line.height) // 2), line)
    return img, {"font_size": size, "angle": angle, "stroke": stroke}


def read_text(rng: random.Random) -> tuple[str, str, str, str]:
    """A number (1-4 digits, 70%) or a short word (30%): (text, kind, what, unit)."""
    if rng.random() < 0.7:
        digits = rng.randint(1, 4)
        return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)), "number", "number", "digits"
    word = rng.choice(WORDS)
    return (word.upper() if rng.random() < 0.3 else word), "word", "word", "letters"


def read_answer(text: str, kind: str) -> tuple[str, str, str]:
    """The final answer, the split key (the text itself) and the answer type of a reading text."""
    final = f"The number is {text}." if kind == "number" else f'The word is "{text}".'
    return final, f"read:{kind}:{text.lower()}", "number" if kind == "number" else "text"


def sample_read(rng: random.Random, world: World) -> Sample:
    """A number (1-4 digits, 70%) or a short word (30%), one glyph per LM position: what does it say?

    The split key is the text itself, so a held-out number or word is never seen in training in
    any rendering; other renderings of a training text are further training tasks.
    """
    text, kind, what, unit = read_text(rng)
    img, style = render_cells(rng, text)
    question = rng.choice((f"What {what} is written in the image?", f"Read the {what} in the picture.",
                           f"Which {what} does the image show?"))
    reasoning = f"I read the {unit} from left to right: {', '.join(text)}. So the {what} is {text}."
    final, key, answer_type = read_answer(text, kind)
    uid = f"{key}:" + ":".join(str(v) for v in style.values())
    thinking = rng.random() >= INSTANT_FRACTION
    return _sample("vision_read", key, img, question, reasoning, final, text, answer_type, thinking, uid=uid,
                   kind=kind, text=text, style=style)


def sample_join(rng: random.Random, world: World) -> Sample:
    """Text only: ``vision_read``'s texts given one character at a time, joined into the number or word.

    Reading ends with this step ("... from left to right: 5, 6, 5, 4. So the number is 5654."), and
    it is a step about tokens, not pictures: "5654" is the tokens "565" "4", which the characters
    one by one do not show. k25-mini's vision run 5 spelled multi-digit numbers right from the
    picture and then joined them wrong. The split key is ``vision_read``'s, so a held-out text is
    held out here too.
    """
    text, kind, what, unit = read_text(rng)
    spelled = ", ".join(text)
    question = rng.choice((f"Join these {unit} into one {what}: {spelled}",
                           f"Which {what} do the {unit} {spelled} make?", f"Write the {unit} {spelled} as one {what}."))
    thinking = rng.random() >= INSTANT_FRACTION
    chat = Chat(None, thinking)
    chat.user(question)
    final, key, answer_type = read_answer(text, kind)
    chat.answer(f"I join the {unit} from left to right: {spelled}. So the {what} is {text}.", final)
    rec = record("join", chat, text, answer_type, key, kind=kind, text=text)
    return Sample(key, {"join": [rec]}, uid=f"{key}:{question}:{thinking}")


# ---------------------------------------------------------------------------------------------
# Bar charts.

CHART_SIZE = 112  # 8×8 patches, 16 LM positions
CHART_MAX = 10
CHART_BOX = (16, CHART_SIZE - 4, 6, CHART_SIZE - 16)  # plot area: left, right, top, bottom (the value-0 line)
# Bar labels: capital letters that are not English words ("A" and "I" would match the article or
# pronoun when a reply is scored), so a letter answer is found only where the model names the bar.
CHART_LABELS = "BCDEFGHKMNPRSTVWXZ"
BAR_COLOURS = ((66, 110, 200), (220, 120, 40), (60, 160, 90), (150, 80, 170), (90, 90, 90))


def bar_centre(i: int, n: int) -> int:
    """The x of bar ``i`` of ``n`` (evenly spaced over the plot area)."""
    left, right = CHART_BOX[:2]
    return round(left + (i + 0.5) * (right - left) / n)


def render_chart(rng: random.Random, bars: dict[str, int]) -> Image.Image:
    """Vertical bars on a 0-10 grid (a line at every unit, labels at the even ones), letters below."""
    img = Image.new("RGB", (CHART_SIZE, CHART_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = CHART_BOX
    unit = (bottom - top) / CHART_MAX
    small, label_font = _font(8), _font(12)
    for v in range(CHART_MAX + 1):
        y = round(bottom - v * unit)
        draw.line((left, y, right, y), fill=(200, 200, 200) if v % 2 else (150, 150, 150), width=1)
        if v % 2 == 0:
            draw.text((left - 3, y), str(v), font=small, fill=(40, 40, 40), anchor="rm")
    colour = rng.choice(BAR_COLOURS)
    width = round((right - left) / len(bars) * rng.uniform(0.45, 0.7))
    for i, (label, value) in enumerate(bars.items()):
        cx = bar_centre(i, len(bars))
        draw.rectangle((cx - width // 2, round(bottom - value * unit), cx + width // 2, bottom), fill=colour)
        draw.text((cx, bottom + 3), label, font=label_font, fill=(20, 20, 20), anchor="mt")
    draw.line((left, top, left, bottom), fill=(40, 40, 40), width=1)
    draw.line((left, bottom, right, bottom), fill=(40, 40, 40), width=1)
    return img


def sample_chart(rng: random.Random, world: World) -> Sample:
    """A bar chart of 3-5 labelled bars with distinct values 1-10: the tallest, the shortest, or one value."""
    n = rng.randint(3, 5)
    labels = sorted(rng.sample(CHART_LABELS, n))
    bars = dict(zip(labels, rng.sample(range(1, CHART_MAX + 1), n), strict=True))
    img = render_chart(rng, bars)
    ask = rng.choice(("tallest", "shortest", "value"))
    readings = ", ".join(f"{k} {v}" for k, v in bars.items())
    if ask == "value":
        label = rng.choice(labels)
        question = rng.choice((f"What is the value of bar {label}?", f"How high does bar {label} reach?"))
        reasoning = f"I find bar {label} and read its top against the grid lines: {bars[label]}."
        final, answer, answer_type = f"The value of bar {label} is {bars[label]}.", str(bars[label]), "number"
    else:
        label = (max if ask == "tallest" else min)(bars, key=bars.__getitem__)
        question = rng.choice((f"Which bar is the {ask}?", f"Which label has the {ask} bar?"))
        reasoning = f"I read each bar against the grid lines: {readings}. The {ask} is {label}, at {bars[label]}."
        final, answer, answer_type = f"Bar {label} is the {ask}.", label, "text"
    key = f"chart:{ask}:{label if ask == 'value' else ''}:" + ",".join(f"{k}={v}" for k, v in bars.items())
    thinking = rng.random() >= INSTANT_FRACTION
    return _sample("vision_chart", key, img, question, reasoning, final, answer, answer_type, thinking,
                   ask=ask, bars=bars)


VISION_DESCRIPTIONS = {
    "vision_count": "count shapes of one kind/colour among distractors in a 112 px picture (opt-in)",
    "vision_read": "read a 1-4 digit number or a short word, one glyph per 28-px cell (opt-in)",
    "vision_chart": "bar charts of 3-5 labelled bars: the tallest, the shortest, one bar's value (opt-in)",
}
