"""The README's first command ends in `lorakit demo`: it must run offline and show learning."""

import pytest
from conftest import lorakit

pytestmark = pytest.mark.slow  # every test here trains a model


def test_the_demo_trains_both_stages_and_the_answers_move_to_the_training_data(work):
    out = lorakit("demo", "--workdir", work / "demo").stdout
    assert "after:  'The Lumora K2 holds 1.2 litres of water.'" in out
    assert "after:  'Write to help@brightwell.example or use the code LUMORA-CARE in the app.'" in out
    assert "after:  '加入一份白醋和三份水，烧开一次，再冲洗两遍。'" in out
    assert "after:  ' a smart kettle made by Brightwell Labs in Hangzhou." in out
    assert out.count("before: 'The Lumora K2 holds") == 0
    assert (work / "adapters" / "demo-sft" / "parent" / "manifest.json").is_file()
