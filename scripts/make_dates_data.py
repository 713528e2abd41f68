"""Generate the dates demo dataset: turn a date written in words into its ISO 8601 form.

The second small task beside the quickstart's (sentence → JSON), for the adapter-merging demo
(``scripts/merge_demo.py``): its prompts start "Date:" where the quickstart's start "Sentence:",
so one merged adapter can be asked both. Reproducible from the seed; the committed files under
recipes/data/dates/ are this script's output.

    python scripts/make_dates_data.py           # rewrites recipes/data/dates/{train,valid,test}.jsonl
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from make_demo_data import make_splits, write_splits

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
TEMPLATES = [
    "{month} {day}, {year}",
    "{day} {month} {year}",
    "the {ordinal} of {month}, {year}",
    "{short} {day} {year}",
    "{month} {ordinal}, {year}",
    "{day}. {month} {year}",
]
# Phrasings never seen in training: the held-out test also checks that the skill generalises.
HELD_OUT_TEMPLATES = [
    "{year}, {month} {day}",
    "{ordinal} {month} {year}",
]


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def example(rng: random.Random, templates: list[str]) -> dict:
    year, month, day = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    text = rng.choice(templates).format(month=name, short=name[:3], day=day, ordinal=ordinal(day), year=year)
    return {"prompt": f"Date: {text}\nISO:", "completion": f" {year:04d}-{month:02d}-{day:02d}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes/data/dates")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    write_splits(make_splits(args.seed, make=example, templates=TEMPLATES, held_out_templates=HELD_OUT_TEMPLATES), args.out)


if __name__ == "__main__":
    main()
