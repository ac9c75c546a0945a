import pytest

from cliplite_dist.config import ConfigError, load_config, parse_override
from pathlib import Path

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.data.train and cfg.train.steps > 0


def test_overrides_are_typed_and_nested(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: /x/{0..3}.tar\n")
    cfg = load_config(recipe, ["objective.name=infonce", "data.batch_size=256", "optim.lr=1e-4",
                               "engine.zero_stage=3", "data.train='s3://b/cc3m/{00000..00331}.tar'",
                               "optim.betas=[0.9, 0.95]", "model.grad_checkpointing=true"])
    assert cfg.objective.name == "infonce"
    assert cfg.data.batch_size == 256 and isinstance(cfg.data.batch_size, int)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.engine.zero_stage == 3
    assert cfg.data.train == "s3://b/cc3m/{00000..00331}.tar"
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.grad_checkpointing is True


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=/x.tar", "data.batchsize=3"])
    msg = str(err.value)
    assert "data.batchsize" in msg and "data.batch_size" in msg and "data.workers" in msg


def test_unknown_section_in_recipe_names_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  train: /x.tar\ntrainer:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert "bad.yaml" in str(err.value) and "'trainer'" in str(err.value) and "train" in str(err.value)


@pytest.mark.parametrize("override, needle", [
    ("objective.name=clip", "objective.name='clip'"),
    ("objective.negatives=hard", "objective.negatives='hard'"),
    ("engine.zero_stage=4", "engine.zero_stage=4"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=abc", "data.batch_size"),
    ("model.grad_checkpointing=3", "model.grad_checkpointing"),
    ("data.caption_key=caption", "data.caption_key"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=/x.tar", override])
    assert needle in str(err.value)


def test_compiled_towers_are_refused_at_zero_3_only():
    with pytest.raises(ConfigError, match=r"model.compile=true needs engine.zero_stage 0, 1 or 2"):
        load_config(None, ["data.train=/x.tar", "model.compile=true", "engine.zero_stage=3"])
    assert load_config(None, ["data.train=/x.tar", "model.compile=true", "engine.zero_stage=2"]).model.compile


def test_missing_train_shards_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("data.batch_size")


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_every_choice_field_is_checked_and_the_message_lists_the_choices():
    """Choices are declared once, as Literal field types; validate finds every such field."""
    import dataclasses
    import typing

    from cliplite_dist.config import Config, choices

    checked = 0
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        for name, typ in typing.get_type_hints(cls).items():
            if typing.get_origin(typ) is not typing.Literal:
                continue
            wrong = "nonsense" if isinstance(choices(typ)[0], str) else 99
            with pytest.raises(ConfigError) as err:
                load_config(None, ["data.train=/x.tar", f"{section.name}.{name}={wrong}"])
            assert f"{section.name}.{name}={wrong!r}" in str(err.value)
            assert ", ".join(map(str, choices(typ))) in str(err.value)
            checked += 1
    assert checked >= 11


@pytest.mark.parametrize("overrides, reasons", [
    ([], ["negative caption", "head_norm=batch"]),
    (["objective.negatives=cross_rank"], ["head_norm=batch"]),
    (["objective.head_norm=layer"], ["negative caption"]),
    (["objective.negatives=cross_rank", "objective.head_norm=layer"], []),
    (["objective.negatives=cross_rank", "objective.head=linear"], []),
    (["objective.name=infonce"], []),
])
def test_cliplite_at_batch_one_says_every_reason_it_cannot_run(overrides, reasons):
    args = ["data.train=/x.tar", "data.batch_size=1", *overrides]
    if not reasons:
        assert load_config(None, args).data.batch_size == 1
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert "data.batch_size=1" in str(err.value) and all(reason in str(err.value) for reason in reasons)
    assert len(reasons) == 2 or not any(r in str(err.value) for r in {"negative caption", "head_norm=batch"} - set(reasons))
