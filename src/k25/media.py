"""Image and video preprocessing for MoonViT-3D (spec §3.7–§3.8).

Images: the navit resize rule (never upscale; at most ``in_patch_limit`` patches and
``patch_limit_on_one_side`` patches per side), Pillow BICUBIC, zero padding bottom/right to a
multiple of patch·merge (28), ``(x/255 − 0.5)/0.5``, then patches [N, 3, 14, 14] in row-major order
with the grid (t, h, w) in patches. The number of LM positions an item takes is (h/2)(w/2).

Video: frames sampled at ≤ ``sample_fps`` (indices ``linspace(0, n−1, k).round()``), grouped into
chunks of ``temporal_merge_kernel_size`` frames; every frame is resized with the per-frame limit
``in_patch_limit_each_frame``; each chunk is one item with a ``HH:MM:SS.mmm`` timestamp that the prompt
writes before its media block. Decoding uses PyAV.

Everything here is CPU-side and model-free; :func:`pack_media` gives the ``pixel_values`` and
``grid_thws`` that ``k25.model.vision.MoonViT3d`` takes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_PAD, MEDIA_END = (
    "<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>"
)


class MediaError(ValueError):
    """Media that cannot be read or exceeds a configured limit; the message names the source."""


@dataclass(frozen=True)
class MediaLimits:
    """Preprocessing constants (the released ``preprocessor_config.json``) and safety limits.

    The first block is the model's contract; change it only for a model trained that way. The
    second block guards the server against hostile or accidental huge inputs; raise or lower freely.
    """

    patch_size: int = 14
    merge_kernel_size: int = 2
    in_patch_limit: int = 16384
    patch_limit_on_one_side: int = 512
    in_patch_limit_each_frame: int = 4096
    temporal_merge_kernel_size: int = 4
    sample_fps: float = 2.0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_num_frames_each_video: int | None = None  # caps (not refuses) the sampled frames, like the release

    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    max_video_bytes: int = 1024 * 1024 * 1024
    max_video_frames: int | None = 1024  # refuse videos sampling more frames than this; None = no limit

    @property
    def pad_factor(self) -> int:
        return self.patch_size * self.merge_kernel_size


DEFAULT_LIMITS = MediaLimits()


@dataclass(frozen=True)
class ResizePlan:
    """Where an image of ``original`` (w, h) goes: resized (w, h), padded (w, h), patch grid, tokens."""

    original: tuple[int, int]
    resized: tuple[int, int]
    padded: tuple[int, int]
    grid_hw: tuple[int, int]
    num_tokens: int


def plan_resize(width: int, height: int, patch_limit: int | None = None,
                limits: MediaLimits = DEFAULT_LIMITS) -> ResizePlan:
    """The navit resize rule (spec §3.7), without touching pixels.

    The patch limit is applied before padding, so the padded grid may hold slightly more patches
    than the limit (4000×3000 → 2073×1554, 112×150 patches, 4200 tokens with the defaults).
    """
    if width <= 0 or height <= 0:
        raise MediaError(f"image size {width}x{height}: both sides must be positive")
    p = limits.patch_size
    limit = limits.in_patch_limit if patch_limit is None else patch_limit
    side_px = limits.patch_limit_on_one_side * p
    s_total = math.sqrt(limit / (max(1, width // p) * max(1, height // p)))
    scale = min(1.0, s_total, side_px / width, side_px / height)
    new_w = min(max(1, int(width * scale)), side_px)
    new_h = min(max(1, int(height * scale)), side_px)
    f = limits.pad_factor
    pad_w = new_w + (f - new_w % f) % f
    pad_h = new_h + (f - new_h % f) % f
    grid_h, grid_w = pad_h // p, pad_w // p
    m = limits.merge_kernel_size
    return ResizePlan((width, height), (new_w, new_h), (pad_w, pad_h), (grid_h, grid_w),
                      (grid_h // m) * (grid_w // m))


def image_token_count(width: int, height: int, limits: MediaLimits = DEFAULT_LIMITS) -> int:
    """LM positions an image of this size takes, without decoding it."""
    return plan_resize(width, height, limits=limits).num_tokens


@dataclass
class MediaItem:
    """One encoder item: an image or one video chunk.

    ``pixel_values`` [t·h·w, 3, p, p] float32 (frame-major, then row-major); ``grid_thw`` = (t, h, w)
    in patches; ``num_tokens`` = (h/2)(w/2) LM positions. Video chunks carry their ``timestamp``.
    """

    kind: str
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    timestamp: str | None = None

    def prompt(self) -> str:
        """The text that stands for this item in a rendered prompt (one ``<|media_pad|>``).

        Images: the chat template writes their block; this is the same text without the trailing
        newline. Video chunks: the timestamp then the block, chunks concatenated with no separator.
        """
        block = f"{MEDIA_BEGIN}{'image' if self.kind == 'image' else 'video'}{MEDIA_CONTENT}{MEDIA_PAD}{MEDIA_END}"
        return f"{self.timestamp}{block}" if self.timestamp is not None else block


def expand_media_placeholders(ids: Sequence[int], items: Sequence[MediaItem | int], pad_id: int) -> list[int]:
    """Repeat the k-th ``<|media_pad|>`` once per merged token of item k (the LM positions it fills).

    ``items`` are media items or just their token counts. The one expansion inference (the server,
    ``k25 eval``) and training share, so a trained model sees media where it will see them served.
    """
    out: list[int] = []
    k = 0
    for t in ids:
        if t == pad_id:
            if k >= len(items):
                raise MediaError(f"the prompt holds more media placeholders than the {len(items)} media given "
                                 "(is '<|media_pad|>' typed in the text?)")
            item = items[k]
            out.extend([pad_id] * (item if isinstance(item, int) else item.num_tokens))
            k += 1
        else:
            out.append(t)
    if k != len(items):
        raise MediaError(f"{len(items)} media given but the prompt holds {k} placeholders")
    return out


def pack_media(items: Sequence[MediaItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate items for one tower call: pixel_values [ΣN, 3, p, p], grid_thws [n, 3] int64."""
    if not items:
        raise MediaError("pack_media: no items")
    pixels = torch.cat([it.pixel_values for it in items])
    grids = torch.tensor([it.grid_thw for it in items], dtype=torch.long)
    return pixels, grids


# ---- images ----------------------------------------------------------------------------------------

ImageSource = str | Path | bytes | bytearray | BinaryIO | Image.Image


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"<data URL, {len(source)} chars>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]} {source.mode}>"
    return repr(str(source)) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def decode_data_url(url: str) -> bytes:
    """``data:[<mime>][;base64],<payload>`` → bytes."""
    head, sep, payload = url.partition(",")
    if not head.startswith("data:") or not sep:
        raise MediaError(f"malformed data URL {_describe(url)}: expected 'data:<mime>;base64,<payload>'")
    if head.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"data URL {_describe(url)}: bad base64 ({exc})") from None
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(payload)


def _read_bytes(source: ImageSource | str, max_bytes: int, what: str) -> bytes:
    """Bytes of a path, data URL, byte string or file object, refusing more than ``max_bytes``."""
    name = _describe(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise MediaError(f"{what} {name}: remote URLs are not fetched here; download it first")
    if isinstance(source, str) and source.startswith("data:"):
        data = decode_data_url(source)
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source.removeprefix("file://") if isinstance(source, str) else source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise MediaError(f"{what} {name}: cannot read ({exc.strerror or exc})") from None
        if size > max_bytes:
            raise MediaError(f"{what} {name}: {size} bytes exceeds the limit of {max_bytes} bytes")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise MediaError(f"{what} {name}: unsupported source type {type(source).__name__}")
    if len(data) > max_bytes:
        raise MediaError(f"{what} {name}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data:
        raise MediaError(f"{what} {name}: empty")
    return data


def load_image(source: ImageSource, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode an image (path, ``file://``, data URL, bytes, file object or PIL image) as RGB.

    Size limits are checked from the header before the pixels are decoded, so a decompression
    bomb is refused cheaply. Animated images give their first frame. No EXIF rotation (the
    reference preprocessing does none).
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        data = _read_bytes(source, limits.max_image_bytes, "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise MediaError(f"image {name}: too many pixels ({exc})") from None
        except (Image.UnidentifiedImageError, OSError, ValueError) as exc:
            raise MediaError(f"image {name}: not a readable image ({exc})") from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise MediaError(f"image {name}: {w}x{h} = {w * h} pixels exceeds the limit of {limits.max_image_pixels}")
    if w <= 0 or h <= 0:
        raise MediaError(f"image {name}: empty ({w}x{h})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"image {name}: cannot decode pixels ({exc})") from None


def _resize_pad(img: Image.Image, plan: ResizePlan) -> np.ndarray:
    """RGB uint8 [H_pad, W_pad, 3]: BICUBIC resize then zeros on the bottom/right."""
    if img.size != plan.resized:
        img = img.resize(plan.resized, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    (pw, ph), (rw, rh) = plan.padded, plan.resized
    if (pw, ph) != (rw, rh):
        arr = np.pad(arr, ((0, ph - rh), (0, pw - rw), (0, 0)))
    return arr


def normalize_and_patchify(frames: np.ndarray, limits: MediaLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """uint8 [T, H, W, 3] → float32 patches [T·(H/p)·(W/p), 3, p, p], frame-major then row-major."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"frames: expected [T, H, W, 3] uint8, got shape {tuple(frames.shape)}")
    t, hh, ww, c = frames.shape
    p = limits.patch_size
    if hh % p or ww % p:
        raise MediaError(f"frames {hh}x{ww}: height and width must be multiples of the patch size {p}")
    # Same arithmetic as the reference: divide in float64, round to float32, subtract, times 1/std.
    x = (frames / 255.0).astype(np.float32)
    x -= np.asarray(limits.image_mean, dtype=np.float32)
    x *= 1.0 / np.asarray(limits.image_std, dtype=np.float32)
    x = torch.from_numpy(x).view(t, hh // p, p, ww // p, p, c)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(t * (hh // p) * (ww // p), c, p, p).contiguous()


def preprocess_image(source: ImageSource, limits: MediaLimits = DEFAULT_LIMITS) -> MediaItem:
    """Load, resize, pad, normalise and patchify one image into a :class:`MediaItem`."""
    img = load_image(source, limits)
    plan = plan_resize(*img.size, limits=limits)
    arr = _resize_pad(img, plan)
    grid_h, grid_w = plan.grid_hw
    return MediaItem("image", normalize_and_patchify(arr[None], limits), (1, grid_h, grid_w),
                     plan.num_tokens, plan.original, plan.resized)


# ---- video -----------------------------------------------------------------------------------------


def sample_frame_indices(num_frames: int, video_fps: float, sample_fps: float = 2.0,
                         max_frames: int | None = None) -> list[int]:
    """Frames kept: ``k = max(round(n·min(sample_fps, fps)/fps), 1)`` (capped at ``max_frames``),
    spread evenly over the whole video with both ends included."""
    if num_frames <= 0:
        raise MediaError(f"video has no frames (num_frames={num_frames})")
    if not video_fps > 0:
        raise MediaError(f"video frame rate {video_fps!r} is not positive")
    fps = min(sample_fps, video_fps)
    k = max(round(num_frames * fps / video_fps), 1)
    if max_frames is not None:
        k = max(min(k, max_frames), 1)
    return [int(i) for i in np.linspace(0, num_frames - 1, k).round()]


def format_timestamp(seconds: float) -> str:
    """``HH:MM:SS.mmm`` exactly as the reference writes chunk times (the prompt text must match).

    The reference takes HH:MM:SS from a UTC datetime (which rounds to whole microseconds, so
    1000.9999999999999 s reads 00:16:41) and the milliseconds by truncating ``seconds % 1``
    (so 2.4 s reads .399); both quirks are kept.
    """
    if seconds < 0:
        raise MediaError(f"timestamp {seconds!r}: must be >= 0")
    frac, whole_f = math.modf(seconds)
    whole = int(whole_f) + (round(frac * 1_000_000) >= 1_000_000)
    millis = int((seconds % 1) * 1000)
    hours, rem = divmod(whole, 3600)
    return f"{hours % 24:02d}:{rem // 60:02d}:{rem % 60:02d}.{millis:03d}"


def video_frame_plan(width: int, height: int, limits: MediaLimits = DEFAULT_LIMITS) -> ResizePlan:
    """The resize plan shared by every frame of a video (per-frame limit ``in_patch_limit_each_frame``)."""
    return plan_resize(width, height, patch_limit=limits.in_patch_limit_each_frame, limits=limits)


def _chunks(resized: Sequence[np.ndarray], indices: Sequence[int], video_fps: float, plan: ResizePlan,
            limits: MediaLimits) -> list[MediaItem]:
    items = []
    k = limits.temporal_merge_kernel_size
    grid_h, grid_w = plan.grid_hw
    for start in range(0, len(resized), k):
        chunk = np.stack(resized[start:start + k])
        items.append(MediaItem(
            "video_chunk", normalize_and_patchify(chunk, limits), (len(chunk), grid_h, grid_w), plan.num_tokens,
            plan.original, plan.resized, timestamp=format_timestamp(indices[start] / video_fps),
        ))
    return items


def chunk_frames(frames: Sequence[Image.Image | np.ndarray], indices: Sequence[int], video_fps: float,
                 limits: MediaLimits = DEFAULT_LIMITS) -> list[MediaItem]:
    """Sampled frames (PIL images or RGB uint8 [H, W, 3]) at source ``indices`` → chunks of 4.

    For frames decoded elsewhere. The first frame's size sets the one resize plan all frames
    share; a chunk's timestamp is its first frame's time; tokens per chunk do not depend on how
    many frames it holds.
    """
    if not frames or len(frames) != len(indices):
        raise MediaError(f"chunk_frames: {len(frames)} frames but {len(indices)} indices")
    images = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    plan = video_frame_plan(*images[0].size, limits)
    return _chunks([_resize_pad(img.convert("RGB"), plan) for img in images], indices, video_fps, plan, limits)


def preprocess_video(source: str | Path | bytes | BinaryIO, limits: MediaLimits = DEFAULT_LIMITS) -> list[MediaItem]:
    """Decode a video with PyAV, sample ≤ ``sample_fps`` frames per second, chunk by 4.

    Returns the chunks in order; ``"".join(c.prompt() for c in chunks)`` is the text that replaces
    the video's placeholder in the prompt.
    """
    import av

    name = _describe(source)
    data = _read_bytes(source, limits.max_video_bytes, "video")

    def open_container() -> Any:
        try:
            return av.open(io.BytesIO(data))
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"video {name}: not a readable video ({exc})") from None

    container = open_container()
    with container:
        if not container.streams.video:
            raise MediaError(f"video {name}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_image_pixels:
            raise MediaError(
                f"video {name}: frame size {width}x{height} exceeds the limit of {limits.max_image_pixels} pixels"
            )
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise MediaError(f"video {name}: unknown frame rate")
        fps = float(rate)
        num_frames = stream.frames
        if num_frames <= 0:  # the container does not say: count packets (no decoding)
            with open_container() as probe:
                num_frames = sum(1 for pkt in probe.demux(probe.streams.video[0]) if pkt.size)
        indices = sample_frame_indices(num_frames, fps, limits.sample_fps, limits.max_num_frames_each_video)
        if limits.max_video_frames is not None and len(indices) > limits.max_video_frames:
            raise MediaError(
                f"video {name}: {len(indices)} sampled frames ({num_frames} at {fps:g} fps) exceeds the limit "
                f"of {limits.max_video_frames}"
            )
        wanted = set(indices)
        last = indices[-1]
        kept: list[int] = []  # a container may announce more frames than it holds
        resized: list[np.ndarray] = []
        plan: ResizePlan | None = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    img = frame.to_image().convert("RGB")
                    plan = plan or video_frame_plan(*img.size, limits)
                    resized.append(_resize_pad(img, plan))  # resize now: keep only small frames around
                    kept.append(i)
                if i >= last:
                    break
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"video {name}: decoding failed ({exc})") from None
    if plan is None:
        raise MediaError(f"video {name}: no frame could be decoded")
    return _chunks(resized, kept, fps, plan, limits)
