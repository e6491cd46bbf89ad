"""The task steps, declared as data: which set trains, which sets evaluate.

Adding a step is adding an entry. `reuses` marks a step that trains nothing:
its cells come from the runs of the named step (a TRAIN model is evaluated on
TEST and TEST2 in one run). `label_use` states which labels the step's
training reads, so every row of the report says it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Step:
    name: str
    train_set: str
    eval_sets: tuple[str, ...]
    description: str
    label_use: str = "TRAIN labels only"
    reuses: str | None = None
    fixed: tuple[tuple[str, Any], ...] = ()  # settings every trial of the step keeps (not searched)
    pretrain: str | None = None  # transfer: start from a model trained on this set, then fine-tune
    row: str = ""  # the report's row label (default: "<train_set> / <primary eval>")
    params_from: str | None = None  # no search: retrain the best trial of this step's study
    retrain: tuple[tuple[str, Any], ...] = ()  # settings of that retrain (e.g. a longer schedule)

    @property
    def fixed_settings(self) -> dict[str, Any]:
        return dict(self.fixed)

    @property
    def retrain_settings(self) -> dict[str, Any]:
        return dict(self.retrain)

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
            "task1-step2", "TRAIN2", ("TEST",), "train on TRAIN + inverted TRAIN, evaluate on TEST"
        ),
        Step(
            "task2-step1",
            "TRAIN",
            ("TEST2",),
            "the task1-step1 models evaluated on TEST2 (trains nothing)",
            reuses="task1-step1",
        ),
        Step(
            "task2-step2",
            "TEST",
            ("TEST2",),
            "train on TEST (its labels are allowed in Task 2), evaluate on TEST2",
            label_use="TEST labels (allowed in Task 2)",
        ),
        Step(
            "task2-step3",
            "TRAIN3",
            ("TEST2",),
            "train on TRAIN3 = TEST's white-background half, evaluate on TEST2",
            label_use="TEST white-half labels (allowed in Task 2)",
        ),
        Step(
            "task2-mixed",
            "TRAIN_TEST",
            ("TEST2",),
            "train on TRAIN and TEST together, every image turned to a black background",
            label_use="TRAIN and TEST labels (allowed in Task 2)",
            fixed=(("polarity", "to_black"),),
        ),
        Step(
            "task2-step3-long",
            "TRAIN3",
            ("TEST2",),
            "the task2-step3 studies' best settings retrained for 40 epochs without early "
            "stopping (the epoch with the best validation loss is kept), evaluate on TEST2",
            label_use="TEST white-half labels (allowed in Task 2)",
            params_from="task2-step3",
            retrain=(("epochs", 40), ("patience", 40)),
            row="TRAIN3, 40 epochs / TEST2",
        ),
        Step(
            "task2-transfer",
            "TEST",
            ("TEST2",),
            "start from the TRAIN model (task1-step1 final run), fine-tune on TEST, evaluate on TEST2",
            label_use="TRAIN labels (pretraining) and TEST labels (fine-tuning; allowed in Task 2)",
            pretrain="TRAIN",
            row="TRAIN → TEST (fine-tuned) / TEST2",
        ),
        Step(
            "task2-transfer-white",
            "TRAIN3",
            ("TEST2",),
            "start from a TRAIN model pretrained with every image turned to a black background, "
            "fine-tune on TRAIN3 (TEST's white half), evaluate on TEST2",
            label_use="TRAIN labels (pretraining) and TEST white-half labels (fine-tuning; allowed in Task 2)",
            pretrain="TRAIN",
            row="TRAIN → TRAIN3 (fine-tuned) / TEST2",
            fixed=(("polarity", "to_black"),),
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
    return get_step(step.reuses) if step.reuses else step
