"""Preference data: records -> a prompt (messages) and its answers -> examples rendered as SFT renders them.

Forms read (trl's and LLaMA-Factory's):
    {"prompt": "...", "chosen": "...", "rejected": "..."}                     strings
    {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}   trl's conversational form
    {"messages": [messages], "chosen": ..., "rejected": ...}                   a conversation and two answers
    {"chosen": [whole conversation], "rejected": [whole conversation]}         trl's implicit prompt
    {"prompt": ..., "completion": ..., "label": true|false}                    KTO's unpaired form

Each answer is rendered with its prompt through the model's chat template by chat.tokenize_conversation, so
the tokens, the system prompt, BOS and the end-of-turn are exactly SFT's (never doubled); only the final
assistant turn is trained.
"""

from __future__ import annotations

from ..errors import LorakitError
from ..stages import CHOSEN, KL, REJECTED
from .blocks import IGNORE, Example
from .chat import checked_messages, tokenize_conversation
from .files import Record, check_unicode
from .template import Style, with_system

READ = {"pairs": {"prompt", "messages", "chosen", "rejected"}, "unpaired": {"prompt", "messages", "completion", "label"}}


def to_preference(record: Record, kind: str) -> tuple[list[dict], list[tuple[int, dict]], list[str]]:
    """The record's prompt (messages ending with a user turn), its answers as (side, assistant message), and the
    fields lorakit did not read."""
    value, where = record.value, record.where
    if not isinstance(value, dict):
        raise LorakitError(f"{where}: expected an object with `prompt`, `chosen` and `rejected`, got "
                           f"{type(value).__name__}")
    names = ("chosen", "rejected") if kind == "pairs" else ("completion",)
    for name in (*names, *(("label",) if kind == "unpaired" else ())):
        if value.get(name) is None:
            form = "`prompt`, `chosen` and `rejected`" if kind == "pairs" else "`prompt`, `completion` and `label`"
            raise LorakitError(f"{where}: no `{name}` field (a preference record has {form})")
    answers = {name: _answer(value[name], where, name) for name in names}
    prompt = _prompt(value, answers, where)
    unread = [name for name in value if name not in READ[kind]]
    if kind == "pairs":
        chosen, rejected = answers["chosen"][1], answers["rejected"][1]
        if chosen == rejected:
            raise LorakitError(f"{where}: `chosen` and `rejected` are the same answer; a pair must differ")
        return prompt, [(CHOSEN, chosen), (REJECTED, rejected)], unread
    label = value["label"]
    if not isinstance(label, bool):
        raise LorakitError(f"{where}: field `label` must be true (desirable) or false, got {label!r}")
    return prompt, [(CHOSEN if label else REJECTED, answers["completion"][1])], unread


def _answer(value, where: str, name: str) -> tuple[list[dict], dict]:
    """(the messages before it, when the answer came as a whole conversation; the assistant message)."""
    if isinstance(value, str):
        check_unicode(value, where, name)
        return [], {"role": "assistant", "content": value}
    messages = checked_messages([value] if isinstance(value, dict) else value, where, name, answer=False)
    if messages[-1]["role"] != "assistant":
        raise LorakitError(f"{where}: `{name}` must end with an assistant message, got {messages[-1]['role']}")
    return messages[:-1], messages[-1]


def _prompt(value: dict, answers: dict, where: str) -> list[dict]:
    field = "prompt" if "prompt" in value else "messages" if "messages" in value else None
    if field is None:  # trl's implicit prompt: the conversation shared by the answers, before them
        heads = [before for before, _ in answers.values()]
        if not heads[0] or any(h != heads[0] for h in heads):
            raise LorakitError(f"{where}: no `prompt` field (nor `messages`, nor answers that are whole "
                               f"conversations sharing their start)")
        prompt = heads[0]
    elif isinstance(value[field], str):
        check_unicode(value[field], where, field)
        prompt = [{"role": "user", "content": value[field]}]
    else:
        prompt = checked_messages(value[field], where, field, answer=False)
    if prompt[-1]["role"] != "user":
        raise LorakitError(f"{where}: `{field or 'chosen'}` must end with a user message, got {prompt[-1]['role']}")
    return prompt


def tokenize_answers(tokenizer, prompt: list[dict], answers: list[tuple[int, dict]], system_prompt: str | None,
                     max_length: int, where: str, style: Style) -> list[Example]:
    """One example per answer: the prompt and the answer as SFT renders them, only the answer trained."""
    examples = []
    for side, answer in answers:
        messages = with_system([*prompt, answer], system_prompt)
        example = tokenize_conversation(tokenizer, messages, max_length, where, style)[-1]  # the one ending here
        labels = _last_turn(example.labels)
        if all(label == IGNORE for label in labels):
            name = {CHOSEN: "chosen", REJECTED: "rejected", KL: "completion"}[side]
            raise LorakitError(f"{where}: the prompt fills data.max_length={max_length} tokens, leaving no room for "
                               f"the `{name}` answer; raise max_length or shorten the prompt")
        examples.append(Example(example.input_ids, labels, where, side=side))
    return examples


def _last_turn(labels: list[int]) -> list[int]:
    """Only the final assistant turn trained: the last run of labelled tokens (earlier assistant turns of a
    multi-turn prompt are context, as in trl)."""
    start = max((i for i, label in enumerate(labels) if label != IGNORE), default=None)
    if start is None:
        return labels
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:]


def with_kl(records: list[tuple[list[dict], list[tuple[int, dict]]]]) -> list[list[tuple[int, dict]]]:
    """KTO: each record's answer and, as its KL sequence, the previous record's answer to this prompt (the
    completions of a batch cycled by one, as trl's KTOTrainer builds them)."""
    return [[answers[0], (KL, records[i - 1][1][0][1])] for i, (_, answers) in enumerate(records)]
