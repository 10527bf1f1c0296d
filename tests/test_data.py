"""Tokenizers, text reading, extraction, datasets and batching (trm_fast.data)."""
import gzip
import json
import warnings

import pytest
import torch

from trm_fast.corpus import default_corpus
from trm_fast.data import (ByteTokenizer, TokenDataset, collate_batch, extract_texts, load_tokenizer, read_texts,
                           train_spm)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo, 猫", add_bos=True)
    assert ids[0] == 1 and ids[-1] == 2 and min(ids[1:-1]) >= 3 and max(ids) < tok.vocab_size
    assert len(ids) == 2 + len("héllo, 猫".encode()) and tok.encode("ab", add_eos=False) == [100, 101]
    assert tok.decode(ids) == "héllo, 猫"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text(default_corpus()[:60_000], encoding="utf-8")
    return train_spm(text, folder / "m", vocab_size=300)


def test_sentencepiece_seed_ids_and_interface(spm_model):
    tok = load_tokenizer(spm_model)
    assert (tok.unk_id, tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3, 300)
    ids = tok.encode("Return the value.")
    assert ids[-1] == 3 and ids[0] != 2  # eos on, bos off by default: the seed wrapper's defaults
    assert tok.encode("Return the value.", add_bos=True, add_eos=False)[0] == 2
    assert tok.decode(ids) == "Return the value."


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        load_tokenizer(str(tmp_path / "none.model"))
    with pytest.raises(FileNotFoundError, match="training text not found"):
        train_spm(tmp_path / "none.txt", tmp_path / "m")


def _write_jsonl(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_read_texts_formats_and_malformed_lines(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "one"}), "{broken", json.dumps({"title": "x"}),
                                        json.dumps({"text": 5}), "", json.dumps({"text": "two"})])
    _write_jsonl(tmp_path / "b.jsonl.gz", [json.dumps({"text": "three"})])
    (tmp_path / "c.txt").write_text("para one\nline\n\n\npara two\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"a.jsonl: skipped 3 malformed line\(s\), first at line 2"):
        texts = list(read_texts([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.txt"]))
    assert texts == ["one", "two", "three", "para one\nline", "para two\n"]


def test_read_texts_never_swallows_everything(tmp_path):
    _write_jsonl(tmp_path / "bad.jsonl", ["not json", "[1, 2]"])
    with pytest.raises(ValueError, match="no line is a JSON object with a string 'text' field"):
        list(read_texts(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="data file\\(s\\) not found"):
        list(read_texts([tmp_path / "x.jsonl", tmp_path / "y.txt"]))
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    with pytest.warns(UserWarning, match="data file not found, skipped"):
        assert list(read_texts([tmp_path / "x.jsonl", tmp_path / "ok.txt"])) == ["fine"]


def test_extract_texts_recursive(tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    _write_jsonl(tmp_path / "in" / "a.jsonl.gz", [json.dumps({"text": "first\nline"})])
    _write_jsonl(tmp_path / "in" / "deep" / "b.jsonl.gz", [json.dumps({"text": "second"})])
    _write_jsonl(tmp_path / "in" / "ignored.jsonl", [json.dumps({"text": "not gz"})])
    assert extract_texts(tmp_path / "in", tmp_path / "out" / "t.txt") == 2
    assert (tmp_path / "out" / "t.txt").read_text(encoding="utf-8") == "first line\nsecond\n"
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl.gz files"):
        extract_texts(tmp_path / "empty", tmp_path / "t.txt")


def test_per_document_samples_truncate_and_shift():
    tok = ByteTokenizer()
    ds = TokenDataset(["abcdefgh", "xy", "", "z"], tok, max_seq_len=4)
    assert len(ds) == 3  # "" gives [eos] only: no sample
    inputs, targets = ds[0]
    assert inputs.tolist() == [100, 101, 102, 103] and targets.tolist() == [101, 102, 103, 104]
    assert ds[1][0].tolist() == [123, 124] and ds[1][1].tolist() == [124, 2]
    assert len(TokenDataset(["abcdefgh", "xy", "z"], tok, 4, max_samples=2)) == 2


def test_packing_makes_every_token_a_target_once():
    tok = ByteTokenizer()
    texts = ["hello world", "second doc", "third"]
    stream = [i for t in texts for i in tok.encode(t)]
    ds = TokenDataset(texts, tok, max_seq_len=5, pack=True)
    assert all(len(ds[k][0]) == 5 for k in range(len(ds)))
    targets = torch.cat([ds[k][1] for k in range(len(ds))]).tolist()
    assert targets == stream[1:1 + 5 * len(ds)] and len(ds) == (len(stream) - 1) // 5
    train, val = ds.split(0.25)
    assert len(train) + len(val) == len(ds) and len(val) >= 1
    assert torch.equal(val[0][0], ds[len(train)][0])
    with pytest.raises(ValueError, match="val_fraction"):
        ds.split(1.5)


def test_random_windows_cut_the_training_stream_at_any_offset():
    tok = ByteTokenizer()
    texts = ["hello world", "second doc", "third one here"]
    train, val = TokenDataset(texts, tok, max_seq_len=5, pack=True).split(0.25)
    stream = train.stream.tolist()
    assert stream == [i for t in texts for i in tok.encode(t)][:len(train) * 5 + 1]
    batch = train.random_windows(64, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == batch["target_ids"].shape == batch["attention_mask"].shape == (64, 5)
    assert bool(batch["attention_mask"].all())
    starts = set()
    for inputs, targets in zip(batch["input_ids"].tolist(), batch["target_ids"].tolist()):
        start = next(k for k in range(len(stream) - 5) if stream[k:k + 5] == inputs)
        assert targets == stream[start + 1:start + 6]  # inside the training part: no validation token as a target
        starts.add(start)
    assert len(starts) > 3  # not only the fixed cuts' offsets
    again = train.random_windows(64, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="packed"):
        TokenDataset(texts, tok, max_seq_len=5).random_windows(2, torch.Generator())


def test_dataset_errors():
    with pytest.raises(ValueError, match="no training sample"):
        TokenDataset(["", ""], ByteTokenizer(), 8)
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        TokenDataset(["abc"], ByteTokenizer(), 0)


def test_collate_right_pads_with_mask():
    batch = collate_batch([(torch.tensor([5, 6, 7]), torch.tensor([6, 7, 8])), (torch.tensor([9]), torch.tensor([4]))],
                          pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 1, 1]]
    assert batch["target_ids"].tolist() == [[6, 7, 8], [4, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_plain_text_reading_handles_no_warnings(tmp_path):
    (tmp_path / "t.txt").write_text("a\n\nb", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(read_texts(str(tmp_path / "t.txt"))) == ["a", "b"]
