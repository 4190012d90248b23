"""What the GGUF tests ask of llama.cpp, each in a fresh process (tests/test_gguf.py `_isolated`): a crash
inside llama.cpp (its q8_0 decode has segfaulted on CPUs with AMX) then fails one test with its reason, not
the whole run. Spawned, not forked: llama.cpp and torch both run OpenMP, whose thread pool a forked child
inherits in a state that hangs its first parallel loop. This module imports only llama.cpp and numpy, so a
task starts in a fraction of a second."""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def llama(path: str, **options):
    """llama.cpp on the file, closed after use (else its finalizer fails at interpreter exit)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, **{"n_ctx": 256, "n_threads": 2, "verbose": False, **options})
    try:
        yield llm
    finally:
        llm.close()


def greedy(path: str, prompts: list[list[int]], stops: list[int], new_tokens: int, **options) -> list[list[int]]:
    with llama(path, **options) as llm:
        answers = []
        for ids in prompts:
            llm.reset()
            out = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if token in stops or len(out) >= new_tokens:
                    break
            answers.append(out)
        return answers


def logits(path: str, prompts: list[list[int]], **options) -> list[np.ndarray]:
    """llama.cpp's next-token logits after each prompt."""
    with llama(path, logits_all=True, **options) as llm:
        found = []
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            found.append(np.array(llm.scores[llm.n_tokens - 1]))
        return found


def tokenize(path: str, texts: list[str]) -> list[list[int]]:
    with llama(path) as llm:
        return [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]


def chat(path: str, messages: list[dict], new_tokens: int, tools: list[dict] | None = None) -> tuple[str, str]:
    """The chat template in the file's metadata, and llama.cpp's own chat completion of `messages` (offered
    `tools`, which the file's template renders)."""
    with llama(path, n_ctx=1024 if tools else 256) as llm:
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                           max_tokens=new_tokens, tools=tools)
        return llm.metadata["tokenizer.chat_template"], reply["choices"][0]["message"]["content"]


def crash(path: str) -> None:
    """What a llama.cpp segfault does to its process (tests/test_gguf.py shows it fails one test only)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
