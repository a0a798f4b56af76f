"""Model card: Hub-valid front matter, growth-history table, no secrets."""

import pytest
from huggingface_hub import ModelCard

from progtrain.card import parse_front_matter, render_model_card
from progtrain.errors import ProgtrainConfigError
from progtrain.growth import grow
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def grown_gpt2():
    m = tiny_model("gpt2")
    r1 = grow(m, hidden_size=64, num_layers=3, verify=False)
    r2 = grow(r1.model, intermediate_size=200, init="random", verify=False)
    return r2.model, [r1.record, r2.record]


def table_rows(card: str, header_start: str = "| stage |") -> list[list[str]]:
    lines = card.splitlines()
    i = next(j for j, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for l in lines[i + 2 :]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip().strip("|").split("|")])
    return rows


def test_front_matter_is_hub_metadata(grown_gpt2):
    model, history = grown_gpt2
    card = render_model_card(config=model.config, growth_history=history, base_model="openai-community/gpt2",
                             datasets=["karpathy/tiny_shakespeare"])
    meta = parse_front_matter(card)
    assert meta["library_name"] == "transformers"
    assert "progressive-training" in meta["tags"] and "gpt2" in meta["tags"]
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["datasets"] == ["karpathy/tiny_shakespeare"]
    assert meta["pipeline_tag"] == "text-generation"
    # huggingface_hub's own parser reads the same metadata
    hub = ModelCard(card)
    assert hub.data.library_name == "transformers" and hub.data.base_model == "openai-community/gpt2"
    assert hub.data.pipeline_tag == "text-generation" and "progressive-training" in hub.data.tags


def test_history_table_matches_records(grown_gpt2):
    model, history = grown_gpt2
    card = render_model_card(config=model.config, growth_history=history)
    rows = table_rows(card)
    assert len(rows) == len(history) + 1
    # columns: stage name hidden layers heads kv FFN params steps tokens FLOPs init val
    assert rows[0][2:7] == ["32", "2", "4", "4", "128"]
    assert rows[0][7] == f"{history[0]['params_before']:,}"
    assert rows[1][2:4] == ["64", "3"] and rows[1][11] == "function_preserving"
    assert rows[2][6] == "200" and rows[2][11] == "random"
    assert rows[2][7] == f"{history[1]['params_after']:,}" == f"{model.num_parameters():,}"
    assert "approximate" in card  # the random-init growth is reported as not exact


def test_stage_rows_render_steps_tokens_flops_loss(grown_gpt2):
    model, history = grown_gpt2
    sizes = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 200}
    stages = [
        {"stage": 0, "name": "small", "sizes": {**sizes, "hidden_size": 32}, "params": 1000, "steps": 200,
         "tokens": 409600, "flops": 1.5e12, "init": "-", "val_loss": 5.4321},
        {"stage": 1, "name": "wide", "sizes": sizes, "params": 2000, "steps": 300, "tokens": 614400,
         "flops": 3.25e13, "init": "function_preserving", "val_loss": None},
    ]
    card = render_model_card(config=model.config, growth_history=history, stages=stages,
                             final_metrics={"val_loss": 4.5})
    rows = table_rows(card)
    assert rows[0] == ["0", "small", "32", "3", "4", "4", "200", "1,000", "200", "409,600", "1.5e+12", "-", "5.4321"]
    assert rows[1][1] == "wide" and rows[1][10] == "3.25e+13" and rows[1][12] == "-"
    assert table_rows(card, "| metric |") == [["val_loss", "4.5000"]]


@pytest.mark.parametrize("head,tag", [(True, "fill-mask"), (False, "feature-extraction")])
def test_pipeline_tag_follows_architecture(head, tag, tmp_path):
    m = tiny_model("bert", head=head)
    m.config.architectures = [type(m).__name__]
    card = render_model_card(config=m.config.to_dict(), growth_history=[], base_model=str(tmp_path))
    meta = parse_front_matter(card)
    assert meta["pipeline_tag"] == tag
    assert "base_model" not in meta  # a local path is not a Hub id
    assert "| - |" in card  # empty history still renders a (one-row) table


def test_card_never_contains_tokens(grown_gpt2, monkeypatch):
    secret = "hf_" + "Ab3" * 12
    other = "hf_" + "Zz9" * 11
    monkeypatch.setenv("HF_TOKEN", secret)
    model, history = grown_gpt2
    hist = [dict(history[0], hub_token="plain-secret-value", note=f"pushed with {secret}"), history[1]]
    card = render_model_card(config=model.config, growth_history=hist, final_metrics={"auth": other},
                             extra_markdown=f"token was {secret}", model_name="me/model")
    assert secret not in card and other not in card and "plain-secret-value" not in card
    assert "[redacted]" in card


def test_parse_front_matter_errors():
    assert parse_front_matter("# no front matter\n") == {}
    assert parse_front_matter("---\n---\ntext") == {}
    with pytest.raises(ProgtrainConfigError, match="never closed"):
        parse_front_matter("---\nlibrary_name: transformers\n")
    with pytest.raises(ProgtrainConfigError, match="not valid YAML"):
        parse_front_matter("---\ntags: [a, b\n---\n")
    with pytest.raises(ProgtrainConfigError, match="mapping"):
        parse_front_matter("---\n- a\n- b\n---\n")
    with pytest.raises(ProgtrainConfigError, match="growth_history"):
        render_model_card(config={}, growth_history={"history": []})
