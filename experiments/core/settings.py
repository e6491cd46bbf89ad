"""Every run's settings, resolved by one function with one precedence.

`resolve()` builds the `TrainConfig` of every run the project makes: a `train`
command, a search trial, a study's final retrain, a retrain of another study's
best trial, a fine-tune and a pretraining run. The layers, lowest first:

1. defaults: the fields of `TrainConfig` (the only place a default lives) and
   the model's constructor defaults;
2. base: what a starting point decides (a fine-tune inherits the pretrained
   model's architecture, polarity and normalization, and its own defaults);
3. searched: a trial's suggestions, or the best trial's params for a final;
4. role: what the kind of run fixes (a trial's subset and epochs, a final's
   full split and patience, a step's retrain schedule);
5. fixed: the step's declared settings (`Step.fixed`);
6. user: `--set KEY=VALUE`. For `train` it fixes the setting; for `search` it
   also removes the setting from the search space (see `experiments.search.space`).
   A user value that contradicts a step's fixed setting is an error.

Every value is validated before any run exists (`TrainConfig.__post_init__`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from experiments.core.preprocess import AUGMENTATIONS, NORMALIZATIONS, POLARITIES, Preprocessing
from models import MODELS, hyperparameters

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "none")
FREEZE = ("none", "early", "body")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything that decides a training run. `model_kwargs` holds the model's own knobs."""

    model: str = "vgg"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only (nesterov; 0: plain SGD); schedule=onecycle cycles its own
    batch_size: int = 128
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    epochs: int = 10
    patience: int = 3
    val_fraction: float = 0.2
    split_seed: int = 0  # the train/validation split: fixed across the trials of a study
    seed: int = 0  # weights, shuffling, augmentation
    train_subset: int = 0  # use only this many training images (0: all); stratified
    val_subset: int = 0  # score only this many validation images per epoch (0: all); stratified
    polarity: str = "keep"
    normalization: str = "half"
    augmentation: str = "affine"
    crop_scale: float = 0.85
    affine_strength: float = 0.7
    # weight averaging: validate, keep and ship an exponential moving average of the weights
    # (torch.optim.swa_utils), updated after every step with this decay, warmed up over the
    # first updates (experiments.training.train.ema_decay_at); 0 = off
    ema_decay: float = 0.0
    # stochastic weight averaging: from this fraction of the epochs on, the learning rate is
    # held at a tenth of `lr` (SWALR) and the weights are averaged uniformly at each epoch's
    # end; the average is validated, kept and shipped (0 = off; not with ema_decay)
    swa_start: float = 0.0
    # mixing training batches (torchvision.transforms.v2): MixUp / CutMix with these Beta
    # alphas (0 = off; both on: one of the two per batch, at random); soft targets
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    init_from: str = ""  # transfer: start from this checkpoint (file or MLflow run id)
    freeze: str = "none"  # transfer: none | early (first half of the body) | body (all but head)
    device: str = "auto"
    precision: str = "auto"  # training autocast: auto = bf16 where the CPU/GPU has it natively

    def __post_init__(self) -> None:
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("freeze", self.freeze, FREEZE)
        _check_choice("polarity", self.polarity, POLARITIES)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_range("lr", self.lr, low=0.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        _check_range("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        # at least one image per class on each side of a split: 6 of TRAIN's smallest subsets
        _check_range("val_fraction", self.val_fraction, 0.01, 0.9)
        _check_range("crop_scale", self.crop_scale, low=0.05, high=1.0)
        _check_range("affine_strength", self.affine_strength, low=0.0, high=3.0)
        _check_range("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        _check_range("swa_start", self.swa_start, low=0.0, high=1.0, high_open=True)
        _check_range("mixup_alpha", self.mixup_alpha, low=0.0, high=10.0)
        _check_range("cutmix_alpha", self.cutmix_alpha, low=0.0, high=10.0)
        if self.swa_start > 0 and self.ema_decay > 0:
            raise ValueError(
                f"swa_start={self.swa_start} and ema_decay={self.ema_decay}: choose one weight average"
            )
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= 1")
        for name in ("train_subset", "val_subset"):
            value = getattr(self, name)
            if value < 0 or 0 < value < MIN_SUBSET:
                raise ValueError(f"{name}={value}: expected 0 (all) or at least {MIN_SUBSET}")
        for name in ("seed", "split_seed"):  # numpy's and torch's seeds are 32-bit
            if not 0 <= getattr(self, name) < 2**32:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer in [0, 2**32)")
        if self.freeze != "none" and not self.init_from:
            raise ValueError(f"freeze={self.freeze} needs init_from (a pretrained checkpoint)")
        _check_device(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        self.model_kwargs = {**hyperparameters(self.model), **self.model_kwargs}
        _check_model(self.model, tuple(sorted(self.model_kwargs.items())))

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            polarity=self.polarity,
            normalization=self.normalization,
            augmentation=self.augmentation,
            crop_scale=self.crop_scale,
            affine_strength=self.affine_strength,
        )

    def flat(self) -> dict[str, Any]:
        """One flat dict of every setting (model knobs included): the run's params."""
        values = asdict(self)
        values.update(values.pop("model_kwargs"))
        return values


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of: {', '.join(choices)}")


def _check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name}={value!r}: expected a finite number in {span}")


def resolve_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu when `auto`; an explicit name is taken as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # static 28x28 shapes: cuDNN's autotuner picks each convolution's fastest kernel once
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_device(name: str) -> None:
    kind = name.split(":")[0]
    _check_choice("device", kind, DEVICES)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available on this machine")
    mps = getattr(torch.backends, "mps", None)
    if kind == "mps" and not (mps and mps.is_available()):
        raise ValueError(f"device={name}: MPS is not available on this machine")


def setting_names(model: str) -> dict[str, Any]:
    """Every key `resolve` accepts for `model`, with the default it has."""
    own = {f.name: f.default for f in fields(TrainConfig) if f.name != "model_kwargs"}
    return {**own, **hyperparameters(model)}


def coerce(model: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and turn command-line strings into the type of the setting's default."""
    known = setting_names(model)
    out = {}
    for key, value in values.items():
        if key not in known or key == "model":
            training = ", ".join(
                k for k in known if k not in hyperparameters(model) and k != "model"
            )
            raise ValueError(
                f"unknown setting {key!r}; expected a training setting ({training}) or a {model} "
                f"hyperparameter ({', '.join(hyperparameters(model))})"
            )
        out[key] = _coerce(value, known[key], key)
    return out


def _coerce(value: Any, like: Any, key: str) -> Any:
    """Turn a command-line string into the type of the default `like`."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    try:
        if isinstance(like, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected a {type(like).__name__}") from None
    return value


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (from `--set`) as a dict; a malformed pair is an error."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected key=value")
        key, value = key.strip(), value.strip()
        if key in overrides and overrides[key] != value:
            raise ValueError(f"--set {key} given twice ({overrides[key]} and {value}): keep one")
        overrides[key] = value
    return overrides


def check_user_against_fixed(step: str, fixed: Mapping[str, Any], user: Mapping[str, Any]) -> None:
    """A `--set` may not contradict a step's fixed setting: one error naming both."""
    for key, value in user.items():
        if key in fixed and fixed[key] != value:
            raise ValueError(
                f"--set {key}={value} contradicts step {step}'s fixed setting {key}={fixed[key]}"
            )


def resolve(
    model: str,
    *,
    base: Mapping[str, Any] | None = None,
    searched: Mapping[str, Any] | None = None,
    role: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
    user: Mapping[str, Any] | None = None,
    step: str = "",
) -> TrainConfig:
    """The run's `TrainConfig`: defaults < base < searched < role < fixed < user (see module doc)."""
    fixed, user = coerce(model, fixed or {}), coerce(model, user or {})
    check_user_against_fixed(step, fixed, user)
    layers = [base or {}, searched or {}, role or {}, fixed, user]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(coerce(model, layer))
    knobs = hyperparameters(model)
    kwargs = {k: v for k, v in merged.items() if k in knobs}
    values = {k: v for k, v in merged.items() if k not in knobs}
    return TrainConfig(model=model, model_kwargs=kwargs, **values)


MIN_SUBSET = 60  # a subset smaller than this leaves classes with no image in a split


@functools.lru_cache(maxsize=256)
def _check_model(name: str, knobs: tuple[tuple[str, Any], ...]) -> None:
    """Build the model and run one forward pass on the meta device (shapes only, no memory):
    a knob the model cannot take (width=0, dropout=1.5) is one error before any data, run or
    study exists."""
    import warnings

    import torch

    from models import create_model

    kwargs = dict(knobs)
    _check_sizes(name, kwargs)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on zero-element tensors
            create_model(name, **kwargs).eval()(torch.zeros(2, 1, 28, 28))
    except Exception as exc:  # whatever the model raises for knobs it cannot take
        knobs = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise ValueError(f"model {name} cannot be built with {knobs}: {exc}") from None


def _check_sizes(name: str, kwargs: dict[str, Any]) -> None:
    """A size knob (an integer the search space only draws from values >= 1: width, depth,
    blocks, hidden) below 1 is named as such, before torch is asked to build it."""
    from models import search_space

    for knob, spec in search_space(name).items():
        values = spec[1] if spec[0] == "categorical" else spec[1:3]
        sizes = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        value = kwargs.get(knob)
        if sizes and isinstance(value, int | float) and value < 1:
            raise ValueError(f"{knob}={value}: model {name}'s {knob} must be >= 1")
