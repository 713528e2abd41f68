"""Generate the quickstart's demo dataset: turn a sentence about a person into a JSON record.

A base model continues "Sentence: …\\nJSON:" with anything but the exact record, so the held-out
exact-match score shows plainly what a few minutes of LoRA teach it. The data is reproducible
from the seed; the committed files under recipes/data/quickstart/ are this script's output.

    python scripts/make_demo_data.py            # rewrites recipes/data/quickstart/{train,valid,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "Maria", "Ahmed", "Yuki", "Olivia", "Kwame", "Sofia", "Liam", "Priya", "Mateo", "Chloe",
    "Ivan", "Amara", "Lucas", "Mei", "Noah", "Fatima", "Elena", "Diego", "Hannah", "Ravi",
    "Grace", "Tomas", "Leila", "Oscar", "Zara", "Felix", "Nadia", "Hugo", "Ingrid", "Samuel",
    "Aisha", "Bruno", "Clara", "Dmitri", "Emma", "Farid", "Greta", "Hiro", "Isla", "Jonas",
    "Kira", "Luca", "Maya", "Nils", "Omar", "Paula", "Quentin", "Rosa", "Stefan", "Tara",
]
CITIES = [
    "Lisbon", "Nairobi", "Osaka", "Toronto", "Accra", "Madrid", "Dublin", "Mumbai", "Lima", "Lyon",
    "Kyiv", "Lagos", "Porto", "Shanghai", "Boston", "Cairo", "Athens", "Bogota", "Berlin", "Chennai",
    "Sydney", "Prague", "Tehran", "Oslo", "Dakar", "Vienna", "Tunis", "Geneva", "Bergen", "Santiago",
    "Denver", "Manila", "Seoul", "Hanoi", "Quito", "Warsaw", "Zurich", "Austin", "Krakow", "Turin",
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{name}, aged {age}, moved to {city} last year.",
    "At {age}, {name} calls {city} home.",
    "Meet {name} from {city}, who is {age}.",
    "{name} ({age}) works in {city}.",
    "Born {age} years ago, {name} now lives in {city}.",
    "Our new colleague {name} is {age} and is based in {city}.",
]
# Phrasings never seen in training: the held-out test also checks that the skill generalises.
HELD_OUT_TEMPLATES = [
    "In {city} there lives a {age}-year-old named {name}.",
    "{name} has spent all {age} years of life in {city}.",
]


def example(rng: random.Random, templates: list[str]) -> dict:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
    sentence = rng.choice(templates).format(name=name, city=city, age=age)
    record = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": f"Sentence: {sentence}\nJSON:", "completion": f" {record}"}


def make_splits(seed: int = 7, train: int = 400, valid: int = 40, test: int = 40) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()

    def unique(templates: list[str], count: int) -> list[dict]:
        rows = []
        while len(rows) < count:
            row = example(rng, templates)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        return rows

    held_out = test // 4
    return {
        "train": unique(TEMPLATES, train),
        "valid": unique(TEMPLATES, valid),
        "test": unique(TEMPLATES, test - held_out) + unique(HELD_OUT_TEMPLATES, held_out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes/data/quickstart")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(args.seed).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
