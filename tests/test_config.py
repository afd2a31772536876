"""TrainConfig loading: YAML, overrides and the errors that name the bad key or value."""

from pathlib import Path

import pytest

from groupim.config import ConfigError, TrainConfig, load_config

DEFAULT_YAML = Path(__file__).resolve().parent.parent / "experiments" / "default.yaml"


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(DEFAULT_YAML) == TrainConfig()


def test_notebook_settings_in_default_yaml():
    config = load_config(DEFAULT_YAML)
    assert (config.pretrain_user_epochs, config.pretrain_mi_epochs, config.epochs) == (10, 10, 20)
    assert (config.lr, config.lambda_mi, config.dropout, config.batch_size) == (5e-3, 1.0, 0.4, 256)
    assert (config.embedding_size, config.aggregator, config.negatives_per_group) == (64, "attention", 5)


def test_overrides_parse_as_yaml():
    config = load_config(DEFAULT_YAML, ["lambda_mi=0.25", "aggregator=maxpool", "shuffle=false", "lr=1e-3"])
    assert config.lambda_mi == 0.25
    assert config.aggregator == "maxpool"
    assert config.shuffle is False
    assert config.lr == 1e-3


@pytest.mark.parametrize(
    "override, named",
    [
        ("lamda_mi=1", "lamda_mi"),
        ("aggregator=sumpool", "sumpool"),
        ("member_norm=items", "member_norm"),
        ("dropout=1.5", "dropout"),
        ("batch_size=0", "batch_size"),
        ("embedding_size=6.5", "embedding_size"),
        ("shuffle=maybe", "shuffle"),
        ("loss_precision=fp16", "loss_precision"),
        ("lr=fast", "lr"),
        ("epochs=-1", "epochs"),
        ("lambda_mi", "lambda_mi"),
        ("lr=inf", "finite"),
        ("lambda_mi=.nan", "lambda_mi"),
        ("lr=", "empty"),
        ("colour=red", "--set"),
    ],
)
def test_invalid_override_names_it(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(DEFAULT_YAML, [override])


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.01\nbatchsize: 64\n")
    with pytest.raises(ConfigError, match=r"batchsize.*|.*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "batchsize" in str(error.value)
    assert str(path) in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_replace_checks_values():
    config = TrainConfig()
    assert config.replace(lambda_mi=4).lambda_mi == 4.0
    with pytest.raises(ConfigError, match="aggregator"):
        config.replace(aggregator="median")


def test_config_round_trips_through_dict():
    config = TrainConfig(aggregator="meanpool", num_threads=2)
    assert TrainConfig.from_dict(config.to_dict()) == config
