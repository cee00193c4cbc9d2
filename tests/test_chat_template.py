"""Chat templates give the prompt tokens ``transformers`` gives, and generation_config.json sets defaults.

The checkpoint here is a tokenizer directory laid out as a Llama-3 instruct model's: special header and
end-of-turn tokens, a post-processor that adds BOS to plain text, and a template in tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jdisagg.chat_template import DEMO_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from jdisagg.engine import Engine
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.openai.defaults import GenerationDefaults
from jdisagg.serving.openai.server import HTTPServer
from jdisagg.tokenizer import ByteTokenizer, HFTokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Written for this test in the Llama-3 instruct format: BOS once, a header per turn, content trimmed, each
# turn closed by <|eot_id|>, and an open assistant header as the generation prompt.
LLAMA3_STYLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  hello world, what is the weather?  "},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "And tomorrow? Ünïcödé too"},
]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "what is the weather", "you are terse", "sunny tomorrow"] * 20,
                            trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    directory = tmp_path_factory.mktemp("llama3_style")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_STYLE,
    }))
    return directory


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_prompt_tokens_equal_transformers_apply_chat_template(llama3_dir, add_generation_prompt):
    hf = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    expected_ids = hf(expected, add_special_tokens=False)["input_ids"]

    template = ChatTemplate.for_model(llama3_dir)
    assert template is not None
    assert template.render(MESSAGES, add_generation_prompt) == expected
    ids = template.encode(HFTokenizer.from_file(llama3_dir), MESSAGES, add_generation_prompt)
    assert ids == expected_ids
    assert ids.count(hf.convert_tokens_to_ids("<|begin_of_text|>")) == 1  # the template's BOS, no second one
    if add_generation_prompt:  # an open assistant header, then "\n\n"
        assert hf.decode(ids).endswith("assistant<|end_header_id|>\n\n")
    else:
        assert ids[-1] == hf.convert_tokens_to_ids("<|eot_id|>")


def test_override_file_keeps_the_models_special_tokens(llama3_dir, tmp_path):
    override = tmp_path / "plain.jinja"
    override.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    template = ChatTemplate.for_model(llama3_dir, override)
    assert template.render([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>hi|"
    with pytest.raises(ValueError, match="does not exist"):
        ChatTemplate.for_model(llama3_dir, tmp_path / "missing.jinja")


def test_model_without_a_template_has_none_and_the_demo_has_its_own(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.for_model(tmp_path) is None
    demo = ChatTemplate.for_model(None)
    assert demo.source == DEMO_CHAT_TEMPLATE
    ids = demo.encode(ByteTokenizer(), [{"role": "user", "content": "Hi"}])
    assert bytes(ids).decode() == "USER:\nHi\n\nASSISTANT:\n"


def test_template_errors_are_client_errors():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="user first"):
        template.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_generation_config_sets_the_defaults(tmp_path):
    assert GenerationDefaults.for_model(None) == GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9,
                                                                 "eos_token_id": [1, 2]}))
    assert GenerationDefaults.for_model(tmp_path) == GenerationDefaults(temperature=0.6, top_p=0.9, top_k=0)


def test_served_chat_prompt_is_transformers_and_generation_config_applies(llama3_dir, tmp_path):
    """A tiny random Llama with this tokenizer, served: the chat prompt the server builds is transformers'
    token for token, and generation_config.json's temperature 0 makes a request without one greedy."""
    hf = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
    )
    checkpoint = tmp_path / "tiny-llama3-instruct"
    transformers.LlamaForCausalLM(config).float().eval().save_pretrained(checkpoint, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama3_dir / name, checkpoint / name)
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": eot, "temperature": 0.0}))
    messages = MESSAGES[:2]
    expected = hf(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]

    http = HTTPServer("127.0.0.1", 0, "tiny", ChatTemplate.for_model(checkpoint),
                      GenerationDefaults.for_model(checkpoint))
    with Engine(checkpoint, prefill_mesh="1x1", decode_mesh="1x1", max_batch=2, max_context=64,
                progress=False) as engine:
        http.serve(engine)
        try:
            reply = httpx.post(f"http://127.0.0.1:{http.port}/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": messages, "max_tokens": 8, "return_token_ids": True,
            }).json()
            greedy = engine.generate([expected], SamplingParams(max_tokens=8))[0]
        finally:
            http.shutdown()
    choice = reply["choices"][0]
    assert choice["prompt_token_ids"] == expected
    assert choice["token_ids"] == greedy.token_ids and choice["message"]["content"] == greedy.text
    assert reply["usage"]["prompt_tokens"] == len(expected)
