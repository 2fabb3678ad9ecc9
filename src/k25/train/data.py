"""Training data: packed pretraining sequences and chat SFT examples with assistant-only loss.

Every batch is a pure function of (seed, global sample index), so a resumed run and a run split
over ranks see exactly the samples an uninterrupted single-process run sees, with no iterator
state to save. A sample is ``(input_ids [T], targets [T], loss_mask [T])``.

Records with images (``k25 data`` visual families, or conversations with ``image_url`` parts) are
tokenized as inference tokenizes them: the template's one ``<|media_pad|>`` per image is expanded
by :func:`k25.media.expand_media_placeholders` to the image's merged-token count, and the image is
preprocessed by :func:`k25.media.preprocess_image` when its sample is drawn. A dataset holding any
image gives 5-tuples ``(input_ids, targets, loss_mask, pixel_values [N, 3, 14, 14], grid_thws
[n, 3])``: the media of a batch's rows, concatenated in row order, which is the order the model
scatters them into the placeholder positions. Media placeholders are never loss targets.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat.template import last_final_answer_index, render, render_assistant_output
from ..chat.tokenizer import VOCAB_FILE, KimiTokenizer, write_tiktoken_ranks
from ..media import DEFAULT_LIMITS, MediaError, expand_media_placeholders, pack_media, preprocess_image

MEDIA_PAD = "<|media_pad|>"


class DataError(ValueError):
    """A training data file is missing, empty or malformed; the message names the file and line."""


def byte_tokenizer(directory: str | Path) -> KimiTokenizer:
    """A byte-level Kimi tokenizer: 256 byte tokens + the 256 reserved Kimi specials (vocab 512).

    It has the full chat layout (``<|im_assistant|>``, ``<think>``, ...) so the K2.5 template
    works, and fits the ``tiny`` preset's vocabulary; written to ``directory`` so checkpoints ship it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks({bytes([b]): b for b in range(256)}, directory / VOCAB_FILE)
    return KimiTokenizer(directory / VOCAB_FILE)


def load_tokenizer(spec: str, workdir: str | Path) -> KimiTokenizer:
    """``bytes`` → :func:`byte_tokenizer` in ``workdir``; otherwise a directory with ``tiktoken.model``."""
    if spec == "bytes":
        return byte_tokenizer(Path(workdir) / "byte-tokenizer")
    return KimiTokenizer.from_pretrained(spec)


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def is_curriculum_record(obj: Any) -> bool:
    """A ``k25 data`` record (``family`` plus ``messages`` or ``text``): trained by :func:`curriculum_example`."""
    return isinstance(obj, dict) and "family" in obj and bool(obj.get("messages") or obj.get("text"))


def curriculum_example(
    record: Mapping[str, Any], tokenizer: KimiTokenizer, loss_on_prompts: bool = False,
    base_dir: str | Path | None = None,
) -> ChatExample:
    """Tokens and loss mask of a ``k25 data`` record, in its own mode (thinking or instant).

    Every assistant turn is a target, except turns whose tool call the data shows failing (the
    model learns the recovery, not the mistake); prompts, tool results and history are context.
    Each segment is tokenized on its own, exactly as at inference, where the prompt is encoded
    and the reply generated. A prose record is one target ending in EOS. ``loss_on_prompts``
    makes every token a target (pretraining on the mixture), media placeholders excepted.
    Images are read relative to ``base_dir`` (the folder of the record's JSONL file).
    """
    from ..data import record_image_paths, training_segments

    if not record.get("messages"):
        ids = tokenizer.encode(str(record["text"]), allow_special_tokens=False) + [tokenizer.eos_id]
        return ChatExample(ids, [True] * len(ids))
    sources = record_image_paths(dict(record), base_dir if base_dir is not None else ".")
    refs = _media_refs(sources)
    pad = tokenizer.token_to_id(MEDIA_PAD) if refs else -1
    ids: list[int] = []
    mask: list[bool] = []
    used = 0
    for text, target in training_segments(dict(record), mask_failed=not loss_on_prompts):
        part = tokenizer.encode(text, allow_special_tokens=True)
        if refs:
            k = part.count(pad)
            part = _expand(part, refs[used : used + k], pad, len(ids))
            used += k
        ids.extend(part)
        mask.extend((target or loss_on_prompts) and t != pad for t in part)
    if used != len(refs):
        raise ValueError(f"{len(refs)} images but the rendered conversation holds {used} placeholders")
    return ChatExample(ids, mask, refs)


@dataclass
class MediaRef:
    """One image of an example: where to read it, and the placeholder run it fills (start, length)."""

    source: str
    tokens: int
    start: int = 0


def _media_refs(sources: Sequence[str]) -> list[MediaRef]:
    """Preprocess each image once, as inference does, to learn its token count (the pixels are dropped)."""
    refs = []
    for src in sources:
        try:
            refs.append(MediaRef(src, preprocess_image(src).num_tokens))
        except MediaError as e:
            raise ValueError(str(e)) from None
    return refs


def _expand(ids: list[int], refs: list[MediaRef], pad: int, offset: int) -> list[int]:
    """Inference's placeholder expansion; records where each image's run starts (``offset``: ids before)."""
    try:
        out = expand_media_placeholders(ids, [r.tokens for r in refs], pad)
    except MediaError as e:
        raise ValueError(str(e)) from None
    k = 0
    i = 0
    while k < len(refs):
        if out[i] == pad:
            refs[k].start = offset + i
            i += refs[k].tokens
            k += 1
        else:
            i += 1
    return out


def read_pretrain_tokens(
    paths: Sequence[str | Path], tokenizer: KimiTokenizer, media_examples: list[ChatExample] | None = None
) -> np.ndarray:
    """One token stream from ``.txt`` / ``.jsonl {text}`` files and ``k25 data`` records (chats with their specials).

    Records with images cannot be cut into stream windows (a window must hold whole images), so
    they go to ``media_examples`` instead (every token a target but the media placeholders); without
    that list they are an error.
    """
    from ..data import has_images

    stream: list[int] = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl" and p.is_file():
            records = list(_read_jsonl(p))
            if records and all(is_curriculum_record(obj) for _, obj in records):
                for n, obj in records:
                    try:
                        if has_images(obj):
                            if media_examples is None:
                                raise ValueError("a record with images; train a model with a vision tower")
                            media_examples.append(curriculum_example(obj, tokenizer, True, p.parent))
                            continue
                        ex = curriculum_example(obj, tokenizer, loss_on_prompts=True)
                    except (ValueError, KeyError, TypeError) as e:
                        raise DataError(f"{p}:{n}: {e}") from None
                    stream.extend(ex.ids if ex.ids[-1] == tokenizer.eos_id else [*ex.ids, tokenizer.eos_id])
            else:  # plain {text} records: already read
                stream.extend(tokenize_documents(_texts(p, records), tokenizer).tolist())
            continue
        stream.extend(tokenize_documents(read_documents([p]), tokenizer).tolist())
    return np.asarray(stream, dtype=np.int64)


def data_has_images(paths: Sequence[str | Path]) -> bool:
    """Whether any record of these JSONL files shows an image (decides whether the vision tower trains)."""
    from ..data import has_images

    for p in map(Path, paths):
        if p.suffix != ".jsonl" or not p.is_file():
            continue
        with p.open(encoding="utf-8") as f:
            for line in f:
                if "image" in line and line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # reported with its line number when the data is read
                    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and has_images(obj):
                        return True
    return False


def _texts(path: Path, records: Iterable[tuple[int, Any]]) -> list[str]:
    """The ``text`` of each ``(line number, object)`` of a ``.jsonl`` file, or an error naming the line."""
    docs = []
    for n, obj in records:
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
        docs.append(obj["text"])
    return docs


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Text documents: a ``.txt`` file is one document; a ``.jsonl`` file has one ``{"text": ...}`` per line."""
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: no such data file")
        if p.suffix == ".jsonl":
            docs.extend(_texts(p, _read_jsonl(p)))
        else:
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
    return docs


def tokenize_documents(docs: Iterable[str], tokenizer: KimiTokenizer) -> np.ndarray:
    """One token stream: each document's ids followed by EOS (the document boundary)."""
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer.encode(d, allow_special_tokens=False))
        stream.append(tokenizer.eos_id)
    return np.asarray(stream, dtype=np.int64)


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Dataset(abc.ABC):
    """Indexable samples with a seeded per-epoch shuffle: ``sample(k)`` for global index k."""

    seq_len: int

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples in one epoch."""

    @abc.abstractmethod
    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample i (unshuffled)."""

    def sample(self, k: int, seed: int, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self)
        epoch, pos = divmod(k, n)
        return self.item(int(_permutation(n, seed, epoch)[pos]) if shuffle else pos)

    def batch(self, indices: Sequence[int], seed: int, shuffle: bool = True) -> tuple[torch.Tensor, ...]:
        """Stacked ``(input_ids [B, T], targets [B, T], loss_mask [B, T])``, plus the rows' media
        concatenated in row order (``pixel_values``, ``grid_thws``) for datasets with images."""
        parts = [self.sample(k, seed, shuffle) for k in indices]
        cols = list(zip(*parts, strict=True))
        return (*(torch.stack(x) for x in cols[:3]), *(torch.cat(x) for x in cols[3:]))


class PackedDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over one stream (documents split by EOS)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{len(self.tokens)} tokens: too few for one sequence of {seq_len} (+1) tokens")

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return window[:-1], window[1:], torch.ones(self.seq_len, dtype=torch.bool)

    def split(self, eval_fraction: float) -> tuple[PackedDataset, PackedDataset]:
        """(train, held-out): the last ``eval_fraction`` of the stream is held out, never trained on."""
        if not 0 < eval_fraction < 1:
            raise DataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
        cut = int(len(self.tokens) * (1 - eval_fraction))
        return PackedDataset(self.tokens[:cut].numpy(), self.seq_len), PackedDataset(self.tokens[cut:].numpy(),
                                                                                     self.seq_len)


def assistant_spans(ids: Sequence[int], tokenizer: KimiTokenizer) -> list[tuple[int, int]]:
    """[start, end) of each assistant turn's body: after ``<|im_middle|>``, through its ``<|im_end|>``."""
    start = tokenizer.token_to_id("<|im_assistant|>")
    middle = tokenizer.token_to_id("<|im_middle|>")
    end = tokenizer.im_end_id
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == start:
            j = i + 1
            while j < len(ids) and ids[j] != middle:
                j += 1
            k = j + 1
            while k < len(ids) and ids[k] != end:
                k += 1
            spans.append((j + 1, min(k + 1, len(ids))))
            i = k
        i += 1
    return spans


@dataclass
class ChatExample:
    ids: list[int]
    mask: list[bool]
    media: list[MediaRef] = field(default_factory=list)  # images in placeholder order


def no_media() -> tuple[torch.Tensor, torch.Tensor]:
    """The media of a row without images: no patches, no grids."""
    p = DEFAULT_LIMITS.patch_size
    return torch.zeros(0, 3, p, p), torch.zeros(0, 3, dtype=torch.long)


def load_media(refs: Sequence[MediaRef]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values``, ``grid_thws`` of some images, preprocessed as inference does."""
    if not refs:
        return no_media()
    items = []
    for ref in refs:
        item = preprocess_image(ref.source)
        if item.num_tokens != ref.tokens:
            raise DataError(f"{ref.source}: {item.num_tokens} image tokens, {ref.tokens} when the data was read "
                            "(did the file change?)")
        items.append(item)
    return pack_media(items)


def encode_conversation(conv: Mapping[str, Any], tokenizer: KimiTokenizer, thinking: bool = True,
                        base_dir: str | Path | None = None) -> ChatExample:
    """Tokens of a conversation and the mask of what the model generated, as at inference.

    The conversation is cut after its last assistant message. That message is the target
    (``render_assistant_output`` + ``<|im_end|>`` after the generation prompt, reasoning included in
    thinking mode). Earlier assistant turns of the current tool-use chain are rendered with their
    reasoning by the template and are trained too (minus the ``<think>`` the prompt supplies);
    history turns, rendered with an empty ``<think></think>``, are context only.
    """
    from ..data.vision import image_urls, resolve_url

    messages = list(conv["messages"])
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    if last < 0:
        raise ValueError("the conversation has no assistant turn to learn from")
    history = messages[:last]
    prompt = tokenizer.encode(render(history, conv.get("tools"), thinking=thinking, add_generation_prompt=True))
    refs = _media_refs([resolve_url(u, base_dir or ".") for u in image_urls(history)])
    if refs:
        prompt = _expand(prompt, refs, tokenizer.token_to_id(MEDIA_PAD), 0)
    target = tokenizer.encode(render_assistant_output(messages[last], thinking=thinking) + "<|im_end|>")
    mask = [False] * len(prompt)
    if thinking:
        split = last_final_answer_index(history)
        turns = [i for i, m in enumerate(history) if m.get("role") == "assistant"]
        think = tokenizer.token_to_id("<think>")
        for msg_index, (a, b) in zip(turns, assistant_spans(prompt, tokenizer), strict=False):
            if msg_index > split:
                a += 1 if a < b and prompt[a] == think else 0
                mask[a:b] = [True] * (b - a)
    return ChatExample(prompt + target, mask + [True] * len(target), refs)


def read_chat_examples(paths: Sequence[str | Path], tokenizer: KimiTokenizer, thinking: bool = True
                       ) -> list[ChatExample]:
    """Every conversation of the files, tokenized with its loss mask (file order)."""
    examples = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: no such data file")
        for n, obj in _read_jsonl(p):
            curriculum = is_curriculum_record(obj)
            if not curriculum and (not isinstance(obj, dict) or not isinstance(obj.get("messages"), list)):
                raise DataError(f"{p}:{n}: expected an object with a 'messages' list")
            try:
                ex = (curriculum_example(obj, tokenizer, base_dir=p.parent) if curriculum
                      else encode_conversation(obj, tokenizer, thinking, p.parent))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{p}:{n}: {e}") from None
            examples.append(ex)
    return examples


class SFTDataset(Dataset):
    """Chat conversations, one per sample: truncated/right-padded to ``seq_len``; loss on assistant tokens."""

    def __init__(self, examples: list[ChatExample], seq_len: int, pad_id: int) -> None:
        if not examples:
            raise DataError("no SFT conversations")
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.multimodal = any(ex.media for ex in examples)

    @classmethod
    def from_jsonl(cls, paths: Sequence[str | Path], tokenizer: KimiTokenizer, seq_len: int,
                   thinking: bool = True, pack: bool = False) -> SFTDataset:
        """Conversations from ``.jsonl`` files; ``k25 data`` records train every turn in their own mode.

        ``pack``: several conversations per sample (see :class:`PackedSFTDataset`) instead of one
        padded conversation each.
        """
        examples = read_chat_examples(paths, tokenizer, thinking)
        if pack:
            return PackedSFTDataset(examples, seq_len, tokenizer.pad_id)
        return cls(examples, seq_len, tokenizer.pad_id)

    def __len__(self) -> int:
        return len(self.examples)

    def item(self, i: int) -> tuple[torch.Tensor, ...]:
        ex = self.examples[i]
        n = self.seq_len + 1
        media = []
        for ref in ex.media:  # an image goes in whole or not at all: the row ends before a cut-off one
            if ref.start + ref.tokens <= self.seq_len:
                media.append(ref)
            else:
                n = min(n, ref.start)
                break
        ids = ex.ids[:n]
        mask = ex.mask[:n]
        pad = self.seq_len + 1 - len(ids)
        ids = torch.tensor(ids + [self.pad_id] * pad)
        target_mask = torch.tensor(mask[1:] + [False] * pad)  # the loss of predicting token j+1 from j
        if not self.multimodal:
            return ids[:-1], ids[1:], target_mask
        return ids[:-1], ids[1:], target_mask, *load_media(media)

    def split(self, eval_fraction: float) -> tuple[SFTDataset, SFTDataset]:
        n_eval = max(1, int(len(self.examples) * eval_fraction))
        if n_eval >= len(self.examples):
            raise DataError(f"{len(self.examples)} conversations: too few to hold out {eval_fraction:.0%}")
        return (SFTDataset(self.examples[:-n_eval], self.seq_len, self.pad_id),
                SFTDataset(self.examples[-n_eval:], self.seq_len, self.pad_id))


class PackedSFTDataset(SFTDataset):
    """Several conversations per sample, each kept whole: no padding spent where a next one fits.

    Conversations are shuffled once (seed 0, so the rows are a pure function of the data) and
    placed first-fit into rows of ``seq_len + 1`` tokens; one longer than a row is truncated. As in
    pretraining, a conversation may attend to the ones before it in its row.
    """

    CLOSE_BELOW = 32  # a row with less room than this takes no more conversations

    def __init__(self, examples: list[ChatExample], seq_len: int, pad_id: int) -> None:
        super().__init__(examples, seq_len, pad_id)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        rows: list[ChatExample] = []
        open_rows: list[ChatExample] = []  # rows with room left; first fit, closed when nearly full
        for i in order:
            ex = examples[i]
            row = next((r for r in open_rows if len(r.ids) + len(ex.ids) <= seq_len + 1), None)
            if row is None:
                row = ChatExample([], [])
                rows.append(row)
                open_rows.append(row)
            row.media.extend(MediaRef(r.source, r.tokens, r.start + len(row.ids)) for r in ex.media)
            row.ids.extend(ex.ids)
            row.mask.extend(ex.mask)
            if len(row.ids) > seq_len + 1 - self.CLOSE_BELOW:
                open_rows.remove(row)
        self.conversations = examples
        self.examples = rows
        self.multimodal = any(ex.media for ex in rows)

    def split(self, eval_fraction: float) -> tuple[SFTDataset, SFTDataset]:
        n_eval = max(1, int(len(self.conversations) * eval_fraction))
        if n_eval >= len(self.conversations):
            raise DataError(f"{len(self.conversations)} conversations: too few to hold out {eval_fraction:.0%}")
        return (PackedSFTDataset(self.conversations[:-n_eval], self.seq_len, self.pad_id),
                PackedSFTDataset(self.conversations[-n_eval:], self.seq_len, self.pad_id))


class ConcatDataset(Dataset):
    """Several datasets in one index space: pretraining's text windows beside its rows of image records.

    The seeded shuffle runs over the union, so image rows are spread evenly through training at
    the share the data gives them (the report's early fusion: a constant low vision ratio).
    """

    def __init__(self, parts: Sequence[Dataset]) -> None:
        self.parts = [p for p in parts if len(p)]
        if not self.parts:
            raise DataError("no training samples")
        self.seq_len = self.parts[0].seq_len
        self.multimodal = any(getattr(p, "multimodal", False) for p in self.parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)]).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def item(self, i: int) -> tuple[torch.Tensor, ...]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        sample = self.parts[k].item(i - int(self.offsets[k]))
        return (*sample, *no_media()) if self.multimodal and len(sample) == 3 else sample

    def split(self, eval_fraction: float) -> tuple[ConcatDataset, ConcatDataset]:
        """Each part split its own way (the end of the stream; the last conversations)."""
        pairs = [p.split(eval_fraction) for p in self.parts]  # type: ignore[attr-defined]
        return ConcatDataset([a for a, _ in pairs]), ConcatDataset([b for _, b in pairs])
