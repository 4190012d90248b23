"""Commands that use a trained model: generate, chat, eval, compare, serve."""

from __future__ import annotations

import re

import click

from ..errors import LorakitError
from .options import open_session, placement, sampling_options, session_options


@click.command()
@click.argument("prompt")
@click.option("--model", help="Base model: hub id or folder (default: the adapter's base).")
@click.option("--adapter", type=click.Path(file_okay=False), help="Adapter (or full model) folder to apply.")
@sampling_options
def generate(prompt, model, adapter, sampling, force):
    """Continue PROMPT as raw text."""
    from ..inference.generate import generate_text
    from ..weights.folders import load_for_inference

    if not prompt:
        raise LorakitError("the prompt is empty: give the text to continue")
    lm, tokenizer, _ = load_for_inference(model, adapter, *placement(), force=force)
    click.echo(prompt + generate_text(lm, tokenizer, prompt, sampling))


@click.command()
@click.option("--model", help="Base model: hub id or folder (default: the first adapter's base).")
@click.option("--adapter", "adapters", multiple=True,
              help="Adapter folder, or NAME=FOLDER; repeat to load several and switch with /adapter NAME.")
@click.option("--prompt", help="Answer this one message (with the first adapter) and exit.")
@click.option("--system", help="System prompt (default: the one the adapter was trained with).")
@click.option("--tools", "tools_file", type=click.Path(dir_okay=False),
              help="JSON file of the tools the model may call (OpenAI's function list); you type each call's result.")
@sampling_options
def chat(model, adapters, prompt, system, tools_file, sampling, force):
    """Chat with a model and its adapters; one-shot with --prompt, interactive otherwise."""
    tools = _read_tools(tools_file)
    session = open_session(model, adapters, force)
    if prompt is not None:
        reply = _reply(session, [{"role": "user", "content": prompt}], system, sampling, tools)
        click.echo("\n".join(filter(None, [reply["content"], *map(_shown, reply.get("tool_calls", []))])))
        return
    _chat_loop(session, system, sampling, tools)


def _read_tools(path: str | None) -> list[dict] | None:
    import json
    from pathlib import Path

    from ..data.tools import checked_tools

    if path is None:
        return None
    try:
        return checked_tools(json.loads(Path(path).read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LorakitError(f"--tools {path}: cannot read a JSON list of tools ({exc})") from None


def _reply(session, messages, system, sampling, tools=None) -> dict:
    """The assistant's message: its content, and its tool calls where the reply is calls of `tools`; its
    reasoning, where the template writes a reasoning block, goes to stderr (a non-empty one)."""
    from ..inference.generate import chat_reply
    from ..inference.reasoning import split
    from ..inference.toolcalls import tool_use

    style = session.style()
    use = tool_use(session.tokenizer, style, tools, None)
    with session.active() as lm:
        text = chat_reply(lm, session.tokenizer, messages, system if system is not None else session.system_prompt(),
                          sampling, style, use.rendered)
    reasoning, answer = split(text, style.block, not style.kwargs())
    if reasoning:
        click.echo(f"(reasoning) {reasoning}", err=True)
    parsed = use.format.parse(answer, use.names) if use.format else None
    if parsed and parsed[1]:
        return {"role": "assistant", "content": parsed[0], "tool_calls": [
            {"type": "function", "function": call} for call in parsed[1]]}
    return {"role": "assistant", "content": answer}


def _shown(call: dict) -> str:
    """A tool call as a person reads it: get_order(order_id="A12")."""
    import json

    function = call["function"]
    arguments = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in function["arguments"].items())
    return f"-> {function['name']}({arguments})"


def _chat_loop(session, system, sampling, tools=None) -> None:
    import time

    history: list[dict] = []
    adapters = [n for n in session.names if n != "base"]
    who = f"adapter {session.current}" if session.current else "the base model"
    if len(adapters) > 1:
        who += f" (the first of {len(adapters)}: {', '.join(adapters)})"
    click.echo(f"chat with {who}: an empty line, /quit or Ctrl-D ends, /reset forgets, /adapters lists, "
               f"/adapter NAME switches and starts a new conversation (none: the bare base)"
               + (f"; tools: {', '.join(t['function']['name'] for t in tools)} (you type each call's result)"
                  if tools else ""))
    while True:
        try:
            line = click.prompt("you", default="", show_default=False, prompt_suffix="> ").strip()
        except click.exceptions.Abort:  # Ctrl-D / Ctrl-C ends the session quietly
            return
        if not line or line in ("/quit", "/exit", "/bye"):
            return
        if line == "/reset":
            history = []
        elif line == "/adapters":
            click.echo("  ".join(f"*{n}" if n == (session.current or "base") else n for n in session.names))
        elif line.startswith("/adapter"):
            start = time.perf_counter()
            try:
                session.use(line.removeprefix("/adapter").strip() or None)
            except LorakitError as exc:
                click.echo(f"error: {exc}")
                continue
            took = 1000 * (time.perf_counter() - start)
            # A new conversation: the next adapter would otherwise answer a history another one wrote.
            click.echo(f"using {session.current or 'the base model'} ({took:.1f} ms)"
                       + ("; the conversation starts anew" if history else ""))
            history = []
        elif re.fullmatch(r"/[a-z]+", line):  # a mistyped command, not a message for the model
            click.echo(f"unknown command {line}; commands: /reset, /adapters, /adapter NAME, /quit")
        else:
            history.append({"role": "user", "content": line})
            if not _answer(session, history, system, sampling, tools):
                return


def _answer(session, history, system, sampling, tools) -> bool:
    """The assistant's turns until one is not calls: each call shown, and its result typed by the person
    (Ctrl-D: the session ends, False)."""
    while True:
        history.append(_reply(session, history, system, sampling, tools))
        if history[-1]["content"]:
            click.echo(f"assistant> {history[-1]['content']}")
        for call in history[-1].get("tool_calls", []):
            click.echo(f"assistant> {_shown(call)}")
            try:
                result = click.prompt(f"{call['function']['name']} result", prompt_suffix="> ")
            except click.exceptions.Abort:
                return False
            history.append({"role": "tool", "content": result})
        if not history[-1]["role"] == "tool":
            return True


@click.command("eval")
@session_options
@click.option("--data", "data_path", required=True, type=click.Path(), help="Raw text or conversations.")
@click.option("--max-length", type=click.IntRange(min=8), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
def eval_command(model, adapters, force, data_path, max_length, batch_size):
    """Perplexity of the base and of each adapter on DATA, side by side."""
    from ..inference.evaluate import format_perplexities, perplexities

    session = open_session(model, adapters, force)
    click.echo(format_perplexities(perplexities(session, data_path, max_length, batch_size)))


@click.command()
@session_options
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help=".txt (one per line) or .jsonl.")
@click.option("-o", "--output", default="compare.md", show_default=True, type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(["auto", "chat", "text"]), default="auto", show_default=True,
              help="auto: chat when an adapter is a chat (SFT) adapter, else text continuation.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def compare(model, adapters, force, prompts, output, mode, sample, max_new_tokens, seed):
    """Answer the same prompts with the base and each adapter; write the side-by-side as Markdown."""
    from pathlib import Path

    from ..inference.evaluate import answers, markdown_report, read_prompts
    from ..inference.generate import Sampling
    from ..stages import stage as stage_of

    session = open_session(model, adapters, force)
    if mode == "auto":
        stages = {m.stage for m in session.manifests.values() if m}
        mode = "chat" if any(stage_of(s).chat for s in stages) or not stages and session.tokenizer.chat_template \
            else "text"
    sampling = Sampling(max_new_tokens=max_new_tokens, greedy=not sample, seed=seed)
    texts = read_prompts(prompts)
    table = answers(session, texts, sampling, mode)
    Path(output).write_text(markdown_report(session.base_name, texts, table, sampling, mode), encoding="utf-8")
    click.echo(f"{len(texts)} prompts x {len(table)} models written to {output}")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@session_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (local only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-input-tokens", type=click.IntRange(min=1), help="Refuse longer prompts (default: the model's context).")
@click.option("--max-body", default="1MB", show_default=True, help="Refuse larger request bodies (413).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests generating at once; more wait for a place (lorakit engine).")
@click.option("--engine", type=click.Choice(["lorakit", "vllm"]), default="lorakit", show_default=True,
              help="lorakit: this process generates; vllm: vLLM serves, lorakit in front (see README).")
@click.option("--vllm", "vllm_program", help="The vllm program (default: $LORAKIT_VLLM, or vllm on PATH).")
@click.option("--api-key", envvar="LORAKIT_API_KEY", help="Every request must send Authorization: Bearer KEY "
              "(default: $LORAKIT_API_KEY; the page at / asks for it).")
@click.option("--watch", type=click.Path(exists=True, file_okay=False), help="Serve every finished adapter that "
              "appears in this folder, under its folder's name (lorakit engine).")
@click.pass_context
def serve(ctx, model, adapters, force, host, port, max_input_tokens, max_body, max_batch, engine, vllm_program,
          api_key, watch):
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a page at /; `model`
    picks the adapter. With --engine vllm, further options (--tensor-parallel-size 2 ...) go to vLLM."""
    from ..training.plan import parse_size

    body_limit = int(parse_size(max_body, "--max-body"))
    if ctx.args and engine != "vllm":
        raise LorakitError(f"unknown option {ctx.args[0]} (options after the known ones go to vLLM: --engine vllm)")
    if engine == "vllm" and watch:
        raise LorakitError("--watch serves with the lorakit engine; with vLLM, publish adapters with "
                           "lorakit train --publish URL (or POST /v1/load_lora_adapter)")
    if engine == "vllm":
        from ..inference.session import parse_entries
        from ..inference.vllm import serve_with_vllm

        return serve_with_vllm(parse_entries(adapters), model, host, port, vllm=vllm_program,
                               engine_options=tuple(ctx.args), max_body=body_limit, force=force, api_key=api_key)
    from ..inference.serve import create_app
    from ..inference.serve import serve as run_server

    session = open_session(model, adapters, force)
    click.echo(f"serving {', '.join(session.names)} on http://{host}:{port}/v1 (and a page at /)", err=True)
    app = create_app(session, max_input_tokens, max_body=body_limit, max_batch=max_batch, api_key=api_key,
                     watch=watch)
    run_server(app, host, port, keyed=bool(api_key))


COMMANDS = [generate, chat, eval_command, compare, serve]
