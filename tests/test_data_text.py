"""CPT data: every document ends with EOS, long ones are split (never cut), short ones packed."""

import json

import pytest
from conftest import DOCS, lorakit, write_jsonl
from transformers import AutoTokenizer

from lorakit.data.blocks import IGNORE, Collator, stream_blocks
from lorakit.data.prepare import load_examples
from lorakit.data.text import load_documents, tokenize_documents
from lorakit.errors import LorakitError


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def test_a_folder_of_txt_files_gives_one_document_each_ending_in_eos(corpus, tokenizer):
    documents, files = load_documents(corpus)
    assert [d.text for d in documents] == DOCS and len(files) == 3
    for example in tokenize_documents(documents, tokenizer):
        assert example.input_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert example.labels == example.input_ids  # every token trained, EOS included (pad == EOS here)


def test_json_and_jsonl_records_are_documents(work):
    (work / "docs.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    write_jsonl(work / "docs.jsonl", [{"text": "three"}])
    assert [d.text for d in load_documents(work / "docs.json")[0]] == ["one", "two"]
    assert load_documents(work / "docs.jsonl")[0][0].where == f"{work / 'docs.jsonl'} line 1"


def test_long_documents_are_split_into_blocks_not_cut_and_short_ones_packed(corpus, tokenizer):
    examples = tokenize_documents(load_documents(corpus)[0], tokenizer)
    total = sum(len(e.input_ids) for e in examples)
    rows = list(stream_blocks(examples, max_length=16, packing=True))
    long = sum(len(e.input_ids) > 16 for e in examples)
    assert long and load_examples("cpt", corpus, tokenizer, 16, None)[2] == [
        f"{long} of {len(examples)} documents are longer than max_length=16 and were split into blocks (not cut)"]
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e.input_ids]
    assert all(len(r["input_ids"]) == 16 for r in rows[:-1]) and len(rows) == -(-total // 16)
    unpacked = list(stream_blocks(examples, max_length=16, packing=False))
    assert len(unpacked) == sum(-(-len(e.input_ids) // 16) for e in examples)


def test_packed_documents_do_not_see_or_predict_each_other(tokenizer):
    from lorakit.data.blocks import Example

    a, b = Example([5, 6, 7], [5, 6, 7], "a"), Example([8, 9], [8, 9], "b")
    (row,) = list(stream_blocks([a, b], max_length=8, packing=True))
    assert row["position_ids"] == [0, 1, 2, 0, 1]  # positions restart: a block-diagonal mask
    assert row["labels"] == [5, 6, 7, IGNORE, 9]  # b's first token is not predicted from a's end
    batch = Collator(pad_token_id=0)([row, {"input_ids": [1], "labels": [1], "position_ids": [0]}])
    assert batch["labels"][1].tolist() == [1, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3]


def test_packing_changes_no_logit_inside_a_document(tiny_base):
    """A document packed after another gives the same logits as alone: no attention leaks, in the
    model as lorakit sets it up for training (train mode, no KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.weights.loading import for_training

    model = for_training(AutoModelForCausalLM.from_pretrained(tiny_base)).train()
    first, second = [11, 12, 13, 14], [21, 22, 23]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second])).logits[0]
        packed = model(input_ids=torch.tensor([first + second]),
                       position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]])).logits[0, 4:]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setup, message", [
    (lambda w: (w / "empty").mkdir() or w / "empty", "folder holds no .txt"),
    (lambda w: w / "missing", "data path not found"),
    (lambda w: write_jsonl(w / "d.jsonl", [{"text": "ok"}, {"body": "x"}]), "d.jsonl line 2: no `text` field"),
    (lambda w: write_jsonl(w / "d.jsonl", [{"text": 3}]), "line 1: field `text` must be a string"),
    (lambda w: (w / "d.jsonl").write_text('{"text": "a"}\n{"text": \n') and w / "d.jsonl", "d.jsonl line 2: not valid JSON"),
    (lambda w: (w / "d.txt").write_bytes(b"caf\xe9") and w / "d.txt", "d.txt: not UTF-8"),
    (lambda w: (w / "d.txt").write_text("  \n") and w / "d.txt", "no non-empty documents"),
])
def test_bad_text_data_is_named(work, setup, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(")):
        load_documents(setup(work))


def test_data_text_command_writes_an_editable_json_list(corpus, work):
    result = lorakit("data", "text", corpus, "-o", work / "docs.json")
    assert "3 documents written" in result.stdout
    records = json.loads((work / "docs.json").read_text(encoding="utf-8"))
    assert [r["text"] for r in records] == DOCS
    assert [d.text for d in load_documents(work / "docs.json")[0]] == DOCS
    (work / "docs.json").write_text("my own edits")
    result = lorakit("data", "text", corpus, "-o", work / "docs.json", expect=1)
    assert "docs.json: exists; pass --overwrite" in result.stderr
    assert (work / "docs.json").read_text() == "my own edits"
    lorakit("data", "text", corpus, "-o", work / "docs.json", "--overwrite")
    assert len(json.loads((work / "docs.json").read_text(encoding="utf-8"))) == 3


def test_the_token_count_follows_batches_trained_not_batches_prefetched():
    collate = Collator(pad_token_id=0)
    for size in (3, 5, 2):
        collate([{"input_ids": [1] * size, "labels": [1] * size, "position_ids": list(range(size))}])
    assert [collate.tokens_in(n) for n in range(5)] == [0, 3, 8, 10, 10]


def test_a_byte_order_mark_is_dropped_and_nul_bytes_are_refused(work):
    (work / "bom.txt").write_bytes("\ufeffHello from Windows.".encode("utf-8"))
    (work / "bom.jsonl").write_bytes("\ufeff".encode("utf-8") + b'{"text": "first"}\n')
    assert [d.text for d in load_documents(work / "bom.txt")[0]] == ["Hello from Windows."]
    assert [d.text for d in load_documents(work / "bom.jsonl")[0]] == ["first"]
    (work / "zeros.txt").write_bytes(b"\0" * 64)
    with pytest.raises(LorakitError, match="zeros.txt: holds NUL bytes \\(the first at character 0\\)"):
        load_documents(work / "zeros.txt")


def test_a_jsonl_line_is_split_at_newlines_only(work):
    """U+2028 may stand unescaped inside a JSON string; str.splitlines() would cut the record there."""
    (work / "sep.jsonl").write_text('{"text": "one\u2028two"}\n', encoding="utf-8")
    assert [d.text for d in load_documents(work / "sep.jsonl")[0]] == ["one\u2028two"]
