"""A tokenizer as llama.cpp reads it from a GGUF file: the vocabulary in the family's kind ("gpt2": byte-level
BPE with its pre-tokenizer and merges; "llama": SentencePiece-style BPE with byte fallback, whose merge
order llama.cpp reads from the tokens' scores), special tokens, the chat template and the end of turn."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import Family


def write_vocabulary(writer, gguf, folder: Path, tokenizer, config: dict, family: Family, chat: bool) -> None:
    """Every id up to the model's vocab_size (unused ids as padding), special tokens as CONTROL, the
    special ids, BOS/EOS behaviour and template (gguf.SpecialVocab), and a chat model's end of turn."""
    from ..data.template import adds_bos, end_of_turn

    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(config["vocab_size"]):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            kinds.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            byte = family.gguf_vocab == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            kinds.append(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(family.gguf_vocab)
    if family.gguf_vocab == "gpt2":
        writer.add_tokenizer_pre(family.gguf_pre)
    else:
        writer.add_token_scores(_merge_scores(folder, tokens))
        writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=family.gguf_vocab == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)
    writer.add_add_bos_token(adds_bos(tokenizer) or _template_leads_with_bos(tokenizer))
    if chat:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)))


def _template_leads_with_bos(tokenizer) -> bool:
    """The chat template writes BOS first (Llama 3, Gemma): llama.cpp adds it where the template is not run."""
    from ..data.template import render

    bos = tokenizer.bos_token
    try:
        return bool(bos) and render(tokenizer, [{"role": "user", "content": "x"}]).startswith(bos)
    except Exception:  # noqa: BLE001  (no template: nothing leads with BOS)
        return False


def _merge_scores(folder: Path, tokens: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined token scores highest; HF's
    BPE merges the pair of lowest rank. A token made by merge r scores -r, so both merge in the same order
    (the gguf package's LlamaHfVocab scores every token -1000, which merges in another order)."""
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"].get("merges", [])
    made = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made.setdefault(left + right, -float(rank))
    return [made.get(token, 0.0) for token in tokens]
