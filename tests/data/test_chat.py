"""`deepmoe data prepare --chat`: conversations rendered with the tokenizer folder's chat template (or the
default one) and the loss mask, checked token by token: the masked tokens are exactly the assistant contents
and the end-of-turn token after each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from corpora import byte_level_bpe
from deepmoe.data.prepare import prepare_dataset

# cpu_only: data preparation: tokenizers, files and numpy
pytestmark = pytest.mark.cpu_only

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_LIKE_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' %}{{ raise_exception('unknown role') }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy, briefly?"},
        {"role": "assistant", "content": "Rome, the eternal city."},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": " hi there\nfriend "}],
]


def tokenizer_folder(tmp_path, template: str | None):
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c) * 3
    tokenizer = byte_level_bpe(text, vocab_size=300)
    folder = tmp_path / "tok"
    folder.mkdir()
    if template is not None:
        tokenizer.add_special_tokens([BOS, USER, ASSISTANT, EOS])
        config = {"bos_token": BOS, "eos_token": {"content": EOS}, "chat_template": template}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_conversations(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))


def read_chat(out):
    index = json.loads((out / "index.json").read_text())
    assert index["chat"] is True
    shard = index["splits"]["train"]["shards"][0]
    ids = np.fromfile(out / shard["file"], dtype="<u2")
    mask = np.fromfile(out / shard["mask"], dtype=np.uint8)
    starts = [*np.fromfile(out / shard["index"], dtype="<i8"), len(ids)]
    assert len(mask) == len(ids) and set(np.unique(mask)) <= {0, 1}
    return [(ids[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def masked_runs(tokenizer: Tokenizer, ids, mask) -> list[str]:
    """The text of each run of consecutive masked tokens."""
    runs, current = [], []
    for token, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_a_deepseek_like_template_and_its_assistant_mask(tmp_path):
    folder = tokenizer_folder(tmp_path, DEEPSEEK_LIKE_TEMPLATE)
    write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS)
    prepare_dataset([tmp_path / "chat.jsonl"], tmp_path / "out", tokenizer=folder, chat=True, heldout_fraction=0)
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(DEEPSEEK_LIKE_TEMPLATE)
    for (ids, mask), conversation in zip(read_chat(out), CONVERSATIONS, strict=True):
        rendered = template.render(messages=conversation, bos_token=BOS, eos_token=EOS, add_generation_prompt=False)
        assert rendered.startswith(BOS) and rendered.endswith(EOS)
        assert list(ids) == tokenizer.encode(rendered, add_special_tokens=False).ids  # no EOT appended
        assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == rendered
        want = [m["content"] + EOS for m in conversation if m["role"] == "assistant"]
        assert masked_runs(tokenizer, ids, mask) == want
        for token, m in zip(ids.tolist(), mask.tolist(), strict=True):  # token by token
            if tokenizer.id_to_token(token) in (BOS, USER, ASSISTANT):
                assert m == 0
            if tokenizer.id_to_token(token) == EOS:
                assert m == 1


def test_the_default_template_without_a_tokenizer_config(tmp_path):
    folder = tokenizer_folder(tmp_path, None)
    write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS)
    prepare_dataset([tmp_path / "chat.jsonl"], tmp_path / "out", tokenizer=folder, chat=True, heldout_fraction=0)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    (ids, mask), _ = read_chat(tmp_path / "out")
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text == (
        "<|system|>\nYou are terse.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis.<|endoftext|>"
        "<|user|>\nAnd of Italy, briefly?\n<|assistant|>\nRome, the eternal city.<|endoftext|>"
    )
    assert masked_runs(tokenizer, ids, mask) == ["Paris.<|endoftext|>", "Rome, the eternal city.<|endoftext|>"]
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()


def test_chat_with_a_trained_tokenizer(tmp_path):
    write_conversations(tmp_path / "chat.jsonl", CONVERSATIONS * 5)
    report = prepare_dataset([tmp_path / "chat.jsonl"], tmp_path / "out", vocab_size=270, chat=True, workers=2)
    assert report.splits["train"]["documents"] + report.splits["heldout"]["documents"] == 10
    assert all(shard["mask"] for shard in report.splits["train"]["shards"])


BAD_CONVERSATIONS = {
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    "no assistant": ({"messages": [{"role": "user", "content": "x"}]}, "has no assistant turn"),
    "no messages": ({"text": "x"}, "has no 'messages' list"),
    "content not a string": ({"messages": [{"role": "assistant", "content": 3}]}, "has no string 'content'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_bad_conversations_name_file_and_line_or_are_skipped(tmp_path, case):
    folder = tokenizer_folder(tmp_path, DEEPSEEK_LIKE_TEMPLATE)
    record, message = BAD_CONVERSATIONS[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:2: .*{message}"):
        prepare_dataset([path], tmp_path / "out", tokenizer=folder, chat=True)
    report = prepare_dataset([path], tmp_path / "out", tokenizer=folder, chat=True, on_error="skip")
    assert report.skipped == 1 and report.sources[0].documents == 1


def test_a_template_raising_names_the_line(tmp_path):
    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
               "{{ m['content'] }}{% endfor %}"  # fmt: skip
    folder = tokenizer_folder(tmp_path, template)
    path = tmp_path / "chat.jsonl"
    write_conversations(path, CONVERSATIONS)
    with pytest.raises(ValueError, match=f"^{path}:1: cannot render the conversation: no system"):
        prepare_dataset([path], tmp_path / "out", tokenizer=folder, chat=True)
