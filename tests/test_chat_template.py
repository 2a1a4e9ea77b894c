"""Chat templates: the built-ins render the formats they name, any template renders as
transformers' ``apply_chat_template`` does (same text), the sandbox holds, errors are one line,
the template travels with the tokenizer, and ``encode_chat`` marks exactly the assistant turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.chat_template import BUILTIN_TEMPLATES, ChatTemplate, chat_prompt, encode_chat
from lmforge.errors import LMForgeError
from lmforge.tokenizers import Tokenizer

TEXTS = ["Hello there, how are you today?", "I am fine, thank you. 你好 🤗", "print('hi')"] * 30
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour, 你好?"},
    {"role": "assistant", "content": "Blue 🤗"},
]
# A template with what real ones use: namespace, loop controls, tojson, raise_exception, strip.
RICH = (
    "{%- set ns = namespace(count=0) -%}"
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif -%}"
    "{%- if m.role == 'system' %}{% continue %}{% endif -%}"
    "{%- set ns.count = ns.count + 1 -%}"
    "[{{ ns.count }}] {{ m.role | upper }}: {{ m.content | trim }} {{ {'n': m.content | length} | tojson }}\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}[{{ ns.count + 1 }}] ASSISTANT:{% endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.train(iter(TEXTS), kind="bpe", vocab_size=300, show_progress=False)
    tok.backend.add_special_tokens(SPECIALS)
    return Tokenizer(tok.backend, {"bos": "<s>", "eos": "</s>", "pad": "[PAD]"})


def test_builtins_render_their_formats(tokenizer: Tokenizer) -> None:
    two = CONVERSATION[:3]
    chatml = tokenizer.apply_chat_template(two, template="chatml", add_generation_prompt=False)
    assert chatml == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    llama2 = tokenizer.apply_chat_template(CONVERSATION, template="llama-2")
    assert llama2 == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
        "<s>[INST] Name a colour, 你好? [/INST] Blue 🤗 </s>"
    )
    plain = tokenizer.apply_chat_template(two[1:2], template="plain", add_generation_prompt=True)
    assert plain == "User: Hi!\n\nAssistant:"
    with pytest.raises(LMForgeError, match="alternate user and assistant"):
        tokenizer.apply_chat_template(CONVERSATION[1:2] * 2, template="llama-2")
    with pytest.raises(LMForgeError, match="unknown chat template 'chatmel'.*chatml, llama-2, plain"):
        tokenizer.apply_chat_template(two, template="chatmel")


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "rich"])
def test_same_text_as_transformers(tokenizer: Tokenizer, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    source = RICH if name == "rich" else BUILTIN_TEMPLATES[name]
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )
    conversations = [CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:4]]
    for messages in conversations:
        for prompt in (False, True):
            expected = theirs.apply_chat_template(
                messages, chat_template=source, tokenize=False, add_generation_prompt=prompt
            )
            got = tokenizer.apply_chat_template(messages, template=source, add_generation_prompt=prompt)
            assert got == expected


def test_errors_are_one_line_and_the_sandbox_holds(tokenizer: Tokenizer) -> None:
    with pytest.raises(LMForgeError, match="bad role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], template=RICH)
    with pytest.raises(LMForgeError, match="invalid Jinja"):
        ChatTemplate("{% for m in messages %}")
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LMForgeError):
        tokenizer.apply_chat_template(CONVERSATION, template=escape)
    with pytest.raises(LMForgeError, match="message 1 has no 'role'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}], template="chatml")
    with pytest.raises(LMForgeError, match="has no chat template"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_template_travels_with_the_tokenizer(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tok = Tokenizer(tokenizer.backend, tokenizer.special_tokens, chat_template=RICH)
    tok.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["chat_template"] == RICH
    assert Tokenizer.from_file(tmp_path / "a").chat_template == RICH
    (tmp_path / "a" / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["chatml"])  # newer transformers
    assert Tokenizer.from_file(tmp_path / "a").chat_template == BUILTIN_TEMPLATES["chatml"]
    config = tmp_path / "a" / "tokenizer_config.json"  # a list of named templates
    (tmp_path / "a" / "chat_template.jinja").unlink()
    data = json.loads(config.read_text())
    data["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": RICH}]
    config.write_text(json.dumps(data))
    assert Tokenizer.from_file(tmp_path / "a").chat_template == RICH


@pytest.mark.parametrize("name", ["chatml", "llama-2", "plain", "generation-tags"])
def test_encode_chat_marks_the_assistant_turns(tokenizer: Tokenizer, name: str) -> None:
    source = BUILTIN_TEMPLATES.get(name) or (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content + eos_token }}"
        "{% endgeneration %}{% else %}{{ '<|im_start|>' + m.content + '\\n' }}{% endif %}{% endfor %}"
    )
    messages = CONVERSATION if name != "generation-tags" else CONVERSATION[1:]
    encoding = encode_chat(tokenizer, messages, template=source)
    assert encoding.ids == tokenizer.encode(encoding.text)
    assert len(encoding.assistant_mask) == len(encoding.ids)
    answer = [i for i, keep in zip(encoding.ids, encoding.assistant_mask, strict=True) if keep]
    text = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Hello." in text and "Blue 🤗" in text
    assert "Hi!" not in text and "terse" not in text and "colour" not in text
    prompt_only = [i for i, keep in zip(encoding.ids, encoding.assistant_mask, strict=True) if not keep]
    assert "Hello." not in tokenizer.decode(prompt_only)
    if name == "chatml":  # the turn's end marker is learned too (the model must learn to stop)
        assert answer.count(tokenizer.token_to_id("<|im_end|>")) == 2


def test_encode_chat_refuses_templates_that_rewrite_past_turns(tokenizer: Tokenizer) -> None:
    shifting = "{% for m in messages %}{{ m.content ~ (messages | length) }}{% endfor %}"
    with pytest.raises(LMForgeError, match="cannot be told apart"):
        encode_chat(tokenizer, CONVERSATION, template=shifting)


def test_chat_prompt_stops_at_end_of_turn(tokenizer: Tokenizer) -> None:
    ids, stop = chat_prompt(tokenizer, "Hi!", system="Be brief.", template="chatml")
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert stop == [tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")]
