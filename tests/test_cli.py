"""The command line, the built-in corpus and the byte tokenizer."""
import json

from trm_fast.__main__ import main
from trm_fast.corpus import default_corpus
from trm_fast.data import ByteTokenizer
from trm_fast.demo import run_demo


def test_doctor_reports_every_op(capsys):
    assert main(["doctor", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status["ops"]) == {"tinynet.concat_linear", "tinynet.causal_attention", "tinynet.add_layer_norm",
                                  "tinynet.feed_forward", "decode.decode_attention", "decode.add_layer_norm_into",
                                  "token_confidence", "route_tokens"}
    assert status["ops"]["tinynet.causal_attention"] in ("torch", "triton")
    assert status["ops"]["decode.decode_attention"] == ("triton" if status["device"].startswith("cuda") else "torch")
    assert main(["doctor"]) == 0
    assert "token_confidence" in capsys.readouterr().out


def test_default_corpus_is_built_in_and_stable():
    text = default_corpus()
    assert len(text) > 100_000 and text == default_corpus()
    assert "Command-line parsing library" in text  # argparse's module docstring


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo, 猫", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and min(ids[1:-1]) >= 3 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "héllo, 猫"


def test_demo_loss_falls(capsys):
    result = run_demo(seconds=4, seq_len=32, batch_size=8)
    losses = [loss for _, loss in result["val_loss"]]
    assert result["steps"] > 5 and losses[-1] < losses[0] - 1.0
    assert "sample:" in capsys.readouterr().out
