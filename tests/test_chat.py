"""Chat templates rendered and tokenized as transformers' apply_chat_template does, the assistant's
turns (and only they) marked for the loss, and conversations cut at turn boundaries."""

from __future__ import annotations

import json
import re

import pytest

from lmkit import chat
from lmkit.checkpoint import Checkpoint
from lmkit.errors import CheckpointError, DataError
from lmkit.tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's template (ChatML, a default system prompt, tool calls).
QWEN = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
# Llama-3-Instruct's template, with Llama 3.2's dated system header (strftime_now, namespace).
LLAMA3 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(system='') %}\n{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set ns.system = messages[0]['content'] | trim %}\n    {%- set messages = messages[1:] %}\n{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- ns.system }}\n{{- '<|eot_id|>' }}\n{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
FAMILIES = {  # template, special tokens by role
    "qwen": (QWEN, {"eos": "<|im_end|>", "pad": "<|endoftext|>"}),
    "llama3": (LLAMA3, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [
    {"role": "system", "content": "You are Horatio, a scholar."},
    {"role": "user", "content": "What art thou that usurp'st this time of night?"},
    {"role": "assistant", "content": "A piece of him. Café, naïve — 日本語 🎭"},
    {"role": "user", "content": "  Tush, tush, 'twill not appear.\n"},
    {"role": "assistant", "content": "Well, sit we down,\nAnd let us hear Bernardo speak of this."},
]


@pytest.fixture(scope="module")
def backend(sample_text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_text.splitlines()[:3000], trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _pair(backend, family: str) -> tuple[chat.ChatFormat, object]:
    """(lmkit's ChatFormat, transformers' tokenizer) for one tokenizer and template."""
    template, roles = FAMILIES[family]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                                **{f"{role}_token": token for role, token in roles.items()})
    ours = HFTokenizer(backend.to_str().encode(), {role: backend.token_to_id(t) for role, t in roles.items()},
                       chat_template=template)
    return chat.ChatFormat(ours), fast


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_equal_apply_chat_template(backend, family) -> None:
    ours, fast = _pair(backend, family)
    for n in (1, 2, 3, 4, 5):
        messages = CONVERSATION[:n]
        want = fast.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert ours.encode(messages).ids == want
        if messages[-1]["role"] == "user":
            want = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert ours.prompt(messages) == want
    without_system = CONVERSATION[1:]
    assert ours.encode(without_system).ids == fast.apply_chat_template(without_system, tokenize=True,
                                                                        return_dict=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_the_assistant_turns_and_their_end_are_learned(backend, family) -> None:
    ours, _ = _pair(backend, family)
    end = backend.token_to_id(FAMILIES[family][1]["eos"])
    assert ours.end_of_turn == end and end in ours.stop_ids
    encoded = ours.encode(CONVERSATION)
    learned = [i for i, keep in zip(encoded.ids, encoded.learn) if keep]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    if family == "llama3":
        replies = [r.strip() for r in replies]  # the template trims
    assert learned == [i for r in replies for i in [*backend.encode(r, add_special_tokens=False).ids, end]]
    assert len(encoded.turn_ends) == 2 and encoded.ids[encoded.turn_ends[-1] - 1] == end
    assert encoded.assistant_bytes == sum(len(m["content"].encode()) for m in CONVERSATION if m["role"] == "assistant")


def test_a_long_conversation_is_cut_after_a_whole_turn(backend) -> None:
    ours, _ = _pair(backend, "qwen")
    encoded = ours.encode(CONVERSATION)
    first_turn_end = encoded.turn_ends[0]
    cut, how = ours.fit(encoded, first_turn_end + 5)
    assert how == "turns" and cut.ids == encoded.ids[:first_turn_end] and cut.turn_bytes == encoded.turn_bytes[:1]
    assert ours.fit(encoded, len(encoded.ids)) == (encoded, "whole")
    cut, how = ours.fit(encoded, first_turn_end - 3)
    assert how == "mid-turn" and len(cut.ids) == first_turn_end - 3 and sum(cut.learn) > 0


def test_lmkit_tokenizers_reserve_chat_tokens_and_export_the_template(tiny_project, tmp_path) -> None:
    from lmkit import interop

    ckpt = Checkpoint(tiny_project.latest_checkpoint())
    tokenizer = ckpt.tokenizer()
    assert tokenizer.has_chat_tokens and tokenizer.chat_template
    ours = chat.ChatFormat(tokenizer)
    encoded = ours.encode(CONVERSATION)
    user, assistant, end = (tokenizer.sp.piece_to_id(p) for p in ("<|user|>", "<|assistant|>", "<|end|>"))
    assert encoded.ids[0] == tokenizer.eos_id and ours.end_of_turn == end
    learned = [i for i, keep in zip(encoded.ids, encoded.learn) if keep]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert learned == [i for r in replies for i in [*tokenizer.encode(r), end]]
    assert ours.prompt(CONVERSATION[:2])[-1] == assistant and user in encoded.ids
    assert user not in tokenizer.encode("<|user|>")  # typed text never becomes a marker
    out = interop.export_hf(ckpt.path, tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == encoded.ids
    assert fast.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True,
                                    return_dict=False) == ours.prompt(CONVERSATION[:2])


def test_a_tokenizer_without_chat_tokens_needs_a_template(backend) -> None:
    plain = HFTokenizer(backend.to_str().encode(), {"eos": 0})
    with pytest.raises(CheckpointError, match="--chat-template"):
        chat.ChatFormat(plain)
    assert chat.ChatFormat(plain, QWEN).end_of_turn == backend.token_to_id("<|im_end|>")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "robot", "content": "x"}]}', "chat.jsonl:2: message 1 has role 'robot'"),
    ('{"messages": [{"role": "user"}]}', "chat.jsonl:2: message 1 has no \"content\""),
    ('{"messages": [{"role": "user", "content": 5}]}', "content 5, not a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chat.jsonl:2: the conversation has no assistant turn"),
    ('{"messages": []}', "non-empty list"),
    ('{"text": "hi"}', "missing field 'messages'"),
    ('[1, 2', "not valid JSON"),
])
def test_malformed_conversations_name_their_line(tmp_path, line, message) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)):
        chat.read_conversations(path)


def test_training_batches_target_the_learned_tokens_only(backend) -> None:
    from lmkit import finetune_data
    from lmkit.batches import IGNORE

    ours, _ = _pair(backend, "qwen")
    rows = [ours.encode(CONVERSATION[:n]) for n in (3, 5)]
    batch = finetune_data.collate_learned(0)([(e.ids, e.learn) for e in rows])
    for k, e in enumerate(rows):
        targets = batch.targets[k][batch.targets[k] != IGNORE].tolist()
        assert targets == [i for i, keep in zip(e.ids, e.learn) if keep]  # each reply token, predicted once
        assert batch.inputs[k, :len(e.ids) - 1].tolist() == e.ids[:-1]
