"""Generate the embedded default datasets (deterministic; written by this project, no third-party text).

    python3 data/make_data.py            # writes data/pretrain.jsonl and data/instruct.jsonl

A small invented world — people, animals, jobs, places, colours, numbers — described by stories,
facts and arithmetic (pretraining), and questions about the same world answered in a fixed style
(instruction tuning). The facts are consistent across both sets, so a model that learns the corpus
can answer the questions: the default run shows real learning, not memorised noise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dov", "Emil", "Fay", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nora",
         "Otto", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara", "Zeno"]
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot", "frog": "ribbit",
           "horse": "neigh", "lion": "roar", "bee": "buzz", "mouse": "squeak", "pig": "oink"}
ANIMAL_FOOD = {"cat": "fish", "dog": "bones", "cow": "grass", "duck": "bread crumbs", "sheep": "hay", "owl": "mice",
               "frog": "flies", "horse": "oats", "lion": "meat", "bee": "nectar", "mouse": "cheese", "pig": "apples"}
JOBS = {"baker": "bakes bread", "farmer": "grows food", "doctor": "helps sick people", "teacher": "teaches children",
        "pilot": "flies planes", "painter": "paints pictures", "builder": "builds houses", "fisher": "catches fish",
        "singer": "sings songs", "tailor": "sews clothes", "gardener": "grows flowers", "cook": "makes meals"}
PLACES = ["a small village", "a big city", "a quiet forest", "a sunny farm", "a house by the sea", "a tall tower",
          "a green valley", "a busy market town", "a snowy mountain", "an old castle"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "black", "blood": "red",
           "orange": "orange", "plum": "purple", "coal": "black", "lemon": "yellow", "leaf": "green", "cloud": "white"}
OBJECTS = ["ball", "hat", "kite", "box", "book", "cup", "key", "lamp", "shoe", "boat", "bell", "coin"]
COLOUR_WORDS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange", "brown", "pink"]
ADJ = ["happy", "brave", "sleepy", "clever", "kind", "shy", "curious", "small", "big", "gentle", "quick", "funny"]
FEEL = ["happy", "proud", "surprised", "calm", "excited", "glad", "tired", "thankful"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
             "open": "closed", "full": "empty", "old": "new", "light": "dark", "wet": "dry", "loud": "quiet"}


def story(r: random.Random) -> str:
    name, animal, place = r.choice(NAMES), r.choice(list(ANIMALS)), r.choice(PLACES)
    obj, col, adj, feel = r.choice(OBJECTS), r.choice(COLOUR_WORDS), r.choice(ADJ), r.choice(FEEL)
    friend = r.choice([n for n in NAMES if n != name])
    job = r.choice(list(JOBS))
    lines = [
        r.choice([f"Once upon a time, there was a {adj} {animal} named {name}.",
                  f"{name} was a {adj} {animal} who lived in {place}.",
                  f"In {place}, there lived a {adj} {animal} called {name}."]),
        r.choice([f"Every morning, {name} said \"{ANIMALS[animal]}\" to the sun.",
                  f"{name} liked to eat {ANIMAL_FOOD[animal]} for lunch.",
                  f"{name} had a friend named {friend}, who was a {job}."]),
        r.choice([f"One day, {name} found a {col} {obj} near the path.",
                  f"One day, {name} lost a {col} {obj} and looked for it everywhere.",
                  f"One day, {friend} gave {name} a {col} {obj} as a present."]),
        r.choice([f"{name} showed the {obj} to {friend}, and they played with it until dinner.",
                  f"{friend} the {job} helped {name}, because a {job} {JOBS[job]} and helps friends too.",
                  f"{name} kept the {col} {obj} in a safe place under the bed."]),
        r.choice([f"At the end of the day, {name} felt {feel}.",
                  f"That night, {name} went to sleep feeling {feel}.",
                  f"{name} learned that sharing makes friends {feel}."]),
    ]
    if r.random() < 0.5:
        a, b = r.randint(2, 9), r.randint(2, 9)
        lines.insert(3, f"{name} counted {a} birds and then {b} more, so there were {a + b} birds in all.")
    return " ".join(lines)


def facts(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(4, 8)):
        kind = r.randrange(5)
        if kind == 0:
            a = r.choice(list(ANIMALS))
            out.append(r.choice([f"The {a} says {ANIMALS[a]}.", f"A {a} likes to eat {ANIMAL_FOOD[a]}."]))
        elif kind == 1:
            j = r.choice(list(JOBS))
            out.append(f"A {j} {JOBS[j]}.")
        elif kind == 2:
            t = r.choice(list(COLOURS))
            out.append(f"The colour of the {t} is {COLOURS[t]}.")
        elif kind == 3:
            w = r.choice(list(OPPOSITES))
            out.append(f"The opposite of {w} is {OPPOSITES[w]}.")
        else:
            n = r.randint(0, 19)
            out.append(f"After {NUMBER_WORDS[n]} comes {NUMBER_WORDS[n + 1]}.")
    return " ".join(out)


def arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(4, 10)):
        a, b = r.randint(0, 20), r.randint(0, 20)
        if r.random() < 0.6:
            out.append(f"{a} plus {b} equals {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            out.append(f"{a} minus {b} equals {a - b}.")
    return " ".join(out)


def pretrain_rows(n: int, r: random.Random) -> list[dict]:
    makers = [story, story, story, facts, arithmetic]
    rows = []
    for _ in range(n):
        doc = " ".join(r.choice(makers)(r) for _ in range(r.randint(1, 3)))
        rows.append({"text": doc})
    return rows


def qa(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(8)
    if kind == 0:
        a, b = r.randint(0, 20), r.randint(0, 20)
        return r.choice([f"What is {a} plus {b}?", f"How much is {a} plus {b}?"]), f"{a} plus {b} equals {a + b}."
    if kind == 1:
        a, b = sorted((r.randint(0, 20), r.randint(0, 20)), reverse=True)
        return f"What is {a} minus {b}?", f"{a} minus {b} equals {a - b}."
    if kind == 2:
        a = r.choice(list(ANIMALS))
        return r.choice([f"What does the {a} say?", f"What sound does a {a} make?"]), f"The {a} says {ANIMALS[a]}."
    if kind == 3:
        a = r.choice(list(ANIMALS))
        return f"What does a {a} like to eat?", f"A {a} likes to eat {ANIMAL_FOOD[a]}."
    if kind == 4:
        j = r.choice(list(JOBS))
        return r.choice([f"What does a {j} do?", f"Tell me what a {j} does."]), f"A {j} {JOBS[j]}."
    if kind == 5:
        t = r.choice(list(COLOURS))
        return f"What colour is the {t}?", f"The colour of the {t} is {COLOURS[t]}."
    if kind == 6:
        w = r.choice(list(OPPOSITES))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."
    return "Tell me a short story.", story(r)


SYSTEM = ["You are a helpful assistant.", "You answer briefly and kindly.", "You are a friendly helper."]
GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to know?"),
             ("Thank you!", "You are welcome!"), ("Who are you?", "I am a small assistant. I can answer simple questions.")]


def instruct_rows(n: int, r: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        msgs = []
        if r.random() < 0.3:
            msgs.append({"role": "system", "content": r.choice(SYSTEM)})
        for _ in range(1 if r.random() < 0.75 else 2):
            q, a = r.choice(GREETINGS) if r.random() < 0.08 else qa(r)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> int:
    here = Path(__file__).resolve().parent
    write_jsonl(here / "pretrain.jsonl", pretrain_rows(10_000, random.Random(1234)))
    write_jsonl(here / "instruct.jsonl", instruct_rows(4_000, random.Random(5678)))
    for name in ("pretrain.jsonl", "instruct.jsonl"):
        p = here / name
        print(f"{p}: {sum(1 for _ in p.open())} rows, {p.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
