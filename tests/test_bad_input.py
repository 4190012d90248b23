"""Every kind of bad input, through the real CLI: one line naming the problem, exit 1, no traceback,
and nothing written under adapters/. Plus random records thrown at the loaders."""

import json
import shutil

import pytest
from conftest import lorakit, write_jsonl, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    "output is not an adapter": (_existing_output, "adapters/mine: exists and is not a lorakit output"),
    "output escapes": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\noutput: ../../outside\n"),
                       "must not climb out of its folder"),
    "lone surrogate": (_cpt_file("d.jsonl", b'{"text": "abc \\ud800 def"}\n'),
                       "d.jsonl line 1: field `text` holds an unpaired surrogate ('\\ud800' at character 4)"),
    "lone surrogate in a chat": (lambda w, m: _cpt_file("d.jsonl", b'{"messages": [{"role": "user", "content": '
                                                                 b'"hi \\udfff"}, {"role": "assistant", "content": '
                                                                 b'"ok"}]}\n')(w, m).replace("cpt", "sft"),
                                 "d.jsonl line 1: field `messages[0].content` holds an unpaired surrogate"),
    "JSON nested 100k deep": (_cpt_file("d.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
                              "d.jsonl line 1: JSON nested too deeply"),
    "epochs nan": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{epochs: .nan}}\n"),
                   "train.epochs must be a finite number, got nan"),
    "epochs inf": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{epochs: .inf}}\n"),
                   "train.epochs must be a finite number, got inf"),
    "lr nan": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{lr: .nan}}\n"),
               "train.lr must be a finite number, got nan"),
    "seed too large": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{seed: 1099511627776}}\n"),
                       "train.seed must be in 0 .. 4294967295, got 1099511627776"),
    "negative seed": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\ntrain: {{seed: -1}}\n"),
                      "train.seed must be in 0 .. 4294967295, got -1"),
    "lora on the head": (_recipe("stage: cpt\nmodel: {base}\ndata: {{path: d.txt}}\nlora: {{target: [lm_head]}}\n"),
                         "lora.target lm_head: only the linear layers inside the blocks can be adapted"),
    "qlora on a parent, before the data": (
        lambda w, m: _other_base_parent(w, m).replace("data: {path: d.txt}", "data: {path: nowhere.txt}")
        .replace(f"model: {m['base']}\n", f"model: {m['base']}\nmethod: qlora\n"),
        "method: qlora cannot build on a parent adapter yet"),
    "missing parent": (_recipe("stage: sft\nparent: adapters/nosuch\ndata: {{path: d.jsonl}}\n"),
                       "adapters/nosuch: adapter folder not found (looked at "),
    "an empty messages list": (_sft([{"messages": []}]), "d.jsonl line 1: field `messages` must be a non-empty list"),
    "content is a number": (_sft([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}]),
                            "d.jsonl line 1: messages[1].content must be a string, got int"),
    "a hub id while the hub is unreachable": (
        _recipe("stage: cpt\nmodel: Qwen/Qwen2-0.5B\ndata: {{path: d.txt}}\n"),
        "Qwen/Qwen2-0.5B: not a local folder (looked at "),
    "a folder that is not a model": (lambda w, m: (w / "notamodel").mkdir() or
                                     "stage: cpt\nmodel: notamodel\ndata: {path: d.txt}\n",
                                     "notamodel: not a model folder (no config.json)"),
    "missing local model under a models folder": (
        lambda w, m: (w / "models").mkdir() or "stage: cpt\nmodel: models/nosuch\ndata: {path: d.txt}\n",
        "models/nosuch: model folder not found (looked at "),
}


TRAINS_FIRST = {"adapter of another base", "qlora on a parent, before the data"}  # set-ups that train a parent


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in TRAINS_FIRST else c for c in CASES])
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
    if case == "a hub id while the hub is unreachable":  # conftest keeps the hub offline
        assert "could not be reached" in lines[-1] and "--local-dir" in lines[-1]
    if written:
        assert (work / "adapters" / "mine" / "notes.txt").read_text() == "mine"


def test_debug_shows_the_traceback(work):
    with pytest.raises(LorakitError):
        lorakit("--debug", "train", write_recipe(work / "r.yaml", "stage: cpt\nmodel: ./x\ndata: {path: d.txt}\n"))


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
        conversations = load_conversations(path).conversations
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


# --- Damaged adapters: every command that reads one says which file, in one line ---------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_base):
    """An SFT adapter trained on top of a CPT adapter (so it carries parent/)."""
    folder = tmp_path_factory.mktemp("chain")
    (folder / "d.txt").write_text("some text to train on, twice over")
    write_jsonl(folder / "c.jsonl", [CHAT])
    lorakit("train", write_recipe(folder / "cpt.yaml", f"stage: cpt\nmodel: {tiny_base}\noutput: {folder / 'cpt'}\n"
                                                       f"data: {{path: {folder / 'd.txt'}}}\ntrain: {{max_steps: 1}}\n"))
    lorakit("train", write_recipe(folder / "sft.yaml", f"stage: sft\nparent: {folder / 'cpt'}\noutput: {folder / 'sft'}\n"
                                                       f"data: {{path: {folder / 'c.jsonl'}}}\ntrain: {{max_steps: 1}}\n"))
    return folder / "sft"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated weights": (lambda a: _truncate(a / "adapter_model.safetensors"),
                          "adapter_model.safetensors: damaged or incomplete weights"),
    "empty weights": (lambda a: (a / "adapter_model.safetensors").write_bytes(b""),
                      "adapter_model.safetensors: damaged or incomplete weights (Error while deserializing header: "
                      "header too small)"),
    "huge header": (lambda a: (a / "adapter_model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}"),
                    "adapter_model.safetensors: damaged or incomplete weights"),
    "invalid adapter config": (lambda a: (a / "adapter_config.json").write_text('{"r": 16,'),
                               "adapter_config.json: not a valid adapter config"),
    "adapter config not an object": (lambda a: (a / "adapter_config.json").write_text("[1, 2]"),
                                     "adapter_config.json: not a valid adapter config (a JSON object was expected, "
                                     "found list)"),
    "invalid manifest": (lambda a: (a / "manifest.json").write_text("{oops"), "manifest.json: not a valid lorakit manifest"),
    "manifest not an object": (lambda a: (a / "manifest.json").write_text('"text"'),
                               "manifest.json: not a valid lorakit manifest (a JSON object was expected, found str)"),
    "truncated parent": (lambda a: (a / "parent" / "adapter_model.safetensors").unlink(),
                         "parent: the adapter has no adapter_model.safetensors"),
}
COMMANDS = {
    "chat": lambda a, w: ["chat", "--adapter", a, "--prompt", "hi"],
    "generate": lambda a, w: ["generate", "--adapter", a, "hi"],
    "export": lambda a, w: ["export", a, "-o", w / "out"],
    "merge": lambda a, w: ["merge", "--adapter", a, "-o", w / "out"],
    "eval": lambda a, w: ["eval", "--adapter", a, "--data", write_jsonl(w / "e.jsonl", [CHAT])],
    "serve": lambda a, w: ["serve", "--adapter", f"x={a}", "--port", "0"],
    "train on it": lambda a, w: ["train", write_recipe(w / "r.yaml", f"stage: sft\nparent: {a}\n"
                                                                  f"data: {{path: {write_jsonl(w / 'c.jsonl', [CHAT])}}}\n")],
}


@pytest.mark.slow  # the damaged adapters are copies of one trained chain
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_adapter_is_one_line_naming_the_file_in_every_command(chain, work, corruption, command):
    damage, message = CORRUPTIONS[corruption]
    adapter = work / "damaged"
    shutil.copytree(chain, adapter)
    damage(adapter)
    result = lorakit(*COMMANDS[command](adapter, work), expect=1)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    assert not (work / "out").exists()


@pytest.mark.slow
def test_one_damaged_manifest_does_not_hide_the_other_adapters(chain, work):
    shutil.copytree(chain, work / "adapters" / "good")
    shutil.copytree(chain, work / "adapters" / "bad")
    (work / "adapters" / "bad" / "manifest.json").write_text("{oops")
    listing = lorakit("adapters", "list").stdout.splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["bad", "good"]
    assert "unreadable: not a valid lorakit manifest" in listing[1] and "sft" in listing[2]


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "m", "--temperature", "-1", "hi"], "'--temperature': -1.0 is not in the range x>=0"),
    (["generate", "--model", "m", "--max-new-tokens", "0", "hi"], "'--max-new-tokens': 0 is not in the range x>=1"),
    (["generate", "--model", "m", ""], "the prompt is empty"),
    (["export", "a", "-o", "b", "--shard-size", "lots"], "--shard-size: 'lots': expected a size like 2GB"),
    (["serve", "--model", "m", "--port", "99999"], "'--port': 99999 is not in the range 0<=x<=65535"),
    (["serve", "--model", "m", "--max-body", "huge"], "--max-body 'huge': expected a size like 8GB or 512MB"),
])
def test_bad_command_line_values_are_one_line(work, args, message):
    from click.testing import CliRunner

    from lorakit.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
