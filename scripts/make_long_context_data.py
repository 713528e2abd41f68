"""Generate the long-context recipe's demo dataset: answer a question about one entry of a long ship's log.

Each example is a log of 60 to 160 entries (about 1,100 to 3,100 Gemma 3 tokens), every entry naming a
cargo, a quantity and a port, then a question about one entry picked anywhere in the log:

    Log of the Aurora.
    Entry 1. The Aurora loaded 36 crates of copper in Lisbon.
    ...
    Question: In which port did the Aurora load copper?
    Answer: Lisbon

A model only answers from the entry if the whole log fits in ``data.max_seq_length``: cut at 512
tokens, most answers lie in the part that was cut off. So the recipe shows what a longer sequence
buys, and what it costs. The data is reproducible from the seed; the committed files under
recipes/data/long-context/ are this script's output.

    python scripts/make_long_context_data.py             # rewrites recipes/data/long-context/{train,valid,test}.jsonl
    python scripts/make_long_context_data.py --entries 150 --train 8 --out /tmp/long   # other sizes
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_demo_data import CITIES  # scripts/ is on the path when a script here runs

VESSELS = ["Aurora", "Kestrel", "Meridian", "Halcyon", "Marlin", "Osprey", "Tern", "Calypso", "Sirocco", "Pelican"]
PORTS = CITIES  # the quickstart demo's cities
GOODS = [
    "copper", "tea", "wool", "salt", "coffee", "rice", "timber", "cotton", "sugar", "pepper", "tin", "silk",
    "olive oil", "marble", "glass", "paper", "cocoa", "rubber", "iron", "wine", "cinnamon", "linen", "coal",
    "barley", "amber", "ivory soap", "cloves", "indigo", "hemp", "saffron", "nutmeg", "jute", "clay pots",
    "dried fish", "lamp oil", "candles", "leather", "porcelain", "tobacco", "honey", "vanilla", "zinc",
    "brass", "cork", "dates", "figs", "flax", "granite", "lemons", "maize", "oats", "pearls", "quinine",
    "resin", "rope", "slate", "soap", "tar", "turpentine", "walnuts", "wax", "whale oil", "almonds",
    "anchors", "bells", "blankets", "books", "bricks", "buttons", "canvas", "chalk", "cheese", "chestnuts",
    "clocks", "compasses", "corn", "cranes", "cider", "ebony", "feathers", "felt", "flour", "furs", "gin",
    "ginger", "gloves", "grapes", "gunny sacks", "hats", "hides", "ink", "jam", "kettles", "lace", "lanterns",
    "lentils", "lime", "maps", "matches", "mirrors", "molasses", "mustard", "nails", "needles", "onions",
    "oranges", "paint", "peas", "pewter", "pickles", "pipes", "plums", "potatoes", "quills", "raisins",
    "rum", "saddles", "sails", "sardines", "shoes", "shovels", "soda", "spoons", "starch", "stoves",
    "tallow", "teak", "thread", "tiles", "tools", "twine", "umbrellas", "vinegar", "wheat", "whistles",
    "yarn", "apricots", "beans", "beeswax", "biscuits", "brooms", "cabbages", "carpets", "cedar", "cement",
    "charcoal", "coconuts", "combs", "copra", "cutlery", "dyes", "fabric", "fishhooks", "garlic", "glue",
    "guava", "hammers", "herbs", "jasmine", "kelp", "ladders", "lard", "limes", "locks", "mangoes",
]
CONTAINERS = ["crates", "barrels", "sacks", "chests", "bales", "casks", "boxes", "bundles"]
ENTRY = "Entry {n}. The {vessel} loaded {count} {container} of {goods} in {port}."
QUESTION = "\n\nQuestion: In which port did the {vessel} load {goods}?\nAnswer:"


def example(rng: random.Random, entries: int) -> dict:
    vessel = rng.choice(VESSELS)
    cargo = rng.sample(GOODS, entries)  # each good appears once, so the question has one answer
    ports = [rng.choice(PORTS) for _ in cargo]
    lines = [f"Log of the {vessel}."]
    for n, (goods, port) in enumerate(zip(cargo, ports), start=1):
        lines.append(ENTRY.format(n=n, vessel=vessel, count=rng.randint(2, 90), container=rng.choice(CONTAINERS), goods=goods, port=port))
    asked = rng.randrange(entries)
    return {"prompt": "\n".join(lines) + QUESTION.format(vessel=vessel, goods=cargo[asked]), "completion": f" {ports[asked]}"}


def make_splits(seed: int, sizes: dict[str, int], entries: tuple[int, int]) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    return {split: [example(rng, rng.randint(*entries)) for _ in range(count)] for split, count in sizes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes/data/long-context")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--valid", type=int, default=8)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--entries", type=int, nargs="+", default=[60, 160], help="entries per log: one number, or a range")
    args = parser.parse_args()
    low, high = (args.entries * 2)[:2]
    if high > len(GOODS):
        parser.error(f"at most {len(GOODS)} entries: each good appears once per log")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(args.seed, {"train": args.train, "valid": args.valid, "test": args.test}, (low, high)).items():
        path = args.out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
