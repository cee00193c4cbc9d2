"""The Llama-family model: logits parity with transformers; prefill + decode agree with the dense forward.

Inputs are 64 tokens, four times the sliding window of the Mistral and Qwen2 configs, so windowed attention
is exercised in prefill and in decode (Qwen2 windows only its second layer, from ``max_window_layers=1``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jdisagg.meshes import PHASE_RULES, TP_AXIS, param_sharding_fn
from jdisagg.models import Llama, ModelConfig, init_model, load_hf_model, save_hf_safetensors
from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.models.fused import fuse_projections
from jdisagg.models.llama import UNFUSED, Fused

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

HF_CONFIGS = {
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama-linear-rope": lambda: transformers.LlamaConfig(
        **TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen2-window": lambda: transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
WINDOW = 16
LENGTH = 64  # tokens per test input: past the window


def _hf_checkpoint(name: str, directory) -> transformers.PreTrainedModel:
    """A tiny random float32 HF model saved as safetensors; params jittered so no bias or norm is trivial."""
    torch.manual_seed(0)
    config = HF_CONFIGS[name]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return jnp.asarray(tokens), jnp.asarray(positions)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = _hf_checkpoint(request.param, directory)
    return hf_model, load_hf_model(directory, progress=False)


def _hf_logits(hf_model, tokens: jax.Array) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_logits_match_transformers(hf_pair):
    hf_model, model = hf_pair
    tokens, positions = _tokens(2, LENGTH, model.config.vocab_size)
    expected = _hf_logits(hf_model, tokens)
    actual = np.asarray(model(tokens, positions))
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def _dense_attend(positions: jax.Array):
    """A reference ``attend``: cache = dense (k, v) ``[B, S, KVH, hd]``, written at ``positions``."""

    def attend(q, k, v, cache, window=None):
        k_cache, v_cache = cache
        rows = jnp.arange(q.shape[0])
        k_cache = k_cache.at[rows, positions].set(k)
        v_cache = v_cache.at[rows, positions].set(v)
        groups = q.shape[1] // k.shape[1]
        keys, values = jnp.repeat(k_cache, groups, axis=2), jnp.repeat(v_cache, groups, axis=2)
        scores = jnp.einsum("bhd,bshd->bhs", q, keys) * q.shape[-1] ** -0.5
        past = positions[:, None] - jnp.arange(k_cache.shape[1])[None, :]
        visible = (past >= 0) & (past < (window or k_cache.shape[1]))
        scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
        return jnp.einsum("bhs,bshd->bhd", jax.nn.softmax(scores, axis=-1), values), (k_cache, v_cache)

    return attend


@jax.jit
def _decode_step(graphdef, state, tokens, positions, caches):
    model = nnx.merge(graphdef, state)
    return model.decode(tokens, positions, caches, _dense_attend(positions))


def test_prefill_then_decode_matches_dense_forward(hf_pair):
    """Prefill a prompt, decode the rest one token at a time: same logits as one causal forward and as
    transformers (for the sliding-window configs: the decode steps run past the window)."""
    hf_model, model = hf_pair
    batch, prompt, total = 2, 5, LENGTH
    tokens, positions = _tokens(batch, total, model.config.vocab_size, seed=1)
    dense = np.asarray(model(tokens, positions))
    np.testing.assert_allclose(dense, _hf_logits(hf_model, tokens), atol=1e-4, rtol=0)

    hidden, kvs = model.prefill(tokens[:, :prompt], positions[:, :prompt])
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), dense[:, :prompt], atol=1e-5, rtol=0)
    pad = ((0, 0), (0, total - prompt), (0, 0), (0, 0))
    caches = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in kvs]
    graphdef, state = nnx.split(model)
    for t in range(prompt, total):
        logits, caches = _decode_step(graphdef, state, tokens[:, t], positions[:, t], caches)
        assert logits.shape == (batch, model.config.vocab_size) and logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits), dense[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "tp"), [("qwen2", 2), ("llama3-rope", 4), ("mistral", 1)])
def test_fused_projections_serve_the_same_model_in_every_sharding(name, tp, tmp_path):
    """q/k/v and gate/up fused after a sharded load: the kv-head-grouped layout keeps each device's heads
    (TP2 splits the 2 kv heads, with Qwen2's biases), TP4 replicates the kv heads so q/k/v stay separate;
    logits equal transformers' and the separate model's through prefill and decode (past Mistral's
    window), and the model saves back to the checkpoint's exact tensors."""
    hf_model = _hf_checkpoint(name, tmp_path / "ckpt")
    separate = load_hf_model(tmp_path / "ckpt", progress=False)
    config = separate.config
    mesh = Mesh(np.array(jax.devices()[:tp]), (TP_AXIS,))
    heads = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads}
    model = fuse_projections(load_hf_model(tmp_path / "ckpt", shardings=param_sharding_fn(
        mesh, PHASE_RULES["decode"], heads), progress=False), release=True)
    assert model.fused == Fused(qkv=tp <= config.num_kv_heads, gate_up=True)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert mlp.gate_up_proj.kernel[...].shape == (config.hidden_size, 2, config.intermediate_size)
    if model.fused.qkv:
        group = config.num_heads // config.num_kv_heads
        kernel = attn.qkv_proj.kernel[...]
        assert kernel.shape == (config.hidden_size, config.num_kv_heads, group + 2, config.head_dim)
        if tp > 1:
            assert kernel.sharding.spec == PartitionSpec(None, TP_AXIS)
            assert kernel.addressable_shards[0].data.shape[1] == config.num_kv_heads // tp
        assert (attn.qkv_proj.bias is not None) == config.attention_bias
    else:
        assert attn.q_proj.kernel[...].sharding.spec == PartitionSpec(None, TP_AXIS)

    batch, prompt, total = 2, 5, LENGTH
    tokens, positions = _tokens(batch, total, config.vocab_size, seed=1)
    dense = np.asarray(model(tokens, positions))
    np.testing.assert_allclose(dense, _hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
    np.testing.assert_allclose(dense, np.asarray(separate(tokens, positions)), atol=1e-5, rtol=0)
    _, kvs = model.prefill(tokens[:, :prompt], positions[:, :prompt])
    pad = ((0, 0), (0, total - prompt), (0, 0), (0, 0))
    caches = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in kvs]
    graphdef, state = nnx.split(model)
    for t in range(prompt, total):
        logits, caches = _decode_step(graphdef, state, tokens[:, t], positions[:, t], caches)
        np.testing.assert_allclose(np.asarray(logits), dense[:, t], atol=1e-5, rtol=0)

    save_hf_safetensors(model, tmp_path / "saved")
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(load_hf_model(tmp_path / "saved",
                                                                                progress=False), nnx.Param)),
                                      nnx.to_flat_state(nnx.state(separate, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]), err_msg=str(path))


def test_decode_step_asks_for_each_weight_once():
    """``tools/inspect_hlo.py`` over the engine's decode program (bfloat16, lowered from shapes): 4 weight
    matmuls per layer fused, 7 separate, plus the LM head; no weight-sized convert, transpose, copy or
    gather in what our code asks XLA for, and every weight read as ``[in, out]``."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import inspect_hlo

    config = dataclasses.replace(DEMO_CONFIG, num_layers=2, dtype="bfloat16")
    mesh = Mesh(np.array(jax.devices()[:1]), (TP_AXIS,))
    for fused, matmuls in ((inspect_hlo.FUSED, 4), (UNFUSED, 7)):
        programs = inspect_hlo.programs(config, fused, batch=1, context=32, mesh=mesh)
        fn, args = next(v for k, v in programs.items() if k.startswith("engine decode"))
        params = jax.tree.leaves(args[0])
        report, _ = inspect_hlo.analyse(
            "decode", str(fused), fn.lower(*args), num_layers=config.num_layers,
            weight_size=min(x.size for x in params if len(x.shape) >= 2),
            param_bytes=sum(x.size * x.dtype.itemsize for x in params),
            kv_shapes={tuple(x.shape) for x in jax.tree.leaves(args[1])},
        )
        assert report.weight_matmuls_per_layer == matmuls + 1 / config.num_layers, report
        assert report.materialized_before == {} and report.weights_read_out_in == 0, report


def test_prefill_padding_at_row_end_does_not_change_real_tokens():
    config = dataclasses.replace(DEMO_CONFIG, num_layers=2, hidden_size=64, intermediate_size=128, head_dim=8)
    graphdef, state = nnx.split(init_model(config, seed=0))
    prefill = jax.jit(lambda state, t, p: nnx.merge(graphdef, state).prefill(t, p))
    tokens, positions = _tokens(1, 16, config.vocab_size, seed=2)
    hidden, kvs = prefill(state, tokens[:, :9], positions[:, :9])
    padded_hidden, padded_kvs = prefill(state, tokens, positions)
    np.testing.assert_allclose(np.asarray(padded_hidden[:, :9]), np.asarray(hidden), atol=1e-5)
    for (k, v), (pk, pv) in zip(kvs, padded_kvs, strict=True):
        assert pk.shape == (1, 16, config.num_kv_heads, config.head_dim)
        np.testing.assert_allclose(np.asarray(pk[:, :9]), np.asarray(k), atol=1e-5)
        np.testing.assert_allclose(np.asarray(pv[:, :9]), np.asarray(v), atol=1e-5)


def test_param_paths_match_sharding_rules():
    model = nnx.eval_shape(lambda: Llama(DEMO_CONFIG, rngs=nnx.Rngs(0)))
    paths = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    d, hd = DEMO_CONFIG.hidden_size, DEMO_CONFIG.head_dim
    assert paths["embed_tokens/embedding"] == (DEMO_CONFIG.vocab_size, d)
    assert paths["layers/0/self_attn/q_proj/kernel"] == (d, DEMO_CONFIG.num_heads * hd)
    assert paths["layers/3/self_attn/k_proj/kernel"] == (d, DEMO_CONFIG.num_kv_heads * hd)
    assert paths["layers/0/mlp/down_proj/kernel"] == (DEMO_CONFIG.intermediate_size, d)
    assert paths["layers/0/input_layernorm/scale"] == (d,)
    assert paths["lm_head/kernel"] == (d, DEMO_CONFIG.vocab_size)
    assert not any(p.endswith("bias") for p in paths)


def test_config_round_trips_through_transformers():
    config = ModelConfig.from_hf(HF_CONFIGS["llama3-rope"]().to_dict())
    assert config.rope_scaling["rope_type"] == "llama3" and config.head_dim == 16
    hf = transformers.LlamaConfig(**config.to_hf_dict())
    assert ModelConfig.from_hf(hf.to_dict()) == config
    qwen = ModelConfig.from_hf(HF_CONFIGS["qwen2"]().to_dict())
    assert qwen.attention_bias and qwen.tie_word_embeddings
    assert ModelConfig.from_hf(transformers.Qwen2Config(**qwen.to_hf_dict()).to_dict()) == qwen
    mistral = ModelConfig.from_hf(HF_CONFIGS["mistral"]().to_dict())
    assert mistral.sliding_window == WINDOW and mistral.sliding_window_layers is None
    assert [mistral.attention_window(i) for i in range(2)] == [WINDOW, WINDOW]
    assert ModelConfig.from_hf(transformers.MistralConfig(**mistral.to_hf_dict()).to_dict()) == mistral


def test_qwen2_windows_only_the_layers_transformers_windows():
    windowed = ModelConfig.from_hf(HF_CONFIGS["qwen2-window"]().to_dict())
    assert [windowed.attention_window(i) for i in range(2)] == [None, WINDOW]
    assert ModelConfig.from_hf(transformers.Qwen2Config(**windowed.to_hf_dict()).to_dict()) == windowed
    four_x = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 4, "num_attention_heads": 2, "sliding_window": 8, "max_window_layers": 1}
    assert ModelConfig.from_hf(four_x | {"use_sliding_window": True}).sliding_window_layers == (1, 2, 3)
    assert ModelConfig.from_hf(four_x).sliding_window is None  # use_sliding_window defaults to False
    assert ModelConfig.from_hf(HF_CONFIGS["qwen2"]().to_dict()).sliding_window is None


def test_config_reads_transformers_4_layout():
    config = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [1, 2], "torch_dtype": "bfloat16",
    })
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert config.num_kv_heads == 2 and config.head_dim == 4
    assert config.eos_token_ids == (1, 2) and config.dtype == "bfloat16"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_rejects_unsupported(change, message):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(base | change)
