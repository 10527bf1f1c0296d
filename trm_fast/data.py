"""Tokenizers (byte-level and SentencePiece, one interface), text extraction, datasets and batching."""
from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]


class ByteTokenizer:
    """Byte-level tokenizer of the seed project: pad 0, bos 1, eos 2, bytes at offset 3 (vocab 259)."""

    name = "byte"
    pad_id, bos_id, eos_id, unk_id, offset = 0, 1, 2, 0, 3
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = True) -> List[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """The seed's SentencePiece wrapper: add_bos off and add_eos on by default; pad falls back to unk."""

    def __init__(self, model_file: PathLike):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        spm = _import_sentencepiece()
        self.name = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = True) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] * (add_bos and self.bos_id >= 0) + ids + [self.eos_id] * (add_eos and self.eos_id >= 0)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)])


Tokenizer = Union[ByteTokenizer, SentencePieceTokenizer]


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """`"byte"` or the path of a SentencePiece `.model` file."""
    if spec == "byte":
        return ByteTokenizer()
    if str(spec).endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or the path of a SentencePiece .model file")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("SentencePiece tokenizers need the sentencepiece package: pip install sentencepiece") from None
    return sentencepiece


def train_spm(input_file: PathLike, model_prefix: PathLike, vocab_size: int = 16000,
              character_coverage: float = 0.9995, model_type: str = "bpe") -> str:
    """Train a SentencePiece model with the seed's settings (unk 0, pad 1, bos 2, eos 3); returns the .model path."""
    if not os.path.isfile(input_file):
        raise FileNotFoundError(f"training text not found: {input_file}")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        _import_sentencepiece().SentencePieceTrainer.train(
            input=str(input_file), model_prefix=str(model_prefix), vocab_size=vocab_size,
            character_coverage=character_coverage, model_type=model_type,
            unk_id=0, pad_id=1, bos_id=2, eos_id=3, minloglevel=2)
    except RuntimeError as exc:  # e.g. a vocab_size below the number of characters to cover
        raise ValueError(f"SentencePiece training on {input_file} failed: {exc}") from None
    return f"{model_prefix}.model"


# -- reading texts --------------------------------------------------------------------------------------

def _jsonl_texts(path: Path) -> Iterator[str]:
    """The `text` field of each line; malformed lines are counted and reported, and a file with none
    readable is an error."""
    opener = gzip.open if path.name.endswith(".gz") else open
    good, bad = 0, []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                bad.append(number)
                continue
            good += 1
            yield text
    if bad:
        if not good:
            raise ValueError(f"{path}: no line is a JSON object with a string 'text' field (lines {bad[:5]}...)")
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s), first at line {bad[0]}")


def read_texts(paths: Union[PathLike, Sequence[PathLike]]) -> Iterator[str]:
    """Documents from jsonl / jsonl.gz files (the `text` field of each line) and plain text files
    (paragraphs separated by blank lines). A missing file among several is skipped with a warning; none
    found is an error."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        raise FileNotFoundError(f"data file(s) not found: {', '.join(map(str, missing))}")
    for p in missing:
        warnings.warn(f"data file not found, skipped: {p}")
    for path in paths:
        if path in missing:
            continue
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_texts(path)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            yield from (part for part in re.split(r"\n[ \t]*\n\s*", text) if part.strip())


def extract_texts(input_dir: PathLike, output_file: PathLike) -> int:
    """Write the `text` of every line of every `*.jsonl.gz` under input_dir (recursively) to one text file,
    a text per line (newlines inside a text become spaces); returns the number of texts."""
    files = sorted(Path(input_dir).rglob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl.gz files under {input_dir}")
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(output_file, "w", encoding="utf-8") as out:
        for text in read_texts(files):
            out.write(" ".join(text.splitlines()) + "\n")
            count += 1
    return count


# -- datasets -------------------------------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    """(input_ids, target_ids) samples of at most max_seq_len tokens.

    Per document (the seed's way): each text is tokenized with eos, truncated to max_seq_len + 1 and
    shifted. Packed (`pack=True`): all documents are concatenated and cut into windows of max_seq_len + 1
    tokens, consecutive windows overlapping by one token so every token is a target once; the token stream
    stays as `stream`, for `random_windows`.
    """

    def __init__(self, texts: Iterable[str], tokenizer: Tokenizer, max_seq_len: int, pack: bool = False,
                 max_samples: Optional[int] = None):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.max_seq_len, self.pad_id = max_seq_len, tokenizer.pad_id
        span = max_seq_len + 1
        stream = None
        if pack:
            stream = torch.tensor([i for text in texts for i in tokenizer.encode(text)], dtype=torch.long)
            count = max(0, (len(stream) - 1) // max_seq_len)
            self.samples = [stream[k * max_seq_len: k * max_seq_len + span] for k in range(count)]
        else:
            rows = (tokenizer.encode(text)[:span] for text in texts)
            self.samples = [torch.tensor(ids, dtype=torch.long) for ids in rows if len(ids) >= 2]
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        # the tokens the samples cover (windows overlap by one token)
        self.stream = None if stream is None else stream[:len(self.samples) * max_seq_len + 1]
        if not self.samples:
            raise ValueError("the data gave no training sample (every text is shorter than 2 tokens?)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        row = self.samples[index]
        return row[:-1], row[1:]

    def random_windows(self, count: int, generator: torch.Generator) -> dict:
        """A batch (as `collate_batch` makes) of `count` windows of a packed dataset, each starting at a
        random offset of its token stream (nanoGPT's sampling): unlike the fixed cuts, a token is seen at
        every position of the context over training. The windows cover the same tokens as the samples."""
        if self.stream is None:
            raise ValueError("random windows need a packed dataset (pack=True)")
        starts = torch.randint(0, len(self.stream) - self.max_seq_len, (count, 1), generator=generator)
        rows = self.stream[starts + torch.arange(self.max_seq_len + 1)]
        return {"input_ids": rows[:, :-1], "target_ids": rows[:, 1:],
                "attention_mask": torch.ones(count, self.max_seq_len, dtype=torch.long)}

    def split(self, val_fraction: float) -> Tuple["TokenDataset", "TokenDataset"]:
        """The first (1 - val_fraction) of the samples and the rest, in order (the tail of a text is validation)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if len(self) < 2:
            raise ValueError("cannot split a dataset of fewer than 2 samples into train and validation")
        cut = min(len(self) - 1, max(1, round(len(self) * (1.0 - val_fraction))))
        train, val = (object.__new__(TokenDataset) for _ in range(2))
        for part, samples in ((train, self.samples[:cut]), (val, self.samples[cut:])):
            part.max_seq_len, part.pad_id, part.samples = self.max_seq_len, self.pad_id, samples
        train.stream, val.stream = ((None, None) if self.stream is None else
                                    (self.stream[:cut * self.max_seq_len + 1], self.stream[cut * self.max_seq_len:]))
        return train, val


def collate_batch(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    """Right padding to the longest sample: input_ids, target_ids (pad where padded), attention_mask."""
    length = max(len(inputs) for inputs, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    target_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (inputs, targets) in enumerate(batch):
        input_ids[row, :len(inputs)] = inputs
        target_ids[row, :len(targets)] = targets
        attention_mask[row, :len(inputs)] = 1
    return {"input_ids": input_ids, "target_ids": target_ids, "attention_mask": attention_mask}


def dataset_batches(dataset, batch_size: int) -> Iterator[dict]:
    """The dataset in order, `batch_size` samples at a time, collated (on the CPU)."""
    for start in range(0, len(dataset), batch_size):
        yield collate_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], dataset.pad_id)
