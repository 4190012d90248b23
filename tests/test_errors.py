"""Bad input through the real CLI: one line naming the problem, exit 1, nothing written."""

import pytest

from conftest import lorakit, write_jsonl, write_recipe

RECIPE = "stage: {stage}\nmodel: {model}\ndata: {{path: {data}}}\ntrain: {{max_steps: 2}}\n"


def _fails(work, recipe_text, message):
    result = lorakit("train", write_recipe(work / "r.yaml", recipe_text), expect=1)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (work / "adapters").exists() or not any((work / "adapters").iterdir())
    return lines[-1]


def test_a_malformed_jsonl_names_file_and_line(work, tiny_instruct):
    (work / "c.jsonl").write_text('{"messages": []}\n{oops\n')
    _fails(work, RECIPE.format(stage="sft", model=tiny_instruct, data="c.jsonl"), "c.jsonl line 1: field `messages`")
    (work / "c.jsonl").write_text('{"text": "fine"}\n{oops\n')
    _fails(work, RECIPE.format(stage="cpt", model=tiny_instruct, data="c.jsonl"), "c.jsonl line 2: not valid JSON")


def test_an_empty_data_file_is_named(work, tiny_instruct):
    (work / "empty.jsonl").write_text("")
    _fails(work, RECIPE.format(stage="sft", model=tiny_instruct, data="empty.jsonl"), "empty.jsonl: no conversations")


def test_a_record_with_a_wrong_field_is_named(work, tiny_instruct):
    write_jsonl(work / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": 5}]}])
    _fails(work, RECIPE.format(stage="sft", model=tiny_instruct, data="c.jsonl"),
           "c.jsonl line 1: messages[1].content must be a string, got int")


def test_a_missing_model_folder_is_named(work, corpus):
    _fails(work, RECIPE.format(stage="cpt", model="./models/nowhere", data=corpus), "./models/nowhere: model folder not found")


def test_an_unreachable_hub_id_suggests_a_local_folder(work, corpus, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _fails(work, RECIPE.format(stage="cpt", model="Qwen/Qwen2-0.5B", data=corpus),
                  f"Qwen/Qwen2-0.5B: not a local folder (looked at {work / 'Qwen' / 'Qwen2-0.5B'}), and the model hub "
                  f"could not be reached")
    assert "--local-dir" in line


def test_a_folder_that_is_not_a_model_is_named(work, corpus):
    (work / "notamodel").mkdir()
    _fails(work, RECIPE.format(stage="cpt", model="notamodel", data=corpus), "notamodel: not a model folder (no config.json)")


def test_an_output_that_is_not_an_adapter_is_never_clobbered(work, corpus, tiny_base):
    (work / "precious").mkdir()
    (work / "precious" / "thesis.txt").write_text("years of work")
    _fails(work, RECIPE.format(stage="cpt", model=tiny_base, data=corpus) + "output: precious\n",
           "precious: exists and is not a lorakit output")
    assert (work / "precious" / "thesis.txt").read_text() == "years of work"


def test_debug_shows_the_traceback(work, corpus):
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError):
        lorakit("--debug", "train", write_recipe(work / "r.yaml", RECIPE.format(stage="cpt", model="./x", data=corpus)))
