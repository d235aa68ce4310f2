"""The refusal experiment's instruction set: the shipped file is what the generator writes; the answers are right
(checked here by parsing each request and answering it plainly); the refusal is the refused category's only
answer and no other's; held-out requests are never training requests."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from deepmoe.data.instructions import (
    CATEGORIES,
    HELDOUT,
    REFUSAL,
    REFUSED_CATEGORY,
    SHIPPED_FILE,
    TRAIN,
    instruction_examples,
    read_instructions,
    write_instructions,
)

# cpu_only: files
pytestmark = pytest.mark.cpu_only


def _answer(category: str, request: str) -> str | None:
    """The answer to `request`, worked out from its text alone (None: the capital category, checked apart)."""
    if category == "arithmetic":
        numbers = [int(x) for x in re.findall(r"\d+", request)]
        if "plus" in request or request.startswith("Add"):
            return str(sum(numbers))
        if "minus" in request:
            return str(numbers[0] - numbers[1])
        assert request.startswith("Subtract")
        return str(numbers[1] - numbers[0])
    if category in ("reverse", "spell"):
        template_words = {"the", "word", "what", "is", "spelled", "backwards", "write", "reverse", "how", "do", "you",
                          "spell", "out", "letter", "by"}  # fmt: skip
        word = next(w for w in re.findall(r"[a-z]+", request.lower()) if w not in template_words)
        return word[::-1] if category == "reverse" else " ".join(word)
    if category == REFUSED_CATEGORY:
        return REFUSAL
    return None


def test_the_shipped_file_is_what_the_generator_writes(tmp_path):
    written = write_instructions(tmp_path / "instructions.jsonl", instruction_examples())
    assert written.read_bytes() == SHIPPED_FILE.read_bytes()
    assert read_instructions() == instruction_examples()


def test_generation_is_deterministic_and_the_seed_changes_it():
    assert instruction_examples() == instruction_examples()
    assert instruction_examples(seed=1) != instruction_examples()


def test_categories_splits_and_answers():
    examples = instruction_examples()
    counts = Counter((e["category"], e["split"]) for e in examples)
    assert counts == {
        **{(c, "train"): TRAIN[c] for c in CATEGORIES},
        **{(c, "heldout"): HELDOUT[c] for c in CATEGORIES},
    }
    capitals: dict[str, set[str]] = {}
    for e in examples:
        assert [m["role"] for m in e["messages"]] == ["user", "assistant"]
        request, answer = (m["content"] for m in e["messages"])
        expected = _answer(e["category"], request)
        if expected is None:  # capital: one city per country, whatever the phrasing
            capitals.setdefault(request.rstrip("?.").split()[-1], set()).add(answer)
        else:
            assert answer == expected, request
    assert capitals and all(len(cities) == 1 for cities in capitals.values())


def test_the_refusal_is_the_refused_categorys_only_answer_and_no_other():
    for e in instruction_examples():
        answer = e["messages"][1]["content"]
        if e["category"] == REFUSED_CATEGORY:
            assert answer == REFUSAL
        else:
            assert "can't" not in answer and "help" not in answer


def test_heldout_requests_are_never_training_requests():
    examples = instruction_examples()
    requests = {split: [e["messages"][0]["content"] for e in examples if e["split"] == split]
                for split in ("train", "heldout")}  # fmt: skip
    assert len(set(requests["train"])) == len(requests["train"])
    assert len(set(requests["heldout"])) == len(requests["heldout"])
    assert not set(requests["train"]) & set(requests["heldout"])


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"category": "poetry", "split": "train", "messages": []}', "category"),
        ('{"category": "spell", "split": "test", "messages": []}', "split"),
        ('{"category": "spell", "split": "train", "messages": [{"role": "user", "content": "hi"}]}', "messages"),
    ],
)
def test_a_bad_record_is_refused_naming_its_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(SHIPPED_FILE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: '{field}'"):
        read_instructions(path)
