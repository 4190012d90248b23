"""Prepared data is what the files say, or nothing: a damaged cache entry is named and rebuilt, a killed
preparation leaves no process behind, one huge record cannot take the machine's memory, and every broken
input is one line."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DOCS, lorakit, write_jsonl, write_recipe
from transformers import AutoTokenizer

from lorakit.data import cache
from lorakit.data.files import fingerprint_files
from lorakit.data.prepare import prepare
from lorakit.errors import LorakitError
from lorakit.recipe import load_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def _recipe(work, data, stage="cpt", **settings):
    settings = {"path": str(data), "max_length": 32, "cache_dir": str(work / "cache"), **settings}
    text = json.dumps({"stage": stage, "model": "m", "data": settings, "train": {"max_steps": 2}})
    return load_recipe(write_recipe(work / "r.yaml", text))


def _docs(n: int) -> list[dict]:
    return [{"text": f"{DOCS[i % len(DOCS)]} Record {i}."} for i in range(n)]


def _ids(dataset) -> list[list[int]]:
    return [list(r["input_ids"]) for r in dataset]


def test_a_flipped_bit_in_a_cached_row_is_named_and_the_entry_rebuilt(work, tokenizer, capsys):
    write_jsonl(work / "docs.jsonl", _docs(30))
    first = prepare(_recipe(work, work / "docs.jsonl"), tokenizer)
    expected = _ids(first.rows)
    arrow = first.location / "train.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the token ids
    arrow.write_bytes(bytes(data))
    capsys.readouterr()
    again = prepare(_recipe(work, work / "docs.jsonl"), tokenizer)
    err = capsys.readouterr().err
    assert "is damaged (train.arrow does not match its checksum); preparing it again" in err
    assert _ids(again.rows) == expected


@pytest.mark.parametrize("damage", ["truncate", "meta"])
def test_a_truncated_file_or_missing_meta_json_is_rebuilt_not_a_failure_for_ever(work, tokenizer, damage, capsys):
    write_jsonl(work / "docs.jsonl", _docs(30))
    first = prepare(_recipe(work, work / "docs.jsonl"), tokenizer)
    expected = _ids(first.rows)
    if damage == "truncate":
        arrow = first.location / "train.arrow"
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        (first.location / "meta.json").unlink()
    for _ in range(2):
        assert _ids(prepare(_recipe(work, work / "docs.jsonl"), tokenizer).rows) == expected
    assert "tokenizing" in capsys.readouterr().err


def test_folder_fingerprints_tell_names_from_contents(work):
    """a.txt "hallo kettle" + b.txt "world water" is not a.txt "hallo kettleb.txtworld water"."""
    (work / "one").mkdir()
    (work / "two").mkdir()
    (work / "one" / "a.txt").write_text("hallo kettle")
    (work / "one" / "b.txt").write_text("world water")
    (work / "two" / "a.txt").write_text("hallo kettleb.txtworld water")
    assert fingerprint_files(sorted((work / "one").iterdir())) != fingerprint_files([work / "two" / "a.txt"])


def test_a_long_document_is_tokenized_in_pieces_into_the_same_blocks(work, tokenizer):
    """A record far longer than a tokenizing piece (64K characters) makes exactly the rows that tokenizing
    it whole makes, with and without packing."""
    text = " ".join(DOCS[i % 2] + f" Part {i}." for i in range(1500))  # ~160K characters, three pieces
    assert len(text) > 2 * (1 << 16)
    write_jsonl(work / "long.jsonl", [{"text": text}, {"text": DOCS[0]}])
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    short = tokenizer(DOCS[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = _ids(prepare(_recipe(work, work / "long.jsonl"), tokenizer).rows)
    assert [t for r in packed for t in r] == whole + short and all(len(r) == 32 for r in packed[:-1])
    unpacked = _ids(prepare(_recipe(work, work / "long.jsonl", packing=False), tokenizer).rows)
    assert unpacked[:-1] == [whole[i:i + 32] for i in range(0, len(whole), 32)] and unpacked[-1] == short


def _peak_mib(work, tiny_base, line: str) -> float:
    """Peak RSS of `lorakit data prepare` on a one-record jsonl holding `line`."""
    (work / "one.jsonl").write_text(line + "\n", encoding="utf-8")
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: one.jsonl, num_proc: 1, "
                                           f"cache_dir: {work / 'cache'}}}\n")
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "lorakit", "data", "prepare",
                           str(recipe)], capture_output=True, text=True, cwd=work)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_one_huge_record_does_not_take_the_memory(work, tiny_base):
    """A single 30 MB jsonl line (CPT) stays within the README's bound: measured 1.08 GB peak (60 MB: 1.17 GB),
    most of it what preparing any data takes (the libraries, one batch of 256 pieces of 64K characters).
    Tokenized whole, a 200 MB record took 23.4 GB, over a hundred bytes per byte: 30 MB would need 3.5 GB."""
    line = json.dumps({"text": " ".join(DOCS[i % 2] for i in range(310_000))})
    assert len(line) > 30e6
    peak = _peak_mib(work, tiny_base, line)
    assert peak < 1536, f"a 30 MB record peaked at {peak:.0f} MiB"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_killed_preparation_leaves_no_workers_and_no_lock(work, tiny_base):
    """SIGKILL during a 2-process preparation: its datasets.map workers die with it, and the next run
    prepares at once instead of waiting for ever on a lock the orphans held."""
    write_jsonl(work / "docs.jsonl", _docs(60_000))
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: docs.jsonl, num_proc: 2, "
                                           f"cache_dir: {work / 'cache'}}}\n")
    command = [sys.executable, "-m", "lorakit", "data", "prepare", str(recipe)]
    first = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 and time.monotonic() < deadline and first.poll() is None:
        workers = _children(first.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the preparation never started its workers"
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    assert [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)] == []
    again = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_wait_for_the_lock_says_who_holds_it(work, tokenizer):
    """Another process preparing the same data: the wait names its PID and command, then goes on."""
    write_jsonl(work / "docs.jsonl", _docs(5))
    recipe = _recipe(work, work / "docs.jsonl")
    key_files = []
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(2)"), str(work / "x.lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    key_files.append(work / "x.lock")
    messages = []
    import lorakit.data.cache as module

    original = module.say
    module.say = messages.append
    try:
        with module.preparing(module.open_root(work), "x") as partial:
            assert partial is not None
    finally:
        module.say = original
    holder.wait()
    assert messages and f"waiting for process {holder.pid}" in messages[0] and "-c" in messages[0]
    assert prepare(recipe, tokenizer).stats["rows"] > 0


def test_on_a_cache_folder_machines_share_only_this_machines_dead_preparations_are_swept(work, tokenizer):
    """A preparation's folder carries its PID and host: another machine's PID says nothing here, so its work in
    progress stays while this machine's killed ones go."""
    from lorakit.system.processes import HOST

    root = cache.open_root(work / "cache")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, theirs = root / f".k.partial-{dead.pid}@{HOST}", root / f".k.partial-{dead.pid}@node-7.cluster"
    mine.mkdir(), theirs.mkdir()
    write_jsonl(work / "docs.jsonl", _docs(5))
    assert prepare(_recipe(work, work / "docs.jsonl"), tokenizer).stats["rows"] > 0
    assert not mine.exists() and theirs.is_dir()


@pytest.mark.parametrize("case, message", [
    ("zst-truncated", "truncated or empty file"),
    ("gz-truncated", "Compressed file ended"),
    ("bad-byte-line-5", "docs.jsonl line 5: not UTF-8 text"),
    ("second-txt-not-utf8", "b.txt: not UTF-8 text"),
    ("fifo", "neither a regular file nor a folder"),
    ("cache-dir-is-a-file", "data.cache_dir"),
])
def test_broken_inputs_are_one_line(work, tokenizer, case, message):
    import zstandard

    records = "".join(json.dumps(d) + "\n" for d in _docs(400)).encode()
    path, cache_dir = work / "docs.jsonl", str(work / "cache")
    if case == "zst-truncated":
        path = work / "docs.jsonl.zst"
        compressed = zstandard.ZstdCompressor().compress(records)
        path.write_bytes(compressed[: len(compressed) // 2])
    elif case == "gz-truncated":
        path = work / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(records)[:200])
    elif case == "bad-byte-line-5":
        lines = records.split(b"\n")
        lines[4] = lines[4].replace(b"Record", b"Rec\xffrd")
        path.write_bytes(b"\n".join(lines))
    elif case == "second-txt-not-utf8":
        path = work / "texts"
        path.mkdir()
        (path / "a.txt").write_text("fine text")
        (path / "b.txt").write_bytes(b"bad \xff byte")
    elif case == "fifo":
        path = work / "pipe"
        os.mkfifo(path)
    else:
        path.write_bytes(records)
        cache_dir = str(work / "afile")
        (work / "afile").write_text("not a folder")
    with pytest.raises(LorakitError, match=message) as raised:
        prepare(_recipe(work, path, cache_dir=cache_dir), tokenizer)
    assert "\n" not in str(raised.value)


def test_a_glob_through_a_symlink_loop_ends(work, tokenizer):
    (work / "corpus" / "sub").mkdir(parents=True)
    write_jsonl(work / "corpus" / "sub" / "a.jsonl", _docs(3))
    (work / "corpus" / "sub" / "loop").symlink_to(work / "corpus")
    start = time.monotonic()
    prepared = prepare(_recipe(work, f"{work}/corpus/**/*.jsonl"), tokenizer)
    assert prepared.stats["examples"] == 3 and time.monotonic() - start < 30


def test_data_prepare_cli_names_a_damaged_entry(work, tiny_base):
    write_jsonl(work / "docs.jsonl", _docs(20))
    recipe = write_recipe(work / "r.yaml", f"stage: cpt\nmodel: {tiny_base}\ndata: {{path: docs.jsonl, "
                                           f"cache_dir: {work / 'cache'}}}\n")
    lorakit("data", "prepare", recipe)
    (entry,) = [p for p in (work / "cache").iterdir() if p.is_dir()]
    (entry / "train.arrow").write_bytes(b"garbage")
    result = lorakit("data", "prepare", recipe)
    assert "is damaged" in result.stderr and cache.damage(entry) is None


def test_a_long_document_is_held_out_or_kept_whole(work, tokenizer):
    """data.eval_split draws documents, not the pieces a long one is tokenized in."""
    text = " ".join(DOCS[0] + f" Part {i}." for i in range(2500))  # about four pieces
    write_jsonl(work / "long.jsonl", [{"text": text}] + [{"text": f"{DOCS[1]} {i}"} for i in range(3)])
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for seed in range(4):  # whichever side the long document falls on, it is whole there
        recipe = load_recipe(write_recipe(work / "r.yaml", json.dumps({
            "stage": "cpt", "model": "m", "train": {"seed": seed},
            "data": {"path": "long.jsonl", "max_length": 32, "eval_split": 0.25, "cache_dir": str(work / "cache")}})))
        prepared = prepare(recipe, tokenizer)
        sides = [[t for r in rows for t in r] for rows in (_ids(prepared.rows), _ids(prepared.eval_rows))]
        holding = [side for side in sides if whole[:50] == side[:50] or any(
            side[i:i + 50] == whole[:50] for i in range(0, len(side) - 50))]
        assert len(holding) == 1 and len(holding[0]) >= len(whole)
