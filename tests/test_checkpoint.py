"""Seed-format checkpoints load into the drop-in, and the drop-in's state_dict is the seed's."""
import pytest
import torch

import trm_fast
from trm_fast import reference
from parity_helpers import SMALL, make_pair, random_batch

SEED_KEYS = {
    "token_embed.weight", "pos_embed.weight", "output_head.weight", "q_head.0.weight", "q_head.0.bias",
    "q_head.1.weight", "q_head.1.bias", "tiny_net.xyz_proj.weight", "tiny_net.xyz_proj.bias",
    "tiny_net.yz_proj.weight", "tiny_net.yz_proj.bias", "tiny_net.block.attn.in_proj_weight",
    "tiny_net.block.attn.in_proj_bias", "tiny_net.block.attn.out_proj.weight", "tiny_net.block.attn.out_proj.bias",
    "tiny_net.block.ffn.0.weight", "tiny_net.block.ffn.0.bias", "tiny_net.block.ffn.2.weight",
    "tiny_net.block.ffn.2.bias", "tiny_net.block.ln1.weight", "tiny_net.block.ln1.bias",
    "tiny_net.block.ln2.weight", "tiny_net.block.ln2.bias",
}


def seed_checkpoint(path, model, step=7):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": model.config.to_dict()}, path)


def test_state_dict_keys_are_the_seeds(pair):
    ref, fast = pair
    assert set(ref.state_dict()) == SEED_KEYS
    assert set(fast.state_dict()) == SEED_KEYS
    assert fast.output_head.weight is fast.token_embed.weight


def test_untied_embeddings_keys():
    ref, fast = make_pair(tie_embeddings=False)
    assert set(fast.state_dict()) == SEED_KEYS
    assert fast.output_head.weight is not fast.token_embed.weight


def test_load_seed_checkpoint(tmp_path, pair):
    ref, _ = pair
    path = tmp_path / "seed.pt"
    seed_checkpoint(path, ref)
    loaded = trm_fast.load_checkpoint(path, kernels="torch")
    assert isinstance(loaded, trm_fast.TRMModel) and loaded.config == ref.config
    ids, targets = random_batch(2, 9, SMALL["vocab_size"], [9, 6])
    torch.testing.assert_close(loaded(ids, target_ids=targets)["loss"], ref(ids, target_ids=targets)["loss"],
                               rtol=1e-6, atol=1e-6)
    plain = trm_fast.TRMModel(trm_fast.TRMConfig.from_dict(torch.load(path)["config"]))
    plain.load_state_dict(torch.load(path)["model"])  # plain load_state_dict, strict
    assert torch.equal(plain.tiny_net.block.ffn[0].weight, ref.tiny_net.block.ffn[0].weight)


def test_round_trip_after_positional_growth(tmp_path, pair):
    _, fast = pair
    fast.generate([1, 2, 3], max_new_tokens=30, top_k=1, q_threshold=None)
    assert fast.config.max_seq_len > SMALL["max_seq_len"]
    path = tmp_path / "grown.pt"
    trm_fast.save_checkpoint(path, fast, step=3)
    checkpoint = trm_fast.read_checkpoint(path)
    assert set(checkpoint) == {"model", "optimizer", "step", "config"} and checkpoint["step"] == 3
    loaded = trm_fast.load_checkpoint(path)
    assert loaded.pos_embed.num_embeddings == fast.config.max_seq_len
    assert torch.equal(loaded.pos_embed.weight, fast.pos_embed.weight)


def test_checkpoint_errors(tmp_path, pair):
    ref, _ = pair
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        trm_fast.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['model', 'config'\]"):
        trm_fast.load_checkpoint(tmp_path / "bad.pt")
    config = ref.config.to_dict()
    torch.save({"model": ref.state_dict(), "config": {**config, "n_layers": 4}}, tmp_path / "key.pt")
    with pytest.raises(ValueError, match=r"unknown TRMConfig keys \['n_layers'\]"):
        trm_fast.load_checkpoint(tmp_path / "key.pt")
    torch.save({"model": ref.state_dict(), "config": {**config, "d_model": 64, "n_heads": 4}}, tmp_path / "mis.pt")
    with pytest.raises(ValueError, match="does not fit its config"):
        trm_fast.load_checkpoint(tmp_path / "mis.pt")


def test_config_round_trip_and_seed_dict():
    seed_dict = dict(vocab_size=100, d_model=64, n_heads=4, dropout=0.1, max_seq_len=32, latent_steps=2,
                     deep_steps=2, supervision_steps=2, act_threshold=0.95, act_weight=1.0, pad_token_id=0,
                     tie_embeddings=True)  # a seed config has no eos_token_id
    config = trm_fast.TRMConfig.from_dict(seed_dict)
    assert config.eos_token_id is None
    assert trm_fast.TRMConfig.from_dict(config.to_dict()) == config
    assert reference.TRMConfig is trm_fast.TRMConfig
