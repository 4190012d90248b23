"""Data at corpus scale: rows on disk, tokenized once (a cache that never goes stale), in parallel,
from the inputs people have, with bad records named during preparation."""

import gzip
import json
import os

import pytest
from conftest import CHATS, DOCS, lorakit, write_jsonl, write_recipe
from transformers import AutoTokenizer

from lorakit.data.prepare import load_examples, prepare, to_rows
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def _recipe(work, model, data, stage="cpt", **settings):
    settings = {"path": str(data), "max_length": 32, "cache_dir": str(work / "cache"), **settings}
    text = json.dumps({"stage": stage, "model": model, "data": settings, "train": {"max_steps": 2}})
    return load_recipe(write_recipe(work / "r.yaml", text))  # JSON is YAML


def _docs(n: int) -> list[dict]:
    return [{"text": f"{DOCS[i % len(DOCS)]} Record {i}."} for i in range(n)]


def _rows(dataset) -> list[dict]:
    return [dict(r) for r in dataset]


def test_prepared_rows_are_the_rows_the_in_memory_packing_makes(work, tokenizer, tiny_instruct):
    """The Arrow path keeps packing's guarantees: the same rows, position ids and masks as before."""
    write_jsonl(work / "docs.jsonl", _docs(40))
    for packing in (True, False):
        recipe = _recipe(work, "m", work / "docs.jsonl", packing=packing)
        rows = _rows(prepare(recipe, tokenizer).rows)
        examples = load_examples("cpt", work / "docs.jsonl", tokenizer, 32, None)[0]
        assert rows == to_rows("cpt", examples, 32, packing)
    chat_tokenizer = AutoTokenizer.from_pretrained(tiny_instruct)
    write_jsonl(work / "c.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                   for q, a in CHATS * 7])
    recipe = load_recipe(write_recipe(work / "s.yaml", f"stage: sft\nmodel: m\ndata: {{path: {work / 'c.jsonl'}, "
                                                       f"max_length: 96, cache_dir: {work / 'cache'}}}\n"))
    examples = load_examples("sft", work / "c.jsonl", chat_tokenizer, 96, "You are a helpful assistant.")[0]
    assert _rows(prepare(recipe, chat_tokenizer).rows) == to_rows("sft", examples, 96, True)


def test_data_is_tokenized_once_and_a_change_is_a_miss_never_a_stale_hit(work, tokenizer, capsys):
    write_jsonl(work / "docs.jsonl", _docs(10))
    first = prepare(_recipe(work, "m", work / "docs.jsonl"), tokenizer)
    assert "tokenizing" in capsys.readouterr().err
    again = prepare(_recipe(work, "m", work / "docs.jsonl"), tokenizer)
    assert "read from the cache, tokenized once before" in capsys.readouterr().err
    assert again.location == first.location and _rows(again.rows) == _rows(first.rows)
    (work / "docs.jsonl").write_text((work / "docs.jsonl").read_text().replace("Record 3.", "Record 9."))  # same size
    changed = prepare(_recipe(work, "m", work / "docs.jsonl"), tokenizer)
    assert changed.location != first.location and "tokenizing" in capsys.readouterr().err
    longer = prepare(_recipe(work, "m", work / "docs.jsonl", max_length=48), tokenizer)
    assert longer.location not in (first.location, changed.location)
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["Orbix"])
    assert prepare(_recipe(work, "m", work / "docs.jsonl"), other).location != changed.location


def test_parallel_tokenization_makes_the_same_rows_as_one_process(work, tokenizer):
    write_jsonl(work / "docs.jsonl", _docs(1200))  # more than one batch per worker
    one = prepare(_recipe(work, "m", work / "docs.jsonl", num_proc=1), tokenizer)
    two = prepare(_recipe(work, "m", work / "docs.jsonl", num_proc=2, cache_dir=str(work / "c2")), tokenizer)
    assert one.location.parent != two.location.parent and _rows(one.rows) == _rows(two.rows)


def test_a_bad_record_deep_in_the_data_is_named_and_leaves_no_cache_entry(work, tokenizer):
    records = _docs(2000)
    records[1499] = {"txt": "misspelled field"}
    write_jsonl(work / "docs.jsonl", records)
    with pytest.raises(LorakitError, match="docs.jsonl line 1500: no `text` field"):
        prepare(_recipe(work, "m", work / "docs.jsonl", num_proc=2), tokenizer)
    assert [p.name for p in (work / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_every_file_of_a_folder_is_read_or_named(work, tokenizer):
    folder = work / "corpus"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", _docs(3))
    with gzip.open(folder / "part2.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(d) + "\n" for d in _docs(5)))
    (folder / "part3.txt.gz").write_bytes(gzip.compress(b"A compressed text document."))
    (folder / "manual.pdf").write_bytes(b"%PDF-1.4")
    prepared = prepare(_recipe(work, "m", folder), tokenizer)
    assert prepared.stats["examples"] == 3 + 5 + 1
    assert any("1 file(s) in" in n and "manual.pdf" in n for n in prepared.notes)
    by_glob = prepare(_recipe(work, "m", f"{folder}/*.jsonl*"), tokenizer)
    assert by_glob.stats["examples"] == 8


def test_a_saved_datasets_folder_and_a_hub_id(work, tokenizer):
    from datasets import Dataset

    Dataset.from_list([{"body": d["text"]} for d in _docs(6)]).save_to_disk(str(work / "saved"))
    prepared = prepare(_recipe(work, "m", work / "saved", field="body"), tokenizer)
    assert prepared.stats["examples"] == 6
    with pytest.raises(LorakitError, match="hf:org/corpus: the hub dataset cannot be downloaded here"):
        prepare(_recipe(work, "m", "hf:org/corpus"), tokenizer)


def test_data_prepare_fills_the_cache_and_training_reads_it(work, tiny_base):
    write_jsonl(work / "docs.jsonl", _docs(12))
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: docs.jsonl, max_length: 32, "
                                           f"cache_dir: cache}}\ntrain: {{max_steps: 2}}\n")
    out = lorakit("data", "prepare", recipe).stdout
    assert "12 documents ->" in out and "tokens" in out and "trained" in out and f"cached in {work / 'cache'}" in out
    result = lorakit("train", recipe)
    assert "read from the cache, tokenized once before" in result.stderr and "tokenizing" not in result.stderr


@pytest.mark.slow
def test_streaming_trains_from_a_stream_and_needs_max_steps(work, tiny_base):
    write_jsonl(work / "docs.jsonl", _docs(12))
    text = f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: docs.jsonl, max_length: 32, streaming: true}}\n"
    result = lorakit("train", write_recipe(work / "r.yaml", text), expect=1)
    assert "data.streaming needs train.max_steps" in result.stderr
    result = lorakit("train", write_recipe(work / "r.yaml", text + "train: {max_steps: 3}\n"))
    assert "data: streaming docs.jsonl" in result.stderr
    assert json.loads((work / "adapters" / "r" / "manifest.json").read_text())["metrics"]["steps"] == 3


@pytest.mark.slow
def test_report_to_tensorboard_keeps_the_loss_curve_beside_the_adapter(work, corpus, tiny_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = (f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: {corpus}, max_length: 32}}\n"
            f"train: {{max_steps: 4, logging_steps: 1, report_to: tensorboard}}\n")
    lorakit("train", write_recipe(work / "r.yaml", text))
    events = list((work / "adapters" / "r" / "runs").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert os.environ.get("TENSORBOARD_LOGGING_DIR") is None
