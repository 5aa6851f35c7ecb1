"""Write the demo's synthetic KTO set, kto_scale/assets/demo_kto.jsonl (seeded: the same file every time).

    python launch/make_demo_data.py [--output PATH] [--rows 600] [--seed 0]

Every prompt asks about a topic; a desirable reply is courteous, an undesirable one rude, each assembled
from random phrases around the topic. The preference is a property of the completion alone, so even
the demo's tiny random-init model can learn it and carry it to held-out prompts and phrasings it never
trained on: its held-out reward accuracy rises well above chance.
"""

import argparse
import json
import random
from pathlib import Path

from kto_scale.assets import DEMO_DATA
from kto_scale.atomic import write_atomic

TOPICS = ["the moon", "bread", "rain", "chess", "rivers", "owls", "trains", "music", "tea", "maps", "bees",
          "snow", "paint", "clocks", "ships", "gardens", "bridges", "stars", "cheese", "kites", "forests",
          "volcanoes", "glass", "letters", "wolves", "islands", "candles", "tigers", "deserts", "bicycles"]
ASKS = ["Can you tell me about {}?", "What do you know about {}?", "Write a short note on {}.",
        "Explain {} to a child.", "Give me one fact about {}.", "Why do people like {}?",
        "Teach me something about {}.", "Describe {} in two sentences.", "Say something nice about {}.",
        "Tell me a story about {}."]
COURTEOUS = (["Of course!", "Happy to help.", "Sure, gladly.", "Great question.", "With pleasure."],
             ["Here is a short note about {}.", "Let me explain {} step by step.", "Here is what I know about {}.",
              "{} is a lovely thing to learn about."],
             ["Thank you for asking.", "I hope this helps.", "Have a lovely day.", "Ask me anything else."])
RUDE = (["No.", "Ugh, again?", "Not my problem.", "Whatever.", "Go away."],
        ["I will not talk about {}.", "{} is boring.", "Nobody cares about {}.", "Look up {} yourself."],
        ["Stop asking me.", "Figure it out yourself.", "Leave me alone.", "Do not bother me."])


def reply(phrases: tuple[list[str], ...], topic: str, rng: random.Random) -> str:
    sentences = [rng.choice(part).format(topic) for part in phrases]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def rows(n: int, seed: int) -> list[dict]:
    """n rows, half desirable: each prompt once with a courteous and once with a rude reply."""
    rng = random.Random(seed)
    prompts = [ask.format(topic) for topic in TOPICS for ask in ASKS]
    rng.shuffle(prompts)
    out = []
    for prompt in prompts[: n // 2]:
        topic = next(t for t in TOPICS if t in prompt)
        out.append({"prompt": prompt, "completion": reply(COURTEOUS, topic, rng), "label": True})
        out.append({"prompt": prompt, "completion": reply(RUDE, topic, rng), "label": False})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEMO_DATA)
    parser.add_argument("--rows", type=int, default=600, help=f"at most {2 * len(TOPICS) * len(ASKS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_atomic(args.output, "".join(json.dumps(row) + "\n" for row in rows(args.rows, args.seed)))
    print(f"{args.rows} rows written to {args.output}")


if __name__ == "__main__":
    main()
