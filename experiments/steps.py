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

    @property
    def fixed_settings(self) -> dict[str, Any]:
        return dict(self.fixed)

    @property
    def primary_eval(self) -> str:
        """The evaluation set of this step's row in the comparison table."""
        return self.eval_sets[0]

    @property
    def row_label(self) -> str:
        return f"{self.train_set} / {self.primary_eval}"


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
    )
}


def get_step(name: str) -> Step:
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; expected one of: {', '.join(STEPS)}")
    return STEPS[name]


def training_step(name: str) -> Step:
    """The step whose runs hold `name`'s results (itself, or the step it reuses)."""
    step = get_step(name)
    return get_step(step.reuses) if step.reuses else step
