"""Operating points: one row per budget profile and CPU class, written by `make reproduce`.

`make reproduce` notes the time it started (before installing) and, once its report is
written, calls `python -m experiments points --profile P --started T`: the row gives what
that profile bought (the headline cells' mean accuracy, the Task 2 champion's TEST2, the
quality conditions, TFLOP) and what it cost (the wall time, on the CPU named), read from
the report just written (`comparison.csv`, `champions.csv`). Rows are kept in
`reports/operating_points.csv`, one per (profile, CPU class), the newest winning; the table
is written to `operating_points.md`, and between markers into the README and
docs/reproduce.md, so that no number in it is typed by hand.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pandas as pd

from experiments.core import config, machine
from experiments.core.steps import PRETRAIN, STEPS
from experiments.reporting import findings
from experiments.tracking import results, store

POINTS_CSV = "operating_points.csv"
COLUMNS = [
    *("profile", "cpu_class", "cpu", "cores", "wall_s", "setup_s", "task1_acc", "task1_low"),
    "task1_high",
    *("task1_cells", "task2_acc", "task2_low", "task2_high", "task2_cells", "seeds"),
    *("champion_test2", "champion_low", "champion_high", "black_met", "baseline_met"),
    *("reference_met", "tflop", "date", "commit", "resumed", "earlier_s", "sittings"),
]
# runs of one sitting follow each other within seconds; a gap as long as a dead run is quiet
# (`results.QUIET_S`) ends it
SITTING_GAP_S = results.QUIET_S
START = "<!-- operating points: written by `make reproduce` (python -m experiments points) -->"
END = "<!-- end of operating points -->"
HEADLINE = {1: ("task1-step1",), 2: ("task2-step2", "task2-step3")}


def _mean_of(cells: pd.DataFrame, steps: tuple[str, ...]) -> tuple[float, float, float, int]:
    """The mean accuracy of the cells of `steps`, the mean of their 95 % limits, and how many."""
    chosen = cells[cells["step"].isin(steps) & cells["estimate"].notna()]
    if chosen.empty:
        return float("nan"), float("nan"), float("nan"), 0
    return (
        float(chosen["estimate"].mean()),
        float(chosen["estimate_low"].mean()),
        float(chosen["estimate_high"].mean()),
        len(chosen),
    )


def measure(
    profile: str,
    wall_s: float,
    reports: Path,
    setup_s: float | None = None,
    resumed: bool = False,
    earlier: list[tuple[pd.Timestamp, pd.Timestamp]] = (),
) -> dict:
    """This profile's row from the report in `reports` and the measured wall time (`setup_s`
    of it: install, fetch and data check; `resumed`: the time of the last sitting only, the
    store holding studies from before it; `earlier`: the spans of the sittings before this
    one, from `earlier_sittings`)."""
    cells = pd.read_csv(reports / "comparison.csv")
    champions_path = reports / "champions.csv"
    champions = pd.read_csv(champions_path) if champions_path.exists() else pd.DataFrame()
    task2 = champions[champions["task"] == 2] if not champions.empty else champions
    met = findings.conditions(cells).set_index("key")["met in"]
    task1, task2_cells = _mean_of(cells, HEADLINE[1]), _mean_of(cells, HEADLINE[2])
    searched = cells[cells["step"].map(lambda s: STEPS[s].kind == "search")]
    commit = store.environment_tags().get("git_commit", "unknown")
    return {
        "profile": profile,
        "cpu_class": machine.cpu_class(),
        "cpu": machine.cpu_name(),
        "cores": machine.cores(),
        "wall_s": round(wall_s),
        "setup_s": float("nan") if setup_s is None else round(setup_s),
        **dict(zip(("task1_acc", "task1_low", "task1_high", "task1_cells"), task1, strict=True)),
        **dict(
            zip(("task2_acc", "task2_low", "task2_high", "task2_cells"), task2_cells, strict=True)
        ),
        "seeds": int(cells["seeds"].max()) if cells["seeds"].notna().any() else 1,
        "champion_test2": float(task2["eval_acc"].iloc[0]) if len(task2) else float("nan"),
        "champion_low": float(task2["eval_low"].iloc[0]) if len(task2) else float("nan"),
        "champion_high": float(task2["eval_high"].iloc[0]) if len(task2) else float("nan"),
        "black_met": met.get("black", ""),
        "baseline_met": met.get("baseline", ""),
        "reference_met": met.get("reference", ""),
        "tflop": round(float(searched.drop_duplicates("run_id")["study_tflop"].sum()), 1),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit[:12],
        "resumed": bool(resumed),
        "earlier_s": round(sum((end - start).total_seconds() for start, end in earlier)),
        "sittings": len(earlier) + 1,
    }


def earlier_sittings(
    spans: pd.DataFrame, before: pd.Timestamp, gap_s: float = SITTING_GAP_S
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The sittings before `before` (this sitting's start), each as (start, end): the runs'
    spans (`results.run_spans`, rows `start`, `end`) cut at `before` and joined where less
    than `gap_s` apart. Their install time and anything between their runs and a longer gap
    is not in them."""
    cut = spans[spans["start"] < before].sort_values("start")
    blocks: list[tuple[pd.Timestamp, pd.Timestamp]] = []
    for start, end in zip(cut["start"], cut["end"].clip(upper=before), strict=True):
        if blocks and (start - blocks[-1][1]).total_seconds() < gap_s:
            blocks[-1] = (blocks[-1][0], max(blocks[-1][1], end))
        else:
            blocks.append((start, end))
    return blocks


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The rows by profile (quick, cpu, full, gpu), then by CPU class."""
    order = {name: i for i, name in enumerate(("quick", "cpu", "full", "gpu"))}
    return table.sort_values(
        ["profile", "cpu_class"], key=lambda c: c.map(order) if c.name == "profile" else c
    )


def upsert(row: dict, path: Path) -> pd.DataFrame:
    """`row` into the CSV at `path`, replacing the row of its (profile, CPU class)."""
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)
    keep = ~((old["profile"] == row["profile"]) & (old["cpu_class"] == row["cpu_class"]))
    rows = [r for r in (old[keep], pd.DataFrame([row], columns=COLUMNS)) if not r.empty]
    table = ordered(pd.concat(rows, ignore_index=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return table


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min {rest:02d} s"


def _wall(row: pd.Series) -> str:
    """'30 min 08 s (setup 1 min 47 s)': the whole command, and its install, fetch and check."""
    setup = row.get("setup_s")
    text = _minutes(row["wall_s"])
    if setup is not None and not pd.isna(setup):
        text = f"{text} (setup {_minutes(setup)})"
    sittings, earlier = row.get("sittings"), row.get("earlier_s")  # nan in an older row
    if pd.notna(sittings) and sittings > 1 and pd.notna(earlier):
        return f"{_minutes(row['wall_s'] + earlier)} in {int(sittings)} sittings, the last {text}"
    resumed = row.get("resumed")
    return f"{text}, last sitting of a resumed run" if pd.notna(resumed) and bool(resumed) else text


def _with_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def table_markdown(table: pd.DataFrame) -> str:
    """The operating-points table as markdown, one row per measured (profile, CPU class)."""
    table = ordered(table)
    shown = pd.DataFrame(
        {
            "profile": table["profile"],
            "CPU": table["cpu"] + ", " + table["cores"].astype(str) + " cores",
            "wall time": table.apply(_wall, axis=1),
            "Task 1 TEST, mean of cells": [
                _with_interval(*v)
                for v in zip(
                    table["task1_acc"], table["task1_low"], table["task1_high"], strict=True
                )
            ],
            "Task 2 TEST2, mean of cells": [
                _with_interval(*v)
                for v in zip(
                    table["task2_acc"], table["task2_low"], table["task2_high"], strict=True
                )
            ],
            "seeds": table["seeds"],
            "Task 2 champion TEST2": [
                _with_interval(*v, digits=4)
                for v in zip(
                    table["champion_test2"],
                    table["champion_low"],
                    table["champion_high"],
                    strict=True,
                )
            ],
            "black half >= 0.97": table["black_met"],
            "not worse than the defaults": table["baseline_met"],
            "Task 2 >= ref - 0.005": table["reference_met"],
            "TFLOP": table["tflop"].map(lambda v: f"{v:,.1f}"),
            "measured": table["date"] + ", " + table["commit"].astype(str),
        }
    )
    return shown.to_markdown(index=False)


NOTE = (
    "Each row is one `make reproduce PROFILE=<profile>` on a fresh clone, timed from the "
    "command's start (install and data fetch included) to its report; setup: its install, "
    "data fetch and data check. Mean of cells: the mean "
    "accuracy of the headline cells (Task 1: TRAIN / TEST, 4 models; Task 2: TEST / TEST2 and "
    "TRAIN3 / TEST2, 8 cells), in brackets the mean of their 95 % limits; the champion's "
    "interval is Wilson over TEST2's images. Conditions count studies, as in "
    "reports/comparison.md. TFLOP: training and evaluation of every study's trials, final "
    "and baseline. A run finished over several sittings (the studies resume) gives their "
    "sum: the last one timed as above, each one before it as the span of its runs, from the "
    "first start to the last logged metric (gaps under 10 min joined; the install of a "
    "sitting before the last is left out, and a pause that stopped the processes without "
    "ending them is counted)."
)


# where each profile's targets are stated (docs/reproduce.md): the CPU profiles on both
# 2-core CPU classes, `gpu` on one GPU
TARGET_CLASSES = {"bf16": "a CPU with native bf16", "avx2": "an AVX2-only CPU"}
CPU_PROFILES = ("quick", "cpu", "full")


def unmeasured(table: pd.DataFrame) -> str:
    """One line naming the (profile, CPU class) pairs with a stated target and no row."""
    measured = set(zip(table["profile"], table["cpu_class"], strict=True))
    missing = [
        f"{profile} on {label}"
        for profile in CPU_PROFILES
        for cpu_class, label in TARGET_CLASSES.items()
        if (profile, cpu_class) not in measured
    ]
    if "gpu" not in set(table["profile"]):
        missing.append("gpu on a GPU")
    return f"Not measured: {', '.join(missing)}." if missing else ""


def write_tables(table: pd.DataFrame, reports: Path, targets: list[Path]) -> list[Path]:
    """operating_points.md in `reports`, and the table between the markers of each target,
    each followed by the line naming the profiles and CPU classes without a row."""
    body = table_markdown(table)
    missing = unmeasured(table)
    body = f"{body}\n\n{textwrap.fill(missing, 90)}" if missing else body
    written = [reports / "operating_points.md"]
    written[0].write_text(f"# Operating points\n\n{NOTE}\n\n{body}\n")
    for path in targets:
        text = path.read_text() if path.exists() else ""
        head, start, rest = text.partition(START)
        _, end, tail = rest.partition(END)
        if start and end:
            path.write_text(f"{head}{start}\n{body}\n{end}{tail}")
            written.append(path)
    return written


def _profile_spans(profile: str, names: list[str]) -> pd.DataFrame:
    """The spans of the runs (study parents left out) of the named experiments and the
    pretraining since this profile's first study began (all of them where no study parent
    names its profile), runs still RUNNING from a dead process ending when they last logged."""
    frame = results.search([*names, PRETRAIN.name])
    if frame.empty:
        return pd.DataFrame(columns=["start", "end"])
    study = frame.get("tags.role", pd.Series(None, index=frame.index, dtype=object)) == "study"
    if "tags.budget.profile" in frame:
        own = frame[study & (frame["tags.budget.profile"] == profile)]
        if len(own):
            frame, study = (
                f[frame["start_time"] >= own["start_time"].min()] for f in (frame, study)
            )
    return results.run_spans(frame[~study], alive=False)


def record(
    profile: str, started: float, out: str | Path | None = None, setup_done: float | None = None
) -> list[Path]:
    """Measure this profile's row (wall time since `started`, seconds since the epoch; the
    setup until `setup_done`), keep it in operating_points.csv and rewrite the tables. A
    report must exist in `out`."""
    reports = config.reports_dir(out)
    if not (reports / "comparison.csv").exists():
        raise FileNotFoundError(
            f"{reports / 'comparison.csv'}: no report to measure; run `make report` first"
        )
    wall = time.time() - started
    if not 0 < wall < 7 * 24 * 3600:
        raise ValueError(f"--started {started}: not a time in the past week (seconds since 1970)")
    setup = None
    if setup_done is not None and started <= setup_done <= time.time():
        setup = setup_done - started
    names = [s.name for s in STEPS.values() if s.kind != "reuse"]
    first = results.first_start(names)
    # studies older than this command, or runs that continued from an earlier process's state
    resumed = (first is not None and first < started - 1) or results.resumed_runs(names) > 0
    earlier = earlier_sittings(
        _profile_spans(profile, names), pd.Timestamp(started, unit="s", tz="UTC")
    )
    row = measure(profile, wall, reports, setup, resumed, earlier)
    table = upsert(row, reports / POINTS_CSV)
    own = reports.resolve() == (config.PROJECT_ROOT / "reports").resolve()
    targets = [config.PROJECT_ROOT / "README.md", config.PROJECT_ROOT / "docs" / "reproduce.md"]
    return write_tables(table, reports, targets if own else [])


def render(out: str | Path | None = None) -> list[Path]:
    """Rewrite the tables from operating_points.csv alone (no new measurement)."""
    reports = config.reports_dir(out)
    path = reports / POINTS_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path}: no operating points yet; run `make reproduce` first")
    own = reports.resolve() == (config.PROJECT_ROOT / "reports").resolve()
    targets = [config.PROJECT_ROOT / "README.md", config.PROJECT_ROOT / "docs" / "reproduce.md"]
    return write_tables(pd.read_csv(path), reports, targets if own else [])
