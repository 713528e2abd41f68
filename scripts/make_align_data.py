"""Generate the alignment demos' data: a preference task (DPO/ORPO/SimPO, and as feedback for KTO) and a GRPO prompt set.

Both reuse the quickstart's sentences about people (``make_demo_data.py``):

- ``recipes/data/prefer-city``: "Sentence: …\\nQuestion: Is Noah on the red or the blue team?\\nAnswer:
  Noah is on the" where the pairs prefer " red team." for a person living in a European city and
  " blue team." for anyone else. The base model knows no such rule, and the pairs are balanced so that
  nothing but the rule tells chosen from rejected: both colours are chosen equally often (one token
  each), and the question names them in either order. The base answers with the colour named first,
  so it starts at chance, and what DPO teaches shows in its greedy answers.
- ``recipes/data/prefer-city-kto``: the same kind of questions as feedback for KTO: each question's two
  answers on lines of their own, the rule's colour labelled desirable and the other undesirable.
- ``recipes/data/grpo-age``: "Sentence: …\\nAge:" prompts with the age as ``answer``; the recipe's
  reward (``rewards.py``) pays for the right number alone on the first line (" 46", not " 46 years").

Held-out test sentences use phrasings never seen in training. The files are reproducible from the seed.

    python scripts/make_align_data.py            # rewrites both folders' train/valid/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_demo_data import CITIES, HELD_OUT_TEMPLATES, NAMES, TEMPLATES

RECIPE_DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"
TEAMS = ["red", "blue"]  # red: the person lives in Europe
EUROPEAN = ["Lisbon", "Madrid", "Dublin", "Lyon", "Kyiv", "Athens", "Berlin", "Prague", "Oslo", "Vienna", "Warsaw", "Zurich"]
ELSEWHERE = ["Nairobi", "Osaka", "Toronto", "Mumbai", "Lima", "Lagos", "Shanghai", "Boston", "Cairo", "Sydney", "Seoul", "Manila"]


def person(rng: random.Random, templates: list[str], cities: list[str] = CITIES) -> tuple[str, str, int, str]:
    name, city, age = rng.choice(NAMES), rng.choice(cities), rng.randint(18, 89)
    return name, city, age, rng.choice(templates).format(name=name, city=city, age=age)


def pair(rng: random.Random, templates: list[str], index: int) -> dict:
    """The ``index``-th pair of a split: the chosen colour alternates, and so (every other pair) does
    the order the prompt names the colours in, so a base that favours either colour or the first one
    named is right on exactly half the pairs."""
    chosen, rejected = TEAMS if index % 2 == 0 else TEAMS[::-1]
    first, second = TEAMS if index // 2 % 2 == 0 else TEAMS[::-1]
    name, _, _, sentence = person(rng, templates, EUROPEAN if chosen == TEAMS[0] else ELSEWHERE)
    prompt = f"Sentence: {sentence}\nQuestion: Is {name} on the {first} or the {second} team?\nAnswer: {name} is on the"
    return {"prompt": prompt, "chosen": f" {chosen} team.", "rejected": f" {rejected} team."}


def as_feedback(pairs: list[dict]) -> list[dict]:
    """Each pair's question twice, once with each answer: the chosen one labelled desirable, the other
    undesirable (as an app logs a thumbs-up on one reply and a thumbs-down on another)."""
    return [
        {"prompt": row["prompt"], "completion": row[key], "label": key == "chosen"} for row in pairs for key in ("chosen", "rejected")
    ]


def age_prompt(rng: random.Random, templates: list[str], index: int) -> dict:
    _, _, age, sentence = person(rng, templates)
    return {"prompt": f"Sentence: {sentence}\nAge:", "answer": str(age)}


def unique_rows(make, rng: random.Random, templates: list[str], count: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < count:
        row = make(rng, templates, len(rows))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def make_splits(make, seed: int, train: int, valid: int, test: int) -> dict[str, list[dict]]:
    rng, seen = random.Random(seed), set()
    held_out = test // 2
    return {
        "train": unique_rows(make, rng, TEMPLATES, train, seen),
        "valid": unique_rows(make, rng, TEMPLATES, valid, seen),
        "test": unique_rows(make, rng, TEMPLATES, test - held_out, seen) + unique_rows(make, rng, HELD_OUT_TEMPLATES, held_out, seen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RECIPE_DATA)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    datasets = {
        "prefer-city": make_splits(pair, args.seed, train=256, valid=32, test=40),
        "grpo-age": make_splits(age_prompt, args.seed + 1, train=128, valid=24, test=24),
        "prefer-city-kto": {
            split: as_feedback(rows) for split, rows in make_splits(pair, args.seed + 2, train=128, valid=16, test=20).items()
        },
    }
    for folder, splits in datasets.items():
        (args.out / folder).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            path = args.out / folder / f"{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
