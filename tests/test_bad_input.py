"""Every kind of bad input, through the real CLI: one line naming the problem, exit 1, no traceback,
and nothing written under adapters/. Plus random records thrown at the loaders."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import lorakit, write_jsonl, write_recipe
from lorakit.errors import LorakitError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _sft(records):
    def setup(w, models):
        write_jsonl(w / "d.jsonl", records)
        return f"stage: sft\nmodel: {models['instruct']}\ndata: {{path: d.jsonl}}\n"
    return setup


def _cpt_file(name, content: bytes):
    def setup(w, models):
        (w / name).write_bytes(content)
        return f"stage: cpt\nmodel: {models['base']}\ndata: {{path: {name}}}\n"
    return setup


def _recipe(text):
    return lambda w, models: text.format(**models)


def _not_causal(w, models):
    folder = w / "encoder"
    shutil.copytree(models["base"], folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 400, "d_model": 16}))
    (w / "d.txt").write_text("text")
    return "stage: cpt\nmodel: encoder\ndata: {path: d.txt}\n"


def _other_base_parent(w, models):
    (w / "d.txt").write_text("some text to train on")
    lorakit("train", write_recipe(w / "p.yaml", f"stage: cpt\nmodel: {models['other']}\ndata: {{path: d.txt}}\n"
                                               f"output: elsewhere/p\ntrain: {{max_steps: 1}}\n"))
    return f"stage: cpt\nmodel: {models['base']}\nparent: elsewhere/p\ndata: {{path: d.txt}}\n"


def _existing_output(w, models):
    (w / "adapters" / "mine").mkdir(parents=True)
    (w / "adapters" / "mine" / "notes.txt").write_text("mine")
    (w / "d.txt").write_text("text")
    return f"stage: cpt\nmodel: {models['base']}\ndata: {{path: d.txt}}\noutput: adapters/mine\n"


CASES = {
    "missing data file": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: nowhere.jsonl}}\n"), "nowhere.jsonl: data path not found"),
    "empty data file": (_sft([]), "d.jsonl: no conversations found"),
    "empty text file": (_cpt_file("d.txt", b"  \n"), "d.txt: no non-empty documents found"),
    "folder without txt": (lambda w, m: (w / "docs").mkdir() or f"stage: cpt\nmodel: {m['base']}\ndata: {{path: docs}}\n",
                           "docs: folder holds no .txt"),
    "malformed json": (_cpt_file("d.json", b'[{"text": "a"},\n {"text": }]'), "d.json line 2: not valid JSON"),
    "malformed jsonl": (_cpt_file("d.jsonl", b'{"text": "a"}\n{"text": "b"\n'), "d.jsonl line 2: not valid JSON"),
    "record without text": (_cpt_file("d.jsonl", b'{"body": "a"}\n'), "d.jsonl line 1: no `text` field"),
    "record without messages": (_sft([{"prompt": "x"}]), "d.jsonl line 1: no `messages` field"),
    "unknown role": (_sft([{"messages": [{"role": "robot", "content": "x"}]}]), "line 1: messages[0].role is 'robot'"),
    "missing content": (_sft([{"messages": [{"role": "user"}]}]), "line 1: messages[0].content must be a string, got nothing"),
    "non-string content": (_sft([CHAT, {"messages": [{"role": "user", "content": ["x"]}]}]),
                           "line 2: messages[0].content must be a string, got list"),
    "no assistant turn": (_sft([{"messages": [{"role": "user", "content": "hi"}]}]), "line 1: no assistant turn"),
    "assistant truncated away": (lambda w, m: _sft([{"messages": [{"role": "user", "content": "word " * 100},
                                                                 {"role": "assistant", "content": "ok"}]}])(w, m)
                                 .replace("path: d.jsonl", "path: d.jsonl, max_length: 16"),
                                 "line 1: no assistant token is left after truncation to data.max_length=16"),
    "non-utf8 text": (_cpt_file("d.txt", b"caf\xe9 au lait"), "d.txt: not UTF-8 text (bad byte at offset 3)"),
    "wrong type": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\nlora: {{r: many}}\n"), "lora.r must be an integer, got 'many'"),
    "negative lr": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{lr: -1.0}}\n"), "train.lr must be positive, got -1.0"),
    "zero epochs": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{epochs: 0}}\n"), "train.epochs must be positive, got 0"),
    "unknown key": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt, max_len: 5}}\n"), "unknown key data.max_len; did you mean data.max_length?"),
    "model path missing": (_recipe("stage: cpt\nmodel: ./models/none\ndata: {{path: d.txt}}\n"), "./models/none: model folder not found"),
    "not a causal lm": (_not_causal, "encoder: not a causal language model (its model type is t5)"),
    "adapter of another base": (_other_base_parent, "elsewhere/p was trained on"),
    "output is not an adapter": (_existing_output, "adapters/mine: exists and is not a lorakit adapter"),
    "output escapes": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\noutput: ../../outside\n"),
                       "must not climb out of its folder"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_writes_nothing(case, work, tiny_base, tiny_instruct, other_base):
    setup, message = CASES[case]
    models = {"base": tiny_base, "instruct": tiny_instruct, "other": other_base}
    recipe = write_recipe(work / "r.yaml", setup(work, models))
    result = lorakit("train", recipe, expect=1)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr  # one line, last
    assert message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    written = [p for p in (work / "adapters").rglob("*")] if (work / "adapters").exists() else []
    assert written in ([], [work / "adapters" / "mine", work / "adapters" / "mine" / "notes.txt"]), written


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["text", "messages", "role", "content", "conversations", "from", "value", "instruction",
                         "input", "output", "system", "x"]), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(json_values, min_size=1, max_size=4))
def test_loaders_take_any_records_or_say_why(tmp_path, tiny_instruct_tokenizer, records):
    from lorakit.data.chat import load_conversations, tokenize_conversations
    from lorakit.data.text import load_documents, tokenize_documents

    path = tmp_path / "random.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        conversations, _ = load_conversations(path)
        tokenize_conversations(conversations, tiny_instruct_tokenizer, 64, "sys")
    except LorakitError:
        pass
    try:
        documents, _ = load_documents(path)
        tokenize_documents(documents, tiny_instruct_tokenizer)
    except LorakitError:
        pass


@pytest.fixture(scope="module")
def tiny_instruct_tokenizer(tiny_instruct):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_instruct)
