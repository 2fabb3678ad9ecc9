"""Images and video in chat requests: content parts → preprocessed media → expanded prompt ids.

The chat template writes one `<|media_pad|>` per image and one video placeholder per video;
here each video placeholder becomes its chunks' timestamped blocks (spec §3.8), and after
tokenisation each `<|media_pad|>` is repeated once per merged vision token of its item, which
is where the engine scatters the vision embeddings. Sources: data URLs always; local files only
under an allowed directory; remote URLs are not fetched (the server never reaches out).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..chat.template import VIDEO_PLACEHOLDER
from ..media import (
    DEFAULT_LIMITS,
    MediaError,
    MediaItem,
    MediaLimits,
    expand_media_placeholders,
    preprocess_image,
    preprocess_video,
)
from .protocol import APIError

IMAGE_TYPES = ("image_url", "image")
VIDEO_TYPES = ("video_url", "video")


def _source(part: dict[str, Any], key: str, path: str, allowed_dir: Path | None) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise APIError(f"{path}.{key}.url: required, a data: URL or a file path", param=path)
    if url.startswith(("http://", "https://")):
        raise APIError(f"{path}.{key}.url: remote URLs are not fetched by this server; send a data: URL",
                       param=path)
    if url.startswith("data:"):
        return url
    if allowed_dir is None:
        raise APIError(f"{path}.{key}.url: local files are off; start the server with --allowed-local-media-path",
                       param=path)
    file = Path(url.removeprefix("file://")).resolve()
    if not file.is_relative_to(allowed_dir):
        raise APIError(f"{path}.{key}.url: {file} is outside the allowed media directory {allowed_dir}", param=path)
    return str(file)


def collect_media(
    messages: Sequence[dict[str, Any]], limits: MediaLimits = DEFAULT_LIMITS, allowed_dir: Path | None = None
) -> tuple[list[MediaItem], list[list[MediaItem]]]:
    """(every item in prompt order, the chunks of each video) from the messages' content parts."""
    items: list[MediaItem] = []
    videos: list[list[MediaItem]] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            path = f"messages[{i}].content[{j}]"
            if kind not in IMAGE_TYPES + VIDEO_TYPES:
                continue
            if m.get("role") != "user":
                raise APIError(f"{path}: media are only read from user messages", param=path)
            try:
                if kind in IMAGE_TYPES:
                    items.append(preprocess_image(_source(part, kind, path, allowed_dir), limits))
                else:
                    chunks = preprocess_video(_source(part, kind, path, allowed_dir), limits)
                    videos.append(chunks)
                    items.extend(chunks)
            except MediaError as e:
                raise APIError(f"{path}: {e}", param=path) from None
    return items, videos


def expand_videos(text: str, videos: list[list[MediaItem]]) -> str:
    """Replace each rendered video placeholder by its chunks' timestamped media blocks."""
    marker = VIDEO_PLACEHOLDER.rstrip("\n")
    if text.count(marker) != len(videos):
        raise APIError(f"the prompt has {text.count(marker)} video placeholders for {len(videos)} videos",
                       param="messages")
    for chunks in videos:
        text = text.replace(marker, "".join(c.prompt() for c in chunks), 1)
    return text


def expand_placeholders(ids: list[int], items: list[MediaItem], pad_id: int) -> list[int]:
    """Repeat the k-th `<|media_pad|>` once per merged token of item k (:func:`k25.media.expand_media_placeholders`)."""
    try:
        return expand_media_placeholders(ids, items, pad_id)
    except MediaError as e:
        raise APIError(str(e), param="messages") from None
