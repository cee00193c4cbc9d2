"""Loading and saving weights: sharded safetensors onto a mesh, bf16, orbax round trips, HF export."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from jdisagg.models import (
    Llama,
    ModelConfig,
    init_model,
    load_hf_model,
    restore_checkpoint,
    save_checkpoint,
    save_hf_safetensors,
)
from jdisagg.models.demo import DEMO_CONFIG, load_demo_model

TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
    tie_word_embeddings=False, attention_bias=False, eos_token_ids=(2,),
)


def _params(model: Llama) -> dict[str, np.ndarray]:
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in state}


def _inputs(vocab: int, length: int = 10) -> tuple[jax.Array, jax.Array]:
    tokens = np.random.default_rng(0).integers(0, vocab, (2, length), dtype=np.int32)
    return jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))


def _tp2_shardings():
    """Column-split q_proj and row-split o_proj over 2 devices; everything else replicated on both."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

    def sharding(path: str, shape: tuple[int, ...]) -> NamedSharding:
        if path.endswith("q_proj/kernel"):
            return NamedSharding(mesh, PartitionSpec(None, "tp"))
        if path.endswith("o_proj/kernel"):
            return NamedSharding(mesh, PartitionSpec("tp", None))
        return NamedSharding(mesh, PartitionSpec())

    return sharding


@pytest.fixture(scope="module")
def sharded_hf_dir(tmp_path_factory):
    """A tiny HF Llama saved as an index + several safetensors shards."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    directory = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    return directory, model


def test_index_sharded_checkpoint_loads_onto_a_mesh(sharded_hf_dir):
    directory, hf_model = sharded_hf_dir
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    model = load_hf_model(directory, shardings=_tp2_shardings(), progress=False)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec(None, "tp")
    assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}

    tokens, positions = _inputs(64)
    with torch.no_grad():
        expected = hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens, positions)), expected, atol=1e-4, rtol=0)
    unsharded = load_hf_model(directory, progress=False)
    np.testing.assert_allclose(np.asarray(model(tokens, positions)),
                               np.asarray(unsharded(tokens, positions)), atol=1e-5, rtol=0)


def test_bfloat16_checkpoint(sharded_hf_dir, tmp_path):
    _, hf_model = sharded_hf_dir
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    expected = hf_model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).float().numpy()

    model = load_hf_model(tmp_path, progress=False)
    assert model.config.dtype == "bfloat16"
    kernel = model.layers[1].mlp.down_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected.T)
    logits = model(*_inputs(64))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())

    widened = load_hf_model(tmp_path, param_dtype=jnp.float32, progress=False)
    assert widened.config.dtype == "float32"
    np.testing.assert_array_equal(np.asarray(widened.layers[1].mlp.down_proj.kernel[...]), expected.T)


def test_missing_and_unexpected_tensors_are_named(sharded_hf_dir, tmp_path):
    directory, hf_model = sharded_hf_dir
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight") as err:
        load_hf_model(tmp_path, progress=False)
    assert "unexpected tensors model.layers.1.mlp.extra.weight" in str(err.value)


def test_orbax_round_trip(tmp_path):
    model = init_model(TINY, seed=3)
    save_checkpoint(model, tmp_path / "ckpt")
    assert ModelConfig.from_hf(tmp_path / "ckpt") == TINY
    restored = restore_checkpoint(tmp_path / "ckpt", shardings=_tp2_shardings())
    assert restored.config == TINY
    assert restored.layers[0].self_attn.q_proj.kernel[...].sharding.spec == PartitionSpec(None, "tp")
    expected = _params(model)
    assert _params(restored).keys() == expected.keys()
    for name, value in _params(restored).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_hf_safetensors_round_trip_and_transformers_reads_it(tmp_path):
    config = dataclasses.replace(TINY, tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
    model = init_model(config, seed=4)
    save_hf_safetensors(model, tmp_path)
    loaded = load_hf_model(tmp_path, progress=False)
    assert loaded.config == config and loaded.lm_head is None
    expected = _params(model)
    for name, value in _params(loaded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens, positions = _inputs(config.vocab_size)
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens, positions)), hf_logits, atol=1e-4, rtol=0)


def test_save_hf_safetensors_keeps_bfloat16(tmp_path):
    model = init_model(dataclasses.replace(TINY, dtype="bfloat16"), seed=5)
    save_hf_safetensors(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["lm_head.weight"].dtype == ml_dtypes.bfloat16
    reloaded = load_hf_model(tmp_path, progress=False)
    np.testing.assert_array_equal(_params(reloaded)["lm_head/kernel"], _params(model)["lm_head/kernel"])


def test_init_model_is_seeded_and_layout_independent():
    plain = init_model(TINY, seed=7)
    sharded = init_model(TINY, seed=7, shardings=_tp2_shardings())
    for name, value in _params(sharded).items():
        np.testing.assert_array_equal(value, _params(plain)[name], err_msg=name)
    other = init_model(TINY, seed=8)
    assert not np.array_equal(_params(other)["lm_head/kernel"], _params(plain)["lm_head/kernel"])
    # Logits spread enough that greedy picks are clear, not near-ties.
    top2 = jnp.sort(plain(*_inputs(TINY.vocab_size)), axis=-1)[..., -2:]
    assert float(jnp.median(top2[..., 1] - top2[..., 0])) > 1e-2


def test_demo_model():
    model = load_demo_model()
    assert model.config == DEMO_CONFIG
    assert model.layers[0].self_attn.k_proj.kernel[...].shape == (256, 4 * 32)
    logits = model(*_inputs(256, length=4))
    assert logits.shape == (2, 4, 256)
