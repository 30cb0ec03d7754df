"""jft.data against the real references: transformers' chat templating and assistant masks,
the tokenizer's own encodings, and the source rows of the data files."""

import csv
import json
import re
import warnings

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

import jft.data as D
from jft.data.testing import SPECIAL_TOKENS, make_tiny_tokenizer

GSM8K = "/work/shared/data/gsm8k/train.jsonl"


def _gsm8k_rows(n):
    with open(GSM8K) as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = [r["question"] + "\n" + r["answer"] for r in _gsm8k_rows(300)]
    make_tiny_tokenizer(path, vocab_size=600, chat_template="chatml", texts=texts)
    return path


@pytest.fixture
def tok(tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


CONVERSATION = [
    {"role": "system", "content": "You solve grade school math."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
    {"role": "assistant", "content": "He has 3 + 4 = 7 apples.\n#### 7"},
    {"role": "user", "content": "And if he eats 2?"},
    {"role": "assistant", "content": "7 - 2 = 5 apples are left.\n#### 5"},
]
TWO_TURNS = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
]


def _labelled_runs(example):
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(example["input_ids"].tolist(), example["labels"].tolist()):
        if label != D.IGNORE_INDEX:
            assert label == token, "labels must be the input ids themselves (unshifted)"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _reference_ids(tokenizer, messages, **kw):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


# --- tiny tokenizer ---------------------------------------------------------------------------

def test_tiny_tokenizer_reloads_and_keeps_special_tokens_whole(tok, tokenizer_dir):
    for token in SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    fresh = make_tiny_tokenizer(None, vocab_size=600, chat_template="chatml",
                                texts=[r["question"] + "\n" + r["answer"] for r in _gsm8k_rows(300)])
    text = _gsm8k_rows(1)[0]["answer"]
    assert tok.encode(text) == fresh.encode(text)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.chat_template == D.get_template("chatml")
    assert len(make_tiny_tokenizer(vocab_size=400, chat_template=None)) == 400


def test_tiny_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        make_tiny_tokenizer(vocab_size=100)


# --- templates --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", D.TEMPLATE_NAMES)
def test_named_template_renders_and_tokenizes_like_transformers(tok, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiny tokenizer has every family's markers
        D.apply_template(tok, name)
    for messages in (TWO_TURNS, CONVERSATION):
        text = D.render(messages, tok)
        assert text == tok.apply_chat_template(messages, tokenize=False)
        example = D.tokenize(messages, tok, max_seq_length=1024)
        assert example["input_ids"].tolist() == _reference_ids(tok, messages)
        # contents in order, with the family's markers
        positions = [text.find(m["content"]) for m in messages]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), text
        for marker in D.template_info(name).markers:
            assert marker in text, (marker, text)


@pytest.mark.parametrize("name", D.TEMPLATE_NAMES)
def test_responses_only_labels_are_exactly_the_assistant_turns(tok, name):
    D.apply_template(tok, name)
    example = D.tokenize(CONVERSATION, tok, max_seq_length=1024)
    runs = [tok.decode(run) for run in _labelled_runs(example)]
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(answers), runs
    closing = D.end_of_turn(name, tok)
    for run, answer in zip(runs, answers):
        assert answer in run, (run, answer)
        rest = run.replace(answer, "", 1)
        assert closing in rest, (run, closing)
        for allowed in (closing, tok.eos_token, "<think>", "</think>"):
            rest = rest.replace(allowed, "")
        assert rest.strip() == "", f"labelled more than the answer and its end of turn: {run!r}"
    labelled_text = "".join(runs)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] not in labelled_text


# Templates with {% generation %} tags: transformers' assistant mask is the reference for the
# prefix-rendering method, which runs on the same templates with the tags removed.
GENERATION_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "vicuna": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ 'USER: ' + m['content'] + ' ' }}{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT:' }}"
        "{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}


def _without_generation_tags(jinja):
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", jinja)


@pytest.mark.parametrize("name", sorted(GENERATION_TEMPLATES))
def test_prefix_spans_equal_transformers_assistant_mask(tok, name):
    tagged = GENERATION_TEMPLATES[name]
    plain = _without_generation_tags(tagged)
    assert plain != tagged
    for messages in (TWO_TURNS, CONVERSATION):
        reference = tok.apply_chat_template(messages, chat_template=tagged, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert sum(reference["assistant_masks"]) > 0
        ours = D.tokenize(messages, tok, 1024, template=plain)
        assert ours["input_ids"].tolist() == list(reference["input_ids"])
        assert (ours["labels"] != D.IGNORE_INDEX).astype(int).tolist() == reference["assistant_masks"]
        tagged_path = D.tokenize(messages, tok, 1024, template=tagged)
        assert tagged_path["labels"].tolist() == ours["labels"].tolist()


def test_qwen3_history_drops_reasoning_and_labels_follow(tok):
    D.apply_template(tok, "qwen-3")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},
    ]
    example = D.tokenize(messages, tok, 1024)
    assert example["input_ids"].tolist() == _reference_ids(tok, messages)
    runs = [tok.decode(run) for run in _labelled_runs(example)]
    assert runs == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]
    assert "add them" not in tok.apply_chat_template(messages, tokenize=False)


def test_get_template_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown chat template 'llama-9'.*chatml.*vicuna"):
        D.get_template("llama-9")
    assert D.get_template("Qwen2.5") == D.get_template("qwen-2.5")


def test_tokenizer_without_template_needs_a_name(tok):
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template.*chatml"):
        D.tokenize(TWO_TURNS, tok, 64)
    example = D.tokenize(TWO_TURNS, tok, 1024, template="zephyr")
    assert example["input_ids"].tolist() == _reference_ids(
        tok, TWO_TURNS, chat_template=D.get_template("zephyr"))


def test_apply_template_warns_about_markers_missing_from_vocab():
    from tokenizers import Tokenizer, models, pre_tokenizers
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.warns(UserWarning, match="<start_of_turn>"):
        D.apply_template(bare, "gemma")


def test_alternation_errors_name_the_row(tok):
    D.apply_template(tok, "mistral")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="row 1: .*alternate"):
        D.tokenize_many([TWO_TURNS, bad], tok, 64)


# --- tokenisation -----------------------------------------------------------------------------

def test_truncation_warns_or_raises(tok):
    full = D.tokenize(CONVERSATION, tok, 1024)
    limit = len(full["input_ids"]) - 5
    with pytest.warns(UserWarning, match="truncated"):
        cut = D.tokenize(CONVERSATION, tok, limit)
    assert cut["input_ids"].tolist() == full["input_ids"][:limit].tolist()
    assert cut["labels"].tolist() == full["labels"][:limit].tolist()
    with pytest.raises(ValueError, match="more than max_seq_length"):
        D.tokenize(CONVERSATION, tok, limit, truncation="error")
    with pytest.raises(ValueError, match="truncation must be one of"):
        D.tokenize(CONVERSATION, tok, limit, truncation="drop")


def test_responses_only_false_labels_every_token(tok):
    example = D.tokenize(CONVERSATION, tok, 1024, responses_only=False)
    assert example["labels"].tolist() == example["input_ids"].tolist()
    assert example["input_ids"].dtype == np.int32


def test_bad_conversations_are_rejected(tok):
    with pytest.raises(ValueError, match="non-empty list"):
        D.tokenize([], tok, 64)
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        D.tokenize([{"role": "user"}], tok, 64)
    with pytest.raises(ValueError, match="max_seq_length"):
        D.tokenize(TWO_TURNS, tok, 0)


def test_chunk_text_windows_cover_every_token_once(tok):
    texts = [r["answer"] for r in _gsm8k_rows(3)]
    max_len, stride = 16, 4
    windows = D.chunk_text(texts, tok, max_len, stride)
    reference = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    taught = [t for w in windows for t, l in zip(w["input_ids"], w["labels"]) if l != D.IGNORE_INDEX]
    assert taught == [t for doc in reference for t in doc]
    for w in windows:
        assert 0 < len(w["input_ids"]) <= max_len
        assert any(w["input_ids"].tobytes() in np.asarray(doc, np.int32).tobytes() for doc in reference)
    second = windows[1]
    assert (second["labels"][:stride] == D.IGNORE_INDEX).all()
    assert second["input_ids"][:stride].tolist() == windows[0]["input_ids"][-stride:].tolist()
    with pytest.raises(ValueError, match="stride"):
        D.chunk_text(texts, tok, 8, 8)


# --- formats ----------------------------------------------------------------------------------

def test_formats_are_detected_and_normalised():
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be exact."}
    assert D.detect_format(alpaca) == "alpaca"
    assert D.to_messages(alpaca, "alpaca") == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert D.to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca")[0] == \
        {"role": "user", "content": "Hi"}
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    assert D.detect_format(sharegpt) == "sharegpt"
    assert [m["role"] for m in D.to_messages(sharegpt, "sharegpt")] == ["system", "user", "assistant"]
    openai = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert D.to_messages(openai, D.detect_format(openai)) == openai["messages"]
    completion = {"prompt": "q", "completion": "a"}
    assert D.to_messages(completion, D.detect_format(completion)) == openai["messages"]
    conversational = {"prompt": [{"role": "user", "content": "q"}],
                      "completion": [{"role": "assistant", "content": "a"}]}
    assert D.to_messages(conversational, "prompt_completion") == openai["messages"]
    row = _gsm8k_rows(1)[0]
    assert D.detect_format(row) == "question_answer"
    assert D.to_messages(row, "gsm8k") == [{"role": "user", "content": row["question"]},
                                            {"role": "assistant", "content": row["answer"]}]
    assert D.detect_format({"text": "x"}) == "text"


def test_missing_fields_name_the_fields_and_the_row():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]
    with pytest.raises(ValueError, match=r"row 1 is missing field\(s\) 'output' needed by the 'alpaca'"):
        D.to_conversations(rows)
    with pytest.raises(ValueError, match=r"row 0: conversations\[1\] is missing .*'from'/'value'"):
        D.to_conversations([{"conversations": [{"from": "human", "value": "q"}, {"value": "a"}]}])
    with pytest.raises(ValueError, match="unknown speaker 'alien'"):
        D.to_conversations([{"conversations": [{"from": "alien", "value": "q"}]}])
    with pytest.raises(ValueError, match=r"row 0 is missing field\(s\) 'question', 'answer'"):
        D.to_conversations([{"foo": 1}], format="gsm8k")
    # a datasets column absent from this row comes as None: not listed among the row's fields
    with pytest.raises(ValueError, match=r"'output' needed by the 'alpaca' format \(row has: \['instruction'\]\)"):
        D.to_conversations([{"instruction": "a", "output": None}])
    with pytest.raises(ValueError, match="cannot tell the dataset format.*'foo'"):
        D.to_conversations([{"foo": 1}])
    with pytest.raises(ValueError, match="unknown dataset format 'xml'"):
        D.to_conversations([{"foo": 1}], format="xml")
    with pytest.raises(ValueError, match="empty"):
        D.to_conversations([])


# --- loading ----------------------------------------------------------------------------------

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(5)]


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_files(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    _write(path, ROWS)
    dataset = D.load(str(path))
    got = [{k: ("" if v is None else str(v)) for k, v in row.items()} for row in dataset]
    assert got == ROWS  # CSV infers numbers and empty cells as None
    assert D.to_conversations(dataset) == D.to_conversations(ROWS)
    assert len(D.load(str(path), split="train[:2]")) == 2


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        D.load(str(tmp_path / "empty.jsonl"))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match="no rows"):
        D.load(str(tmp_path / "none.json"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load(str(tmp_path / "data.txt"))


def test_prepare_gsm8k_end_to_end(tok, tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = _gsm8k_rows(12)
    _write(path, rows)
    examples = D.prepare(D.load(str(path)), tok, max_seq_length=512)
    assert len(examples) == len(rows)
    for example, row in zip(examples, rows):
        [run] = _labelled_runs(example)
        assert tok.decode(run) == row["answer"] + "<|im_end|>"
    tiny = {"question": "1+1?", "answer": "2"}
    with pytest.warns(UserWarning) as caught:
        short = D.prepare(rows + [tiny], tok, max_seq_length=20)  # gsm8k prompts exceed 20 tokens
    messages = " ".join(str(w.message) for w in caught)
    assert "dropped 12 example" in messages and "truncated" in messages
    [only] = short
    assert tok.decode(_labelled_runs(only)[0]) == "2<|im_end|>"
    with pytest.raises(ValueError, match="no example has any label token"), pytest.warns(UserWarning):
        D.prepare(rows, tok, max_seq_length=20)


# --- packing and batches ----------------------------------------------------------------------

def _random_examples(rng, count, max_len):
    out = []
    for _ in range(count):
        n = int(rng.integers(1, max_len + 1))
        ids = rng.integers(5, 500, n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.5, D.IGNORE_INDEX, ids).astype(np.int32)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _segments(packed):
    """(row, segment_id) -> (ids, labels, positions) of every packed segment."""
    out = {}
    for r in range(packed["input_ids"].shape[0]):
        for s in np.unique(packed["segment_ids"][r]):
            if s:
                where = packed["segment_ids"][r] == s
                out[(r, int(s))] = tuple(packed[k][r][where] for k in ("input_ids", "labels", "positions"))
    return out


def test_pack_keeps_every_sample_whole_with_restarted_positions():
    rng = np.random.default_rng(0)
    seq_len = 64
    examples = _random_examples(rng, 60, 40) + _random_examples(rng, 2, 150)  # two longer than a row
    packed = D.pack(examples, seq_len, pad_id=0)
    assert set(packed) == {"input_ids", "labels", "positions", "segment_ids"}
    assert all(a.dtype == np.int32 and a.shape == packed["input_ids"].shape for a in packed.values())
    segments = _segments(packed)
    for r in range(packed["input_ids"].shape[0]):
        seg = packed["segment_ids"][r]
        used = seg > 0
        assert used[: used.sum()].all(), "padding only at the end of a row"
        ids_in_order = seg[used]
        assert (np.diff(ids_in_order) >= 0).all() and ids_in_order[0] == 1
        assert set(np.unique(ids_in_order)) == set(range(1, ids_in_order.max() + 1))
        assert (packed["labels"][r][~used] == D.IGNORE_INDEX).all()
        assert (packed["input_ids"][r][~used] == 0).all() and (packed["positions"][r][~used] == 0).all()
    pieces = {}
    for ids, labels, positions in segments.values():
        assert positions.tolist() == list(range(len(ids)))
        assert labels[0] == D.IGNORE_INDEX
        pieces.setdefault(ids.tobytes(), []).append(labels)
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        parts = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        lparts = [labels[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        for part, lpart in zip(parts, lparts):
            assert part.tobytes() in pieces, "sample (or piece of a long sample) kept whole"
            assert any(l[1:].tolist() == lpart[1:].tolist() for l in pieces[part.tobytes()])
    assert len(segments) == sum(-(-len(e["input_ids"]) // seq_len) for e in examples)
    total = sum(len(e["input_ids"]) for e in examples)
    assert packed["input_ids"].shape[0] <= 11 / 9 * -(-total // seq_len) + 1


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="no examples"):
        D.pack([], 8)
    with pytest.raises(ValueError, match="labels has 2"):
        D.pack([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 8)
    with pytest.raises(ValueError, match="seq_len"):
        D.pack([{"input_ids": [1], "labels": [1]}], 0)


def test_batches_pad_to_the_smallest_bucket():
    rng = np.random.default_rng(1)
    examples = _random_examples(rng, 10, 30) + [{"input_ids": np.arange(100, dtype=np.int32), "labels": np.arange(100, dtype=np.int32)}]
    out = list(D.batches(examples, 4, buckets=(16, 32, 64, 128), pad_id=7))
    assert len(out) == 3
    seen = []
    for batch in out:
        assert set(batch) == {"input_ids", "labels", "positions", "segment_ids"}
        width = batch["input_ids"].shape[1]
        lengths = batch["segment_ids"].sum(axis=1)
        assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == np.int32
        assert width == min(b for b in (16, 32, 64, 128) if b >= lengths.max())
        for r, n in enumerate(lengths):
            assert batch["segment_ids"][r, :n].tolist() == [1] * n
            assert batch["positions"][r, :n].tolist() == list(range(n))
            assert (batch["input_ids"][r, n:] == 7).all() and (batch["labels"][r, n:] == D.IGNORE_INDEX).all()
            if n:
                seen.append(batch["input_ids"][r, :n].tobytes())
    assert sorted(seen) == sorted(e["input_ids"].tobytes() for e in examples)
    assert out[-1]["segment_ids"][3].sum() == 0, "short last batch filled with empty rows"
    assert len(list(D.batches(examples, 4, buckets=(128,), drop_last=True))) == 2
    grouped = list(D.batches(examples, 4, buckets=(16, 32, 64, 128), group_by_length=True))
    assert sum(b["input_ids"].size for b in grouped) <= sum(b["input_ids"].size for b in out)
    assert [b["input_ids"].shape[1] for b in D.batches(examples[:1], 1)] == [256]
    with pytest.raises(ValueError, match="longer than the largest bucket 64"):
        D.batches(examples, 4, buckets=(16, 64))


def test_malformed_json_names_the_file_and_line(tmp_path):
    cases = {
        "rows.jsonl": ('{"text": "a"}\n{"text": "b"}\n{"text": \n{"text": "c"}\n', "line 3, column 10"),
        "rows.json": ('[{"text": "a"},\n {"text": }]\n', "line 2, column 11"),
        "lines.json": ('{"text": "a"}\n{"text" "b"}\n', "line 2, column 9"),
    }
    for name, (text, where) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}' is not valid JSON at {where}"):
            D.load(str(tmp_path / name))
