"""Typed training configuration for GroupIM, loaded from YAML plus `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

AGGREGATORS = ("maxpool", "meanpool", "attention")
MEMBER_NORMS = ("member", "group")
DEVICES = ("auto", "cpu", "cuda")
LOSS_PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """An unknown key or an invalid value in a training configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of GroupIM training; defaults follow the GroupIM-on-Weeplaces notebook.

    The four switches at the end choose between the GroupIM paper's intent (default) and
    that notebook's code, so that the notebook's runs can be reproduced.
    """

    # Group training (phase 3).
    lr: float = 5e-3  # Adam learning rate of MI pre-training and group training
    weight_decay: float = 0.0  # Adam weight decay, all phases
    lambda_mi: float = 1.0  # weight of L_UG in L_G + lambda * L_UG + L_MI
    dropout: float = 0.4  # dropout on the encoder's input item vector
    batch_size: int = 256  # groups (or users) per batch
    epochs: int = 20  # group-training epochs
    eval_freq: int = 5  # evaluate on validation data every eval_freq epochs

    # Model.
    embedding_size: int = 64  # D: user, group and item embedding size
    aggregator: str = "attention"  # maxpool, meanpool or attention
    negatives_per_group: int = 5  # N: negative users per group for the discriminator

    # Pre-training (phases 1 and 2).
    pretrain_user: bool = True  # phase 1: pre-train the user encoder on user-item data
    pretrain_user_epochs: int = 10
    pretrain_user_lr: float = 0.01
    pretrain_mi: bool = True  # phase 2: pre-train the discriminator (MI estimator)
    pretrain_mi_epochs: int = 10

    seed: int = 1111

    # Paper intent (default) versus reference notebook behaviour.
    member_norm: str = "member"  # "member": L2 over a member's own items; "group": across members per item
    negatives_exclude_members: bool = True  # False: item-biased negatives may be group members
    eval_final_epoch: bool = True  # False: evaluate only when the 0-based epoch % eval_freq == 0
    shuffle: bool = True  # shuffle training batches (seeded); False: fixed order

    # Execution.
    device: str = "auto"  # auto (CUDA when available), cpu or cuda
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    # Input type of the all-item products in the training losses: fp32, or bf16 (bfloat16
    # inputs, float32 softmax and weights), faster on CPUs with AVX512-BF16 or AMX and on GPUs.
    loss_precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_choice("aggregator", self.aggregator, AGGREGATORS)
        _check_choice("member_norm", self.member_norm, MEMBER_NORMS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("loss_precision", self.loss_precision, LOSS_PRECISIONS)
        for name in ("lr", "pretrain_user_lr"):
            _check_positive(name, getattr(self, name))
        for name in ("batch_size", "epochs", "eval_freq", "embedding_size", "negatives_per_group"):
            _check_positive(name, getattr(self, name))
        for name in ("pretrain_user_epochs", "pretrain_mi_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"invalid {name}: {getattr(self, name)!r}; expected an integer >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"invalid weight_decay: {self.weight_decay!r}; expected a number >= 0")
        if self.lambda_mi < 0:
            raise ConfigError(f"invalid lambda_mi: {self.lambda_mi!r}; expected a number >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"invalid dropout: {self.dropout!r}; expected a number in [0, 1)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"invalid num_threads: {self.num_threads!r}; expected an integer >= 1 or null")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build a config from a mapping, converting and checking each value's type."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in {source}: {', '.join(unknown)}; valid keys: {', '.join(known)}"
            )
        converted = {name: _convert(name, value, known[name].type) for name, value in values.items()}
        return cls(**converted)

    def replace(self, **changes: Any) -> "TrainConfig":
        """Return a copy with `changes` applied and checked like any other value."""
        return self.from_dict({**self.to_dict(), **changes}, source="replace()")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Load a YAML config file (or the defaults) and apply `key=value` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid YAML in {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must contain a mapping of key: value, not {type(loaded).__name__}")
        values.update(loaded)
        source = str(path)
    changes = parse_overrides(overrides)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in the overrides (--set, or the train: block of a search experiment): "
            f"{', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
        )
    values.update(changes)
    return TrainConfig.from_dict(values, source=source)


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Parse `key=value` strings; each value is read as YAML (`1e-3`, `true`, `null`)."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid override {item!r}; expected key=value, e.g. lambda_mi=0.5")
        if not raw.strip():
            raise ConfigError(f"invalid override {item!r}: the value is empty; expected key=value, e.g. lambda_mi=0.5")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def _convert(name: str, value: Any, annotation: str) -> Any:
    expected = annotation.replace(" ", "")
    if value is None and "None" in expected:
        return None
    if expected.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"invalid {name}: {value!r}; expected true or false")
    if expected.startswith("int"):
        if isinstance(value, bool) or not _is_integral(value):
            raise ConfigError(f"invalid {name}: {value!r}; expected an integer")
        return int(value)
    if expected.startswith("float"):
        # YAML reads `5e-3` (no dot) as a string, so accept numeric strings too.
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {name}: {value!r}; expected a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"invalid {name}: {value!r}; expected a finite number")
        return number
    if expected.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"invalid {name}: {value!r}; expected a string")
        return value
    raise AssertionError(f"unhandled field type {annotation} for {name}")


def _is_integral(value: Any) -> bool:
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {name}: {value!r}; expected one of {', '.join(choices)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"invalid {name}: {value!r}; expected a number > 0")
