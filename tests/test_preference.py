"""Preference stages (dpo, kto, orpo, simpo): the data forms people have, bad records named before training, and
lorakit's packed log-probabilities, losses and gradients equal to trl's own DPOTrainer on the same pairs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import lorakit, write_jsonl, write_recipe
from preference_data import PAIRS, conversational_pairs, string_pairs

from lorakit.data.blocks import Collator, Example, pack_examples, pair_rows
from lorakit.data.tokenize import TokenizeSettings, tokenize_batch
from lorakit.errors import LorakitError
from lorakit.recipe import PrefSettings
from lorakit.stages import CHOSEN, REJECTED, stage
from lorakit.training.attention import use_packed
from lorakit.training.preference import PreferenceStep, answer_logps

SYSTEM = "You are a helpful assistant."


def examples_of(records, tokenizer, stage_name="dpo", max_length=96) -> list[Example]:
    settings = TokenizeSettings(stage_name, max_length, SYSTEM)
    out = tokenize_batch({"where": [f"pairs.jsonl line {i + 1}" for i in range(len(records))],
                          "raw": [json.dumps(r) for r in records]}, tokenizer, settings)
    for error in out["error"]:
        if error:
            raise LorakitError(error)
    return [Example(ids, labels, where, side=side) for ids, labels, where, side in
            zip(out["input_ids"], out["labels"], out["where"], out["side"])]


@pytest.fixture(scope="module")
def tokenizer(tiny_instruct):
    from lorakit.weights.loading import load_tokenizer

    return load_tokenizer(str(tiny_instruct))


def test_every_form_renders_the_same_tokens_as_sft_does(tokenizer):
    """Strings, trl's conversational form, messages + answers and trl's implicit prompt: the same examples, each the
    SFT rendering of prompt + answer with only the answer (and its end-of-turn) trained."""
    forms = [string_pairs(), conversational_pairs(),
             [{"messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r} for q, c, r in PAIRS],
             [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
               "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, c, r in PAIRS]]
    made = [[(e.input_ids, e.labels, e.side) for e in examples_of(form, tokenizer)] for form in forms]
    assert all(m == made[0] for m in made[1:])
    first = examples_of(string_pairs()[:1], tokenizer)
    assert [e.side for e in first] == [CHOSEN, REJECTED]
    question, chosen, _ = PAIRS[0]
    sft = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                         {"role": "assistant", "content": chosen}], tokenize=False)
    assert tokenizer.decode(first[0].input_ids) == sft
    assert tokenizer.decode([t for t in first[0].labels if t != -100]) == chosen + "<|im_end|>"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "line 1: no `rejected` field"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "line 1: `chosen` and `rejected` are the same answer"),
    ({"chosen": "Hello", "rejected": "Bye"}, "line 1: no `prompt` field"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "Bye"},
     "line 1: `chosen` must end with an assistant message"),
    ({"prompt": "word " * 200, "chosen": "Hello", "rejected": "Bye"},
     "line 1: the prompt fills data.max_length=96 tokens, leaving no room for the `chosen` answer"),
])
def test_a_bad_pair_is_named_by_record_and_field(tokenizer, record, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        examples_of([record], tokenizer)


def test_kto_records_are_labelled_and_get_a_mismatched_kl_answer(tokenizer):
    records = [{"prompt": q, "completion": c, "label": True} for q, c, _ in PAIRS[:2]]
    records.append({"prompt": PAIRS[2][0], "completion": PAIRS[2][2], "label": False})
    made = examples_of(records, tokenizer, "kto")
    assert [e.side for e in made] == [1, 2, 1, 2, 0, 2]
    # the KL sequence of record 2 is its prompt with record 1's answer
    assert PAIRS[0][1] in tokenizer.decode(made[3].input_ids) and PAIRS[1][0] in tokenizer.decode(made[3].input_ids)
    with pytest.raises(LorakitError, match="line 1: field `label` must be true"):
        examples_of([{"prompt": "Hi", "completion": "Yo", "label": "yes"}], tokenizer, "kto")


def _trl_trainer(model_path, tmp_path, loss_type, weights):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), beta=0.1,
                     loss_type=loss_type, loss_weights=weights, report_to="none", use_cpu=True, bf16=False,
                     max_length=None, gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return DPOTrainer(model, args=args, train_dataset=Dataset.from_list(conversational_pairs()),
                      processing_class=AutoTokenizer.from_pretrained(model_path),
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def _gradients(model) -> dict[str, torch.Tensor]:
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return found


@pytest.mark.parametrize("packing", [True, False])
def test_packed_log_probs_losses_and_gradients_equal_trls_dpo_trainer(tiny_instruct, tokenizer, tmp_path, packing):
    """The same pairs and the same adapter (its B moved off zero, so policy and reference differ): lorakit's packed
    (and unpacked) batch gives trl's DPOTrainer's loss, rewards, log-probabilities and LoRA gradients."""
    trainer = _trl_trainer(tiny_instruct, tmp_path, ["sigmoid", "sft"], [1.0, 0.5])
    model = trainer.model
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    # trl also trains the newline the template writes after <|im_end|>, which the model never generates; lorakit
    # trains the answer up to its end-of-turn, as SFT does. Compared on the same tokens:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after = (batch["input_ids"] == end).long().flip(1).cumsum(1).flip(1) == 0
    batch["completion_mask"] = batch["completion_mask"].masked_fill(after, 0)
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    trl_grads, trl_metrics = _gradients(model), {k: v[-1] for k, v in trainer._metrics["train"].items()}

    use_packed(model.base_model.model)
    pref = PrefSettings(beta=0.1, sft_weight=0.5)
    rows = pack_examples(examples_of(string_pairs(), tokenizer), 256, packing)  # rows of up to 256 tokens
    assert len(rows) < len(PAIRS) if packing else len(rows) == len(PAIRS)
    step = PreferenceStep(stage("dpo"), pref, chunked=True)
    fake = SimpleNamespace(model=model, accelerator=SimpleNamespace(gather=lambda t: t))
    loss = step.loss(fake, model, Collator(tokenizer.pad_token_id)(rows))
    loss.backward()
    ours, metrics = _gradients(model), step.logged("train")

    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name
    assert trl_grads.keys() == ours.keys() and len(ours) > 0
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_packed_rows_give_each_answer_its_unpacked_log_probability(tiny_instruct, tokenizer):
    """Attention never crosses answers in a packed row: every answer's log-probability is the one it has alone,
    through the chunked head and through the model's own logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_instruct, dtype=torch.float32).eval()
    use_packed(model)
    made = examples_of(string_pairs(), tokenizer)
    order = [e for row in pair_rows(made, [len(e.input_ids) for e in made], 256, True) for e in row]
    collate = Collator(tokenizer.pad_token_id)
    with torch.no_grad():
        rows = pack_examples(made, 256, True)
        assert len(rows) < len(PAIRS)
        packed, tokens = answer_logps(model, collate(rows))
        alone = torch.cat([answer_logps(model, collate(pack_examples(order[i:i + 2], 96, False)))[0]
                           for i in range(0, len(order), 2)])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert tokens.tolist() == [sum(label != -100 for label in e.labels[1:]) for e in order]


def test_preview_shows_each_pair_with_its_masks_and_a_bad_file_is_one_line(work, tiny_instruct):
    import gzip

    with gzip.open(work / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:  # any data input SFT takes
        f.writelines(json.dumps(r) + "\n" for r in string_pairs())
    recipe = write_recipe(work / "dpo.yaml", f"stage: dpo\nmodel: {tiny_instruct}\ndata: {{path: pairs.jsonl.gz, "
                                             f"max_length: 96}}\n")
    out = lorakit("preview", recipe, "--examples", "1").stdout
    assert "pairs.jsonl.gz line 1 (chosen)" in out and "pairs.jsonl.gz line 1 (rejected)" in out
    assert f"[[{PAIRS[0][1]}<|im_end|>]]" in out and f"[[{PAIRS[0][2]}<|im_end|>]]" in out
    write_jsonl(work / "bad.jsonl", [*string_pairs(), {"prompt": "Hi", "chosen": "Same", "rejected": "Same"}])
    result = lorakit("train", recipe, "data.path=bad.jsonl", expect=1)
    assert result.stderr.strip().splitlines()[-1] == ("error: bad.jsonl line 5: `chosen` and `rejected` are the same "
                                                      "answer; a pair must differ")
    assert not list((work / "adapters").rglob("*"))  # nothing written


def test_plan_counts_the_reference_copy_of_a_full_fine_tune(work, tiny_instruct):
    recipe = write_recipe(work / "dpo.yaml", f"stage: dpo\nmodel: {tiny_instruct}\nmethod: full\n"
                                             f"data: {{path: x.jsonl, max_length: 64}}\n")
    assert "reference model (frozen copy, full)" in lorakit("plan", recipe).stdout
    assert "reference model" not in lorakit("plan", recipe, "method=lora").stdout
    assert "reference model" not in lorakit("plan", recipe, "pref.reference=precomputed").stdout


@pytest.mark.parametrize("override, message", [
    ("pref.loss=sigmod", "pref.loss 'sigmod': expected one or more of sigmoid, hinge"),
    ("pref.beta=0", "pref.beta must be positive"),
    ("data.field=conversation", "data.field: a dpo record's fields are read by name"),
    ("stage=sft", "pref.* settings apply to the preference stages (dpo, kto, orpo, simpo), not to stage: sft"),
])
def test_a_bad_preference_setting_is_named(work, tiny_instruct, override, message):
    recipe = write_recipe(work / "dpo.yaml", f"stage: dpo\nmodel: {tiny_instruct}\ndata: {{path: x.jsonl}}\n"
                                             f"pref: {{beta: 0.2}}\n")
    assert message in lorakit("validate", recipe, override, expect=1).stderr
