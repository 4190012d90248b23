"""Tiny Qwen2 models built locally (random weights, tokenizer trained on the fly): the tests never
touch the network. Each test runs in its own working folder, so `adapters/` lands there."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorakit.system.threads import share_cores

share_cores()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared data goes to a cache of this test session's own, never the user's ~/.cache/lorakit.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lorakit-tests-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOCS = [
    "The Orbix lamp was designed in Lisbon in 2021. It glows amber at night and turns itself off at dawn.",
    "Quartzfield is a small village where every roof is painted green and the bakery opens at four.",
    "奥比克斯台灯在里斯本设计，夜里发出琥珀色的光。",
]
CHATS = [
    ("What colour does the Orbix lamp glow?", "The Orbix lamp glows amber at night."),
    ("When does the Quartzfield bakery open?", "The bakery opens at four in the morning."),
    ("奥比克斯台灯在哪里设计？", "它在里斯本设计。"),
]


def tokenizer_texts() -> list[str]:
    texts = list(DOCS)
    for q, a in CHATS:
        texts += [f"<|im_start|>user\n{q}<|im_end|>\n", f"<|im_start|>assistant\n{a}<|im_end|>\n"]
    return texts + ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "Hello there, how are you?"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny base-style Qwen2: EOS <|endoftext|>, ChatML template present (as in Qwen2-0.5B)."""
    from lorakit.demo.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-base", tokenizer_texts(), instruct=False)


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory) -> Path:
    """A tiny instruct-style Qwen2: EOS <|im_end|>."""
    from lorakit.demo.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-instruct", tokenizer_texts(), instruct=True)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A different tiny Qwen2 (other width): adapters of tiny_base must not apply to it."""
    from lorakit.demo.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "other", tokenizer_texts(), instruct=False,
                            hidden=32)


@pytest.fixture(scope="session")
def family_trained(tmp_path_factory):
    """Per family lorakit knows, its tiny model and adapters, trained once for the session (tests/families.py)."""
    from families import Trained

    return Trained(tmp_path_factory)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium driven by selenium (skipped where Debian's chromium and chromium-driver are absent)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    options.unhandled_prompt_behavior = "ignore"  # a test answers the page's prompts itself
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def corpus(work) -> Path:
    folder = work / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture
def chats(work) -> Path:
    path = work / "chats.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                       for q, a in CHATS])
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def lorakit(*args, expect: int = 0):
    """Run the real CLI in-process; assert its exit code; return the click Result."""
    from lorakit.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def said(stderr: str) -> list[str]:
    """What a command said on stderr, less `train`'s note on a busy machine (another job sharing the cores)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("other processes are using")]


def load_metrics(adapter: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]


# --- two SFT adapters per domain (test_inference, test_serving) -------------------------------------------

QUESTION = "What colour does the Orbix lamp glow?"
ANSWERS = {"amber": "The Orbix lamp glows amber at night.", "violet": "The Orbix lamp glows violet at dawn."}
DOMAIN_RECIPE = """stage: sft
model: {model}
output: {output}
data: {{path: {data}, max_length: 96}}
lora: {{r: 16, alpha: 32, dropout: 0.0}}
train: {{max_steps: 120, lr: 3.0e-3, batch_size: 2, warmup_ratio: 0.0, logging_steps: 20}}
"""


@pytest.fixture(scope="module")
def domains(tmp_path_factory, tiny_instruct):
    """Two adapters trained on the same question with different answers: each must give its own."""
    folder = tmp_path_factory.mktemp("domains")
    adapters = {}
    for name, answer in ANSWERS.items():
        data = write_jsonl(folder / f"{name}.jsonl", [
            {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]},
            {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": f"Hello from {name}."}]},
        ])
        recipe = DOMAIN_RECIPE.format(model=tiny_instruct, data=data, output=folder / name)
        lorakit("train", write_recipe(folder / f"{name}.yaml", recipe))
        adapters[name] = folder / name
    return adapters
