"""Several datasets in one run, mixed by weight: the trained rows hold each source's share, every source
keeps its own format and field, and the log, `data prepare`, preview and the manifest say what was drawn."""

import json

import pytest
from conftest import DOCS, lorakit, write_jsonl, write_recipe
from transformers import AutoTokenizer

from lorakit.data.mix import pick, targets, units
from lorakit.data.prepare import prepare
from lorakit.recipe import load_recipe

TOLERANCE = 0.01
"""Shares are exact up to rounding to whole examples: within one percentage point at these sizes."""


@pytest.fixture(scope="module")
def tokenizer(tiny_instruct):
    return AutoTokenizer.from_pretrained(tiny_instruct)


def _chats(work, name, count, word, sharegpt=False, field="messages"):
    if sharegpt:
        records = [{"conversations": [{"from": "human", "value": f"Tell me about {word} {i}"},
                             {"from": "gpt", "value": f"{word} is fine."}]} for i in range(count)]
    else:
        records = [{field: [{"role": "user", "content": f"Tell me about {word} {i}"},
                                 {"role": "assistant", "content": f"{word} is fine."}]} for i in range(count)]
    return write_jsonl(work / f"{name}.jsonl", records)


def _recipe(work, sources, stage="sft", **data):
    raw = {"stage": stage, "model": "m", "data": {"path": sources, "max_length": 64, "cache_dir": str(work / "cache"),
                                                  **data}}
    return load_recipe(write_recipe(work / "r.yaml", json.dumps(raw)))


def _segments(rows, tokenizer):
    """The examples packed into the rows, decoded (positions restart at each example)."""
    found = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        found += [tokenizer.decode(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
    return found


def test_the_trained_rows_follow_the_weights(work, tokenizer):
    _chats(work, "orbix", 40, "Orbix", field="talk")  # its own field
    _chats(work, "quartz", 200, "Quartzfield", sharegpt=True)  # its own format
    recipe = _recipe(work, [{"path": "orbix.jsonl", "weight": 3, "field": "talk"}, {"path": "quartz.jsonl", "weight": 1}])
    prepared = prepare(recipe, tokenizer)
    segments = _segments(prepared.rows, tokenizer)
    orbix = sum("Orbix" in s for s in segments)
    quartz = sum("Quartzfield" in s for s in segments)
    assert orbix + quartz == len(segments) == 240  # an epoch: as many examples as the sources hold
    assert abs(orbix / 240 - 0.75) <= TOLERANCE and abs(quartz / 240 - 0.25) <= TOLERANCE
    assert len({s for s in segments if "Quartzfield" in s}) == quartz  # sampled without replacement
    counts = {s: segments.count(s) for s in segments if "Orbix" in s}
    assert len(counts) == 40 and set(counts.values()) <= {4, 5}  # repeated whole 4x, then a random half once more
    shares = {s["path"]: s for s in prepared.stats["sources"]}
    assert shares["orbix.jsonl"]["used"] == 180 and shares["quartz.jsonl"]["available"] == 200
    assert any(n.startswith("data mix: orbix.jsonl 75.0% of conversations") for n in prepared.notes)


def test_sources_without_weights_are_read_once_each(work, tokenizer):
    _chats(work, "a", 7, "Orbix")
    _chats(work, "b", 5, "Quartzfield")
    segments = _segments(prepare(_recipe(work, ["a.jsonl", "b.jsonl"]), tokenizer).rows, tokenizer)
    assert sorted(segments) == sorted(set(segments)) and len(segments) == 12


def test_a_changed_weight_is_a_new_cache_entry(work, tokenizer):
    _chats(work, "a", 7, "Orbix")
    _chats(work, "b", 5, "Quartzfield")
    one = prepare(_recipe(work, [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 1}]), tokenizer)
    two = prepare(_recipe(work, [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "weight": 1}]), tokenizer)
    assert one.location != two.location and one.data_hash != two.data_hash


def test_a_cpt_document_tokenized_in_pieces_is_drawn_whole():
    from datasets import Dataset

    part = Dataset.from_dict({"continues": [False, True, True, False, False], "length": [3, 5, 5, 2, 4]})
    assert units(part, "cpt") == [(0, 1), (1, 4), (4, 5)]
    assert units(part, "sft") == [(i, i + 1) for i in range(5)]


def test_drawing_is_whole_passes_then_a_sample():
    import random

    assert targets([40, 200], [3, 1]) == [180, 60] and targets([40, 200], None) == [40, 200]
    drawn = pick(4, 10, random.Random(0))
    assert sorted(drawn).count(0) in (2, 3) and len(drawn) == 10 and all(drawn.count(i) >= 2 for i in range(4))


@pytest.mark.parametrize("sources, message", [
    ([{"path": "a", "weight": 1}, {"path": "b"}], "data.path[1]: give every source a weight, or none"),
    ([{"path": "a", "weight": 0}], "data.path[0].weight must be a positive number"),
    ([{"path": "a", "wieght": 1}], "data.path[0]: unknown key 'wieght'"),
    ([{"weight": 1}], "data.path[0]: needs `path`"),
    ([], "data.path: an empty list"),
])
def test_a_bad_source_is_named(work, sources, message):
    recipe = write_recipe(work / "r.yaml", json.dumps({"stage": "cpt", "model": "m", "data": {"path": sources}}))
    result = lorakit("validate", recipe, expect=1)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_data_prepare_and_preview_report_each_sources_share(work, tiny_instruct):
    _chats(work, "a", 30, "Orbix")
    _chats(work, "b", 10, "Quartzfield")
    recipe = write_recipe(work / "r.yaml", f"stage: sft\nmodel: {tiny_instruct}\ndata:\n  path:\n"
                                           f"    - {{path: a.jsonl, weight: 1}}\n    - {{path: b.jsonl, weight: 1}}\n")
    out = lorakit("data", "prepare", recipe).stdout
    assert "data mix: a.jsonl 50.0% of conversations (20: 67% of its 30, sampled" in out
    assert "b.jsonl 50.0% of conversations (20: its 10 repeated 2.00x" in out
    assert "data mix: a.jsonl 50.0%" in lorakit("preview", recipe).stdout


@pytest.mark.slow
def test_a_mixed_run_records_each_sources_share_in_the_manifest(work, tiny_base):
    write_jsonl(work / "domain.jsonl", [{"text": DOCS[0] + f" Note {i}."} for i in range(6)])
    write_jsonl(work / "general.jsonl", [{"body": DOCS[1] + f" Line {i}."} for i in range(44)])  # 50 in all: 40 + 10
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata:\n  path:\n"
                                           f"    - {{path: domain.jsonl, weight: 0.8}}\n"
                                           f"    - {{path: general.jsonl, weight: 0.2, field: body}}\n"
                                           f"  max_length: 32\ntrain: {{max_steps: 2, batch_size: 2}}\n")
    result = lorakit("train", recipe)
    assert "data mix: domain.jsonl 80.0% of documents" in result.stderr
    manifest = json.loads((work / "adapters" / "r" / "manifest.json").read_text())
    shares = {s["path"]: s["share"] for s in manifest["data"]["sources"]}
    assert shares == {"domain.jsonl": 0.8, "general.jsonl": 0.2}
    assert manifest["data"]["path"][1]["field"] == "body"


def test_a_new_seed_is_a_new_draw_even_for_one_weighted_source(work, tokenizer):
    """The mixed rows depend on train.seed (drawn and shuffled): another seed is another cache entry."""
    _chats(work, "a", 9, "Orbix")
    entries = set()
    for seed in (1, 2):
        recipe = load_recipe(write_recipe(work / "r.yaml", json.dumps({
            "stage": "sft", "model": "m", "train": {"seed": seed},
            "data": {"path": [{"path": "a.jsonl", "weight": 1}], "max_length": 64, "cache_dir": str(work / "cache")}})))
        entries.add(prepare(recipe, tokenizer).location)
    assert len(entries) == 2
