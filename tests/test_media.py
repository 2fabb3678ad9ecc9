"""Image/video preprocessing (spec §3.7–§3.8): the worked examples, pixel layout, limits, errors.

transformers' Kimi_K25ImageProcessor needs torchvision, which does not import beside the CPU torch
wheel here, so the processor is checked against the spec's worked examples and against the
definition (Pillow BICUBIC, bottom/right zero padding, (x/255 − 0.5)/0.5, row-major patches).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from k25.config import preset
from k25.media import (
    MediaError,
    MediaLimits,
    chunk_frames,
    format_timestamp,
    image_token_count,
    load_image,
    pack_media,
    plan_resize,
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
)
from k25.model.vision import MoonViT3d, PatchMergerMLP, encode_media


def normalized(arr: np.ndarray) -> np.ndarray:
    return (arr.astype(np.float64) / 255.0 - 0.5) / 0.5


def patch_of(arr: np.ndarray, r: int, c: int, p: int = 14) -> np.ndarray:
    """Patch (r, c) of an [H, W, 3] uint8 array as [3, p, p] normalised values."""
    return normalized(arr[r * p:(r + 1) * p, c * p:(c + 1) * p]).transpose(2, 0, 1)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- the resize rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "limit", "resized", "grid_hw", "tokens"),
    [
        ((1920, 1080), None, (1920, 1080), (78, 138), 2691),
        ((448, 448), None, (448, 448), (32, 32), 256),
        ((4000, 3000), None, (2073, 1554), (112, 150), 4200),  # over the limit after padding, as specified
        ((1920, 1080), 4096, (1196, 672), (48, 86), 1032),  # a video frame (per-frame limit)
        ((100, 50), None, (100, 50), (4, 8), 8),  # small: never upscaled, only padded
        ((1, 1), None, (1, 1), (2, 2), 1),
        ((20000, 300), None, (7168, 107), (8, 512), 1024),  # the 512-patches-per-side cap
    ],
)
def test_resize_rule_worked_examples(size, limit, resized, grid_hw, tokens):
    plan = plan_resize(*size, patch_limit=limit)
    assert plan.resized == resized
    assert plan.grid_hw == grid_hw
    assert plan.padded == (grid_hw[1] * 14, grid_hw[0] * 14)
    assert plan.num_tokens == tokens
    if limit is None:
        assert image_token_count(*size) == tokens


def test_resize_limits_are_configurable():
    limits = MediaLimits(in_patch_limit=1024)
    plan = plan_resize(1920, 1080, limits=limits)
    assert plan.resized[0] < 1920 and plan.num_tokens <= 1024 // 4 + 40


# ---- pixels ----------------------------------------------------------------------------------------


def test_image_pixels_layout_and_padding():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
    item = preprocess_image(Image.fromarray(arr))
    assert item.kind == "image" and item.grid_thw == (1, 78, 138) and item.num_tokens == 2691
    pv = item.pixel_values
    assert pv.shape == (78 * 138, 3, 14, 14) and pv.dtype == torch.float32

    def at(r: int, c: int) -> np.ndarray:
        return pv[r * 138 + c].numpy()

    for r, c in [(0, 0), (0, 136), (5, 17), (76, 136)]:
        np.testing.assert_allclose(at(r, c), patch_of(arr, r, c), atol=1e-6)
    # 1080 = 77·14 + 2 and 1920 = 137·14 + 2: the last patch row/column holds 2 real lines, then pad.
    np.testing.assert_allclose(at(77, 3)[:, :2], patch_of(arr[:1080], 77, 3)[:, :2], atol=1e-6)
    assert (at(77, 3)[:, 2:] == -1).all() and (at(3, 137)[:, :, 2:] == -1).all()
    assert pv.min() >= -1 and pv.max() <= 1


def test_large_image_is_downscaled_bicubic():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(3000, 4000, 3), dtype=np.uint8))
    item = preprocess_image(img)
    assert item.resized_size == (2073, 1554) and item.grid_thw == (1, 112, 150) and item.num_tokens == 4200
    ref = np.asarray(img.resize((2073, 1554), Image.Resampling.BICUBIC))
    pv = item.pixel_values.view(112, 150, 3, 14, 14)
    np.testing.assert_allclose(pv[10, 20].numpy(), patch_of(ref, 10, 20), atol=1e-6)
    # 1554 = 111·14 exactly: patch row 111 is all padding; 2073 = 148·14 + 1: column 148 keeps 1 pixel.
    assert (pv[111] == -1).all() and (pv[:, 149] == -1).all()
    assert (pv[:111, 148, :, :, 1:] == -1).all() and not (pv[:111, 148, :, :, 0] == -1).all()


def test_modes_and_sources(tmp_path: Path):
    rgba = Image.new("RGBA", (30, 20), (10, 200, 30, 128))
    gray = Image.new("L", (30, 20), 77)
    path = tmp_path / "a.png"
    rgba.save(path)
    data = png_bytes(gray)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (rgba, path, str(path), f"file://{path}", data, url, io.BytesIO(data)):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (30, 20)
    assert preprocess_image(url).pixel_values[0, 0, 0, 0].item() == pytest.approx((77 / 255 - 0.5) / 0.5)


@pytest.mark.parametrize(
    ("source", "limits", "message"),
    [
        (b"definitely not an image", MediaLimits(), "not a readable image"),
        ("/nonexistent/cat.png", MediaLimits(), "cannot read"),
        ("https://example.com/cat.png", MediaLimits(), "remote URLs"),
        ("data:image/png;base64,@@@", MediaLimits(), "bad base64"),
        (b"", MediaLimits(), "empty"),
        (png_bytes(Image.new("RGB", (200, 100))), MediaLimits(max_image_pixels=10_000), "200x100 = 20000 pixels"),
        (png_bytes(Image.new("RGB", (200, 100))), MediaLimits(max_image_bytes=50), "exceeds the limit of 50 bytes"),
        (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], MediaLimits(), "image <60 bytes>"),
    ],
)
def test_image_errors_are_clear(source, limits, message):
    with pytest.raises(MediaError, match=message):
        preprocess_image(source, limits)


def test_preprocessed_image_runs_through_the_tower():
    cfg = preset("tiny").vision_config
    tower, proj = MoonViT3d(cfg).eval(), PatchMergerMLP(cfg).eval()
    items = [preprocess_image(Image.new("RGB", (100, 60), (200, 10, 10))),
             preprocess_image(Image.new("RGB", (30, 30), (0, 0, 250)))]
    pixels, grids = pack_media(items)
    assert grids.tolist() == [[1, 6, 8], [1, 4, 4]]
    with torch.no_grad():
        embeds = encode_media(tower, proj, pixels, grids)
    assert [e.shape for e in embeds] == [(it.num_tokens, cfg.text_hidden_size) for it in items]
    assert [it.num_tokens for it in items] == [12, 4]


# ---- video -----------------------------------------------------------------------------------------


def test_frame_sampling_and_timestamps():
    assert sample_frame_indices(25, 10.0) == [0, 6, 12, 18, 24]
    assert sample_frame_indices(300, 30.0) == [int(i) for i in np.linspace(0, 299, 20).round()]
    assert sample_frame_indices(5, 1.0) == [0, 1, 2, 3, 4]  # fps below 2: every frame
    assert sample_frame_indices(3, 30.0) == [0]  # round(0.2) → at least one frame
    assert sample_frame_indices(300, 30.0, max_frames=4) == [0, 100, 199, 299]
    assert format_timestamp(0.0) == "00:00:00.000"
    assert format_timestamp(3661.5) == "01:01:01.500"
    assert format_timestamp(0.6) == "00:00:00.600"
    # Milliseconds are truncated from the binary fraction, as the reference does: 2.4 % 1 < 0.4.
    assert format_timestamp(2.4) == "00:00:02.399"
    # ...and whole seconds from a microsecond-rounded datetime: just below 1001 s reads 00:16:41.
    assert format_timestamp(30000 / (30000 / 1001)) == "00:16:41.000"
    assert format_timestamp(1000.9999999999999) == "00:16:41.999"


def test_chunk_frames_full_hd_example():
    """Spec §3.8: a 1920×1080 frame under the 4096-patch frame limit → 1196×672, grid 48×86, 1032 tokens."""
    frames = [Image.new("RGB", (1920, 1080), (25 * i, 0, 0)) for i in range(5)]
    chunks = chunk_frames(frames, [0, 15, 30, 45, 60], video_fps=30.0)
    assert [c.grid_thw for c in chunks] == [(4, 48, 86), (1, 48, 86)]
    assert [c.num_tokens for c in chunks] == [1032, 1032]
    assert [c.timestamp for c in chunks] == ["00:00:00.000", "00:00:02.000"]
    assert chunks[0].resized_size == (1196, 672)
    pixels, grids = pack_media(chunks)
    assert pixels.shape == (5 * 48 * 86, 3, 14, 14) and grids.tolist() == [[4, 48, 86], [1, 48, 86]]


def test_timestamps_match_the_datetime_definition():
    """The reference formats with a UTC datetime; check ours against that over realistic frame times."""
    from datetime import datetime, timezone

    for fps in (30000 / 1001, 24000 / 1001, 25.0, 29.97, 59.94, 2.0):
        for idx in range(0, 200_000, 997):
            ts = idx / fps
            want = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%H:%M:%S") + f".{int(ts % 1 * 1000):03d}"
            assert format_timestamp(ts) == want, (idx, fps)


def write_video(path: Path, num_frames: int, fps: int, size: tuple[int, int] = (64, 48)) -> None:
    """A clip whose frame i is a flat gray of level 10·i, so decoded frames can be identified."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            arr = np.full((size[1], size[0], 3), (10 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # mkv does not store a frame count: packets are counted
def test_video_chunks(tmp_path: Path, suffix: str):
    path = tmp_path / f"clip{suffix}"
    write_video(path, num_frames=25, fps=10)
    chunks = preprocess_video(path)
    assert [c.grid_thw for c in chunks] == [(4, 4, 6), (1, 4, 6)]
    assert [c.num_tokens for c in chunks] == [6, 6]  # independent of the frames in the chunk
    assert [c.timestamp for c in chunks] == ["00:00:00.000", "00:00:02.399"]
    assert chunks[0].prompt() == "00:00:00.000<|media_begin|>video<|media_content|><|media_pad|><|media_end|>"
    # Sampled frames 0, 6, 12, 18 | 24; each is gray 10·i (± lossy codec error) in the 48×64 corner,
    # padding (−1) elsewhere.
    frames = torch.cat([c.pixel_values for c in chunks]).view(5, 4, 6, 3, 14, 14)
    frames = frames.permute(0, 1, 4, 2, 5, 3).reshape(5, 56, 84, 3)
    for frame, idx in zip(frames, [0, 6, 12, 18, 24], strict=True):
        level = (frame[:48, :64].mean().item() / 2 + 0.5) * 255
        assert abs(level - 10 * idx) < 4, (idx, level)
        assert (frame[48:] == -1).all() and (frame[:, 64:] == -1).all()


def test_video_limits_and_errors(tmp_path: Path):
    path = tmp_path / "clip.mp4"
    write_video(path, num_frames=40, fps=10)
    assert len(preprocess_video(path)) == 2  # 8 sampled frames
    capped = preprocess_video(path, MediaLimits(max_num_frames_each_video=3))
    assert [c.grid_thw[0] for c in capped] == [3]
    with pytest.raises(MediaError, match="8 sampled frames .* exceeds the limit of 5"):
        preprocess_video(path, MediaLimits(max_video_frames=5))
    with pytest.raises(MediaError, match="frame size 64x48 exceeds"):
        preprocess_video(path, MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaError, match="not a readable video"):
        preprocess_video(b"\x00garbage" * 100)
    with pytest.raises(MediaError, match="bytes exceeds the limit"):
        preprocess_video(path, MediaLimits(max_video_bytes=100))
