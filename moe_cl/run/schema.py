"""The run configuration's typed schema: one dataclass per section, read by OmegaConf, which
checks keys and types; the choices and ranges it cannot express are checked in
:func:`moe_cl.run.config.validate`. The ``experts`` and ``router`` sections are the models' own
option types (:mod:`moe_cl.training.options`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_cl.training.options import ExpertPolicy, RouterOptions

DEFAULT_BENCHMARK = "split_fmnist"
DEFAULT_STRATEGY = "attentive_ls"
# What a run's config.yaml must state (every run has written them): one without them is not a
# run's settings, and the schema's defaults must not stand in for what the run used.
REQUIRED_KEYS = ("benchmark", "strategy", "method", "seed", "scenario", "data.stream",
                 "data.n_experiences", "train.epochs", "train.batch_size", "train.lr",
                 "model.architecture", "model.num_experts")
# Settings that do not shape what a run trains or measures: where it runs and what it logs.
NOT_SHAPING = ("resume", "out_dir", "logging", "device", "data.root", "data.download",
               "train.checkpoint_every_epochs")
# Settings that shape training but that an explicit override may change in an unfinished run.
SAFE_TO_CHANGE = ("train.epochs",)


@dataclass
class DataConfig:
    # which stream moe_cl.data.streams builds: split_mnist | split_fmnist | split_cifar100 |
    # paper_mnist | paper_fmnist | paper_cifar100 | tiny
    stream: str = "split_fmnist"
    root: str = "data"
    download: bool = True  # on first use, as torchvision and Avalanche do (MOE_CL_OFFLINE=1: never)
    n_experiences: int = 5
    max_train_samples: int | None = None
    max_test_samples: int | None = None


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 256
    eval_batch_size: int = 1024
    lr: float = 1e-3
    # "auto": the paper's rule, 1e-3 for softmax-gate and single models on CIFAR-100, else 0.
    weight_decay: Any = "auto"
    fast_data: bool = True
    checkpoint_every_epochs: int = 0
    # A measurement, not a setting: the train error as the paper's reference code measures it
    # (a second no-grad forward after each optimiser step), results.json's train_error_reference.
    reference_train_error: bool = False
    # fp32 | tf32 (CUDA only) | bf16 (autocast; softmax, mixture, losses and metrics stay
    # float32): moe_cl.training.precision. Mixture methods only.
    precision: str = "fp32"
    # torch.compile of the mixture's forward pass (growth recompiles it). Mixture methods only.
    compile: bool = False


@dataclass
class ModelConfig:
    # "auto" picks the paper architecture of the benchmark's data set (mlp for tiny).
    architecture: str = "auto"
    num_experts: int = 5
    gate: str = "attentive"
    output: str = "expectation"
    mlp_width: int = 64
    mlp_hidden: int = 32
    # The single-model methods' network: the single expert, or the gate network as a classifier.
    backbone: str = "expert"


@dataclass
class SampleSimilarityConfig:
    beta_s: float = 0.0
    beta_d: float = 0.0
    scaling: str = "clean"
    normalize_max: bool = False


@dataclass
class RegularizerConfig:
    importance: float = 0.0
    ls: SampleSimilarityConfig = field(default_factory=SampleSimilarityConfig)


@dataclass
class BaselineConfig:
    ewc_lambda: float = 1.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    si_lambda: float = 1.0


@dataclass
class SLDAConfig:
    # The frozen feature space of method=slda: pixels | random_conv | gate_trunk.
    features: str = "random_conv"
    shrinkage: float = 1e-4  # Avalanche's


@dataclass
class ReplayConfig:
    mem_size: int = 0


@dataclass
class DistillConfig:
    epochs: int = 0
    # A finished run of the same configuration (minus distillation) whose trained model is
    # distilled instead of training a new teacher (single-experience benchmarks).
    teacher: str | None = None


@dataclass
class EvalConfig:
    top_k: int | None = None


@dataclass
class LoggingConfig:
    interactive: bool = True
    tensorboard: bool = True
    csv: bool = True
    figures: bool = True


@dataclass
class RunConfig:
    benchmark: str = DEFAULT_BENCHMARK
    strategy: str = DEFAULT_STRATEGY
    # moe: MoEStrategy; the others are Avalanche's strategies on the single-expert backbone.
    method: str = "moe"
    seed: int = 0
    device: str = "auto"
    out_dir: str | None = None
    resume: Any = False
    scenario: str = "class"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertPolicy = field(default_factory=ExpertPolicy)
    router: RouterOptions = field(default_factory=RouterOptions)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    slda: SLDAConfig = field(default_factory=SLDAConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


