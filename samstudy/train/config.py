"""The trial config: one plain nested mapping, validated by pydantic.

A study file's ``base:`` is this same mapping, and study grids address its leaves by dotted path
(``optimizer.rho``, ``noise.rate``, ``model.name``). Every field has a default, so ``{}`` is a
valid (digits, MLP, SAM) trial.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from samstudy.optim.config import OptimizerConfig, with_recipe

# Every per-epoch metric of ``run_trial`` that a study may optimise or a report may plot (the
# contract of docs/architecture.md; ``epoch``, ``lr``, timings and ``status`` come on top).
EPOCH_METRICS: tuple[str, ...] = (
    "train_loss",
    "train_acc",
    "train_acc_clean",
    "train_acc_noisy",
    "train_loss_clean",
    "train_loss_noisy",
    "memorization",
    "recovery",
    "test_loss",
    "test_acc",
    "best_test_acc",
    "region_ckpt1",
    "region_ckpt2",
    "region_ckpt3",
    "region_ckpt4",
    "region_zero",
    "grad_norm",
    "grad_norm_p",
    "ascent_norm",
    "grad_cos",
    "grad_ratio",
    "sharpness_lambda_max",
    "sharpness_trace",
    # Proposition 4.1 (samstudy.train.norms); per layer group also weight_norm.<group>
    "weight_norm",
    "last_layer_norm",
    "activation_norm",
)


# Fields the config dump leaves out while they hold their default (dotted path -> default): they
# came after the first studies ran. Readers of logged params take a missing one at this value.
COMPACT_DEFAULTS: dict[str, Any] = {"data.train_fraction": 1.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Strict):
    """Gaussian data for the linear and 2-layer linear models (theory studies)."""

    n_train: int = Field(512, ge=2)
    n_test: int = Field(2048, ge=2)
    dim: int = Field(32, ge=1)
    num_classes: int = Field(2, ge=2)
    margin: float = Field(1.0, ge=0.0, description="distance of the class means from the origin")


class DataConfig(_Strict):
    name: Literal["digits", "cifar10", "cifar100", "gaussian"] = "digits"
    root: str = Field(
        "data",
        description="CIFAR root directory (a relative path: to the project root, samstudy.paths)",
    )
    download: bool = False
    augment: bool = Field(True, description="random crop (pad 4) and horizontal flip; CIFAR only")
    loader: Literal["auto", "device", "torchvision"] = "auto"
    num_workers: int = Field(0, ge=0, description="torchvision loader workers")
    test_size: float = Field(0.2, gt=0.0, lt=1.0, description="digits: stratified test share")
    split_seed: int = 0
    train_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="stratified share of the training set kept (drawn from split_seed, "
        "before label noise); the test set stays whole",
    )
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        # The dump is what trial ids hash: at its default the field is left out, so the ids of
        # trials from before it existed (and their MLflow runs) stay the same.
        data = handler(self)
        for key, default in COMPACT_DEFAULTS.items():
            if key.startswith("data.") and data.get(key[5:]) == default:
                data.pop(key[5:])
        return data


class NoiseConfig(_Strict):
    kind: Literal["none", "symmetric", "asymmetric", "human"] = "none"
    rate: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, description="noise is drawn from its own seed, not the training seed")
    label_file: str | None = Field(
        None, description="CIFAR-N labels (.pt/.npy) for kind=human; relative: to the project root"
    )
    label_key: str = Field("worse_label", description="key inside a CIFAR-N .pt file")

    @model_validator(mode="after")
    def _human_needs_file(self) -> NoiseConfig:
        if self.kind == "human" and not self.label_file:
            raise ValueError("noise.kind 'human' needs noise.label_file (a CIFAR-N label file)")
        return self


class ModelConfig(_Strict):
    name: str = "mlp"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from samstudy.models import available_models

        names = available_models()
        if name not in names:
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(names))}")
        return name


class ScheduleConfig(_Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[int] = Field(
        default_factory=list, description="step: epochs where lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)


class SharpnessConfig(_Strict):
    every: int = Field(0, ge=0, description="epochs between measurements; 0 = off")
    batch_size: int = Field(256, ge=1)
    power_iters: int = Field(20, ge=1)
    hutchinson_samples: int = Field(10, ge=1)


class TrialConfig(_Strict):
    data: DataConfig = DataConfig()
    noise: NoiseConfig = NoiseConfig()
    model: ModelConfig = ModelConfig()
    # Typed from the preset registry; a partial mapping takes the defaults and the lab's recipe
    # for the base optimizer (samstudy.optim.config), so `{name: sgd}` keeps lr, momentum, ...
    optimizer: Annotated[OptimizerConfig, BeforeValidator(with_recipe)] = Field(
        default_factory=dict, validate_default=True
    )
    schedule: ScheduleConfig = ScheduleConfig()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA")
    threads: int | None = Field(None, ge=1, description="torch CPU threads for this trial")
    sharpness: SharpnessConfig = SharpnessConfig()
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints; 0 = never")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap batches (smoke tests)")


def load_trial_config(mapping: dict[str, Any] | None) -> TrialConfig:
    """Validate a plain mapping (``None`` means all defaults)."""
    return TrialConfig.model_validate(mapping or {})
