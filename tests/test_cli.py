"""The command line (every command on tiny inputs, and its error paths), the built-in corpus, the demo."""
import gzip
import json

import pytest
import torch

import trm_fast
from trm_fast.cli import format_count, main
from trm_fast.corpus import default_corpus
from trm_fast.data import ByteTokenizer
from trm_fast.demo import run_demo

TINY = ["--set", "d_model=32", "n_heads=2", "dropout=0.0", "--seq-len", "32", "--batch-size", "4"]


def test_doctor_reports_every_op(capsys):
    assert main(["doctor", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status["ops"]) == {"tinynet.concat_linear", "tinynet.causal_attention", "tinynet.add_layer_norm",
                                  "tinynet.add_layer_norm_and_cast", "tinynet.feed_forward", "tinynet.linear",
                                  "tinynet.cross_entropy", "tinynet.head_cross_entropy", "tinynet.halting_loss",
                                  "tinynet.mean_losses", "tinynet.embed", "tinynet.masked_mean", "tinynet.q_head",
                                  "decode.decode_linear", "decode.decode_add_norm_linear", "decode.decode_ffn_add_norm",
                                  "decode.decode_attention", "decode.add_layer_norm_into", "decode.decode_append",
                                  "decode.decode_pool", "decode.decode_select", "decode.decode_emit",
                                  "token_confidence", "route_tokens", "route_rows", "gather_rows", "scatter_rows",
                                  "hidden_confidence", "lt_matmul", "lt_matmul_into",
                                  "early_exit.compact_attention", "early_exit.confidence"}
    assert status["ops"]["tinynet.causal_attention"] in ("torch", "triton")
    assert status["ops"]["decode.decode_attention"] == ("triton" if status["device"].startswith("cuda") else "torch")
    assert status["ops"]["early_exit.compact_attention"].startswith(
        "triton" if status["device"].startswith("cuda") else "torch")
    if not status["device"].startswith("cuda"):
        assert status["decode_launch"] == "plain"
    assert main(["doctor"]) == 0
    assert "token_confidence" in capsys.readouterr().out


def test_default_corpus_is_built_in_and_stable():
    text = default_corpus()
    assert len(text) > 100_000 and text == default_corpus()
    assert "Command-line parsing library" in text  # argparse's module docstring


def test_demo_loss_falls(capsys):
    result = run_demo(seconds=300, seq_len=32, batch_size=8, max_steps=60)  # steps, not time: load-proof
    losses = [e["val_loss"] for e in result["history"] if "val_loss" in e]
    assert result["step"] == 60 and losses[-1] < 4.5 < losses[0]  # below uniform over 259 bytes (5.56)
    assert "sample:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on the built-in corpus (no --data) through the CLI."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--max-steps", "3", "--max-samples", "64", "--eval-every", "2", "--eval-batches", "1",
                 "--out", str(out), "--summary", str(out / "summary.json"), *TINY]) == 0
    return out


def test_train_writes_checkpoint_metrics_curve_summary(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["step"] == 3 and summary["config"]["d_model"] == 32 and summary["config"]["eos_token_id"] == 2
    assert summary["val_nats_per_char"] == pytest.approx(summary["val_loss"] / summary["val_chars_per_token"])
    assert (trained / "curve.png").read_bytes()[:4] == b"\x89PNG"
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 3]  # evaluations at 0, 2 and the end (log_every 10 > 3 steps)
    assert trm_fast.read_checkpoint(trained / "checkpoint.pt")["step"] == 3


def test_generate_plain_stream_and_batch_agree(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoint.pt")
    greedy = ["--checkpoint", ckpt, "--max-new-tokens", "12", "--top-k", "1", "--no-halting"]
    assert main(["generate", "--prompt", "The ", *greedy]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--prompt", "The ", "--stream", *greedy]) == 0
    assert capsys.readouterr().out == plain
    model = trm_fast.load_checkpoint(ckpt, use_ema=True)
    ids = model.generate(ByteTokenizer().encode("The ", add_eos=False), 12, top_k=1, q_threshold=None)
    assert plain == ByteTokenizer().decode(ids) + "\n"
    (tmp_path / "prompts.txt").write_text("The \nA longer prompt\n", encoding="utf-8")
    assert main(["generate", "--prompts-file", str(tmp_path / "prompts.txt"), *greedy]) == 0
    assert capsys.readouterr().out.split("\n---\n")[0] + "\n" == plain


def test_eval_and_count_params(trained, tmp_path, capsys):
    data = tmp_path / "d.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write(json.dumps({"text": "Return the first item."}) + "\n")
    assert main(["eval", "--checkpoint", str(trained / "checkpoint.pt"), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len("Return the first item.")  # bytes + eos, shifted by one
    assert result["ppl"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-4)
    assert main(["count-params", "--checkpoint", str(trained / "checkpoint.pt"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    model = trm_fast.load_checkpoint(trained / "checkpoint.pt")
    assert counts == {"total": sum(p.numel() for p in model.parameters()), "trainable": counts["total"], "frozen": 0}
    assert main(["count-params", "--preset", "base"]) == 0
    assert "total: 12.92M (12,919,809)" in capsys.readouterr().out


def test_format_count():
    assert [format_count(n) for n in (999, 1234, 1_234_567, 2_500_000_000)] == ["999", "1.23K", "1.23M", "2.50B"]


def test_train_spm_and_extract_texts(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wt") as f:
        for text in default_corpus()[:40_000].split("\n\n"):
            f.write(json.dumps({"text": text}) + "\n")
    assert main(["extract-texts", "--input-dir", str(tmp_path / "in"), "--output", str(tmp_path / "t.txt")]) == 0
    assert main(["train-spm", "--input", str(tmp_path / "t.txt"), "--model-prefix", str(tmp_path / "spm"),
                 "--vocab-size", "260"]) == 0
    assert (tmp_path / "spm.model").is_file() and (tmp_path / "spm.vocab").is_file()
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "in" / "a.jsonl.gz"), "--tokenizer", str(tmp_path / "spm.model"),
                 "--max-steps", "1", "--eval-every", "5", "--eval-batches", "1", "--out", str(out), *TINY]) == 0
    config = trm_fast.read_checkpoint(out / "checkpoint.pt")["config"]
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id) == (260, 1, 3)
    assert main(["generate", "--checkpoint", str(out / "checkpoint.pt"), "--prompt", "Return", "--max-new-tokens",
                 "3"]) == 0  # the tokenizer comes from the checkpoint


def _error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_error_paths(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoint.pt")
    _error(capsys, ["train", "--data", str(tmp_path / "missing.txt")], "data file(s) not found")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    _error(capsys, ["train", "--data", str(tmp_path / "bad.jsonl")], "no line is a JSON object")
    _error(capsys, ["train", "--tokenizer", "wordpiece"], "unknown tokenizer 'wordpiece'")
    _error(capsys, ["train", "--set", "d_model"], "--set expects key=value")
    _error(capsys, ["train", "--set", "colour=1", "--max-steps", "1"], "colour")
    _error(capsys, ["train", "--resume", ckpt, "--preset", "small"], "its model config differs in")
    _error(capsys, ["train", "--random-windows", "--max-steps", "1"], "--random-windows needs --pack")
    _error(capsys, ["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"], "checkpoint not found")
    _error(capsys, ["generate", "--checkpoint", ckpt, "--prompt", ""], "a prompt is empty")
    _error(capsys, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--top-p", "2"], "top_p")
    _error(capsys, ["generate", "--checkpoint", ckpt, "--prompts-file", str(tmp_path / "none.txt")],
           "prompts file not found")
    _error(capsys, ["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "bad.jsonl")], "no line is a JSON object")
    _error(capsys, ["extract-texts", "--input-dir", str(tmp_path / "nothing"), "--output", "x"], "no *.jsonl.gz")
    _error(capsys, ["train-spm", "--input", str(tmp_path / "none.txt"), "--model-prefix", "m"],
           "training text not found")
    (tmp_path / "kana.txt").write_text("".join(chr(0x3041 + i) for i in range(80)) * 3, encoding="utf-8")
    _error(capsys, ["train-spm", "--input", str(tmp_path / "kana.txt"), "--model-prefix", str(tmp_path / "m"),
                    "--vocab-size", "20"], "Vocabulary size is smaller than required_chars")
    if torch.cuda.is_available():
        return
    _error(capsys, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--device", "cuda"], "sees no CUDA device")


def test_checkpoint_tokenizer_mismatch(trained, tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    from trm_fast.data import train_spm
    (tmp_path / "t.txt").write_text(default_corpus()[:30_000], encoding="utf-8")
    model = train_spm(tmp_path / "t.txt", tmp_path / "s", vocab_size=300)
    _error(capsys, ["generate", "--checkpoint", str(trained / "checkpoint.pt"), "--tokenizer", model, "--prompt", "x"],
           "has 300 ids but the model's vocab_size is 259")
