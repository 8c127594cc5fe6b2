"""docs/configuration-reference.md is generated from the config dataclasses' field comments: a key added, a
default or a comment changed without regenerating the page fails here."""
from __future__ import annotations

from orchestrator.config.docgen import COMMAND, PAGE, field_comments, render


def test_the_committed_configuration_reference_is_current():
    assert PAGE.is_file() and PAGE.read_text() == render(), (
        f"{PAGE} is stale: regenerate it with `{COMMAND}` and commit it")


def test_field_comments_take_continuation_lines_and_blocks_above_fields():
    from orchestrator.config import DataConfig, ModelConfig, TrainConfig

    train = field_comments(TrainConfig)
    assert train["freeze"].endswith("checked against the model before start")      # continued twice
    assert train["mixed_precision"].startswith("bf16 autocast of the forward")
    assert "lr" not in train                                                        # no comment written
    assert field_comments(ModelConfig)["hf_path"].startswith("A Hugging Face MoE model instead of the native one")
    assert field_comments(ModelConfig)["hf_config"] == "see `hf_path` above"
    assert field_comments(DataConfig)["tokenizer"].startswith("Tokenizers and post-training")
