"""Chat personas of the personalization bench: sentence templates in one fixed style each.

A persona is a set of templates and the words that fill their slots; `persona_sentences`
fills them at random with a seed, so feedback and held-out text can come from different
fillings of the same style and vocabulary (`personalization_data.persona_user`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

#: name -> (templates, slot vocabularies): one fixed style and vocabulary per persona.
PERSONAS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "pirate": (
        [
            "Arr, {name}, ye'll be wantin' the {thing} stowed below afore {time}.",
            "Shiver me timbers, the {thing} be {state} again!",
            "Hoist the {sail} an' make fer {place}, ye scurvy {insult}!",
            "Aye, {name}, that {thing} be worth more than a chest o' {treasure}.",
            "Batten down the hatches, mateys, a {weather} be blowin' in from {place}.",
            "Yo ho, {name}! Fetch me {treasure} from the hold, an' be quick about it.",
            "Avast! No {insult} touches me {thing} while I be captain o' this ship.",
        ],
        {
            "name": [
                "Bootstrap Bill",
                "One-Eyed Jack",
                "Mary Read",
                "Calico Jim",
                "Salty Pete",
                "Anne Bonny",
                "Barnacle Ben",
                "Redbeard",
            ],
            "thing": [
                "rum",
                "cannon",
                "map",
                "spyglass",
                "anchor",
                "parrot",
                "cutlass",
                "powder keg",
                "compass",
            ],
            "time": ["dawn", "the tide turns", "the moon rises", "the next bell", "nightfall"],
            "state": [
                "soaked through",
                "gone missin'",
                "cursed",
                "rusted",
                "half sunk",
                "full o' weevils",
            ],
            "sail": ["mainsail", "jib", "topsail", "Jolly Roger", "mizzen"],
            "place": [
                "Tortuga",
                "Skull Island",
                "the Spanish Main",
                "Port Royal",
                "Davy Jones' locker",
                "the Dry Tortugas",
            ],
            "insult": ["bilge rat", "landlubber", "swab", "barnacle-brain", "sea dog"],
            "treasure": ["doubloons", "pieces o' eight", "gold", "rubies", "silver"],
            "weather": ["squall", "gale", "storm", "fog bank", "hurricane"],
        },
    ),
    "terse-sre": (
        [
            "ack. {service} p99 at {n}ms, paging {team}.",
            "rollback {service} to v{major}.{minor}. root cause tbd.",
            "{service}: {n} pods crashlooping, OOMKilled. bumping limit to {mem}Mi.",
            "lgtm. ship after the {day} freeze.",
            "disk {pct}% on {host}. rotating logs.",
            "incident {n} resolved. postmortem {day}.",
            "{host} unreachable. failing over to {region}.",
        ],
        {
            "service": [
                "api-gw",
                "auth",
                "billing",
                "search",
                "ingest",
                "checkout",
                "cdn-edge",
                "queue-worker",
            ],
            "n": [str(n) for n in (3, 7, 12, 40, 85, 120, 250, 430, 900, 1200)],
            "team": ["#oncall-core", "#payments", "#infra", "#data", "#platform"],
            "major": ["1", "2", "3", "4"],
            "minor": [str(n) for n in range(10)],
            "mem": ["512", "768", "1024", "2048", "4096"],
            "day": ["mon", "tue", "wed", "thu", "fri"],
            "pct": ["87", "91", "94", "97", "99"],
            "host": ["db-01", "db-02", "cache-3", "web-7", "etcd-2", "kafka-4"],
            "region": ["us-east-2", "eu-west-1", "ap-south-1", "us-west-2"],
        },
    ),
    "butler": (
        [
            "Very good, {title}. I shall have the {thing} brought to the {room} directly.",
            "If I may be so bold, {title}, the {guest} has waited in the {room} since {time}.",
            "I regret to inform you, {title}, that the {thing} has been {state}.",
            "Shall I lay out the {garment} for this evening, {title}?",
            "The {guest} sends {pl} compliments, {title}, and begs the pleasure of your company.",
            "Dinner will be served in the {room} at {time}, {title}.",
        ],
        {
            "title": ["sir", "madam", "my lord", "your ladyship", "Master Richard"],
            "thing": ["tea", "silver", "post", "carriage", "sherry", "morning paper", "claret"],
            "room": [
                "library",
                "drawing room",
                "conservatory",
                "east wing",
                "study",
                "morning room",
            ],
            "guest": ["vicar", "Duchess", "Colonel", "solicitor", "Lady Agatha", "Bishop"],
            "time": [
                "half past four",
                "seven o'clock",
                "a quarter to eight",
                "noon",
                "eleven o'clock",
            ],
            "state": [
                "mislaid",
                "delayed by the weather",
                "polished twice",
                "sent for",
                "returned unopened",
            ],
            "garment": [
                "dinner jacket",
                "grey morning coat",
                "tweeds",
                "evening gown",
                "velvet smoking jacket",
            ],
            "pl": ["her", "his", "their"],
        },
    ),
    "sourdough": (
        [
            "ok so my {starter} doubled in {hours} hours, is that enough to bake with?",
            "lol the {loaf} came out {result} again, {hydration}% hydration was too much",
            "fed the {starter} {ratio} this morning and it smells like {smell} now??",
            "anyone else do the {fold} at {minutes} min intervals? my crumb is still {crumb}",
            "tried {flour} this time and omg the {loaf} rose so much better",
            "bulk ferment went {hours} hours at {temp}F, then overnight in the fridge",
        ],
        {
            "starter": ["starter", "levain", "mother dough", "rye starter"],
            "hours": ["4", "5", "6", "8", "10", "12"],
            "loaf": ["boule", "batard", "focaccia", "sandwich loaf", "baguette"],
            "result": ["flat", "gummy", "pancake-y", "dense", "burnt on the bottom"],
            "hydration": ["65", "70", "75", "80", "85"],
            "ratio": ["1:1:1", "1:2:2", "1:5:5", "1:10:10"],
            "smell": ["nail polish", "vinegar", "beer", "yogurt", "gym socks"],
            "fold": ["stretch and folds", "coil folds", "lamination", "slap and fold"],
            "minutes": ["15", "20", "30", "45"],
            "crumb": ["tight", "gummy", "uneven", "full of tunnels"],
            "flour": ["bread flour", "whole wheat", "spelt", "einkorn", "a 20% rye mix"],
            "temp": ["72", "75", "78", "80"],
        },
    ),
    "fantasy-football": (
        [
            "benching {player} this week, {team} D is a brick wall",
            "smash play: {player} vs {team}, {n}+ yards easy",
            "waiver claim on {player} went through, dropped {player2} lol",
            "who do i flex, {player} or {player2}? ppr league",
            "{player} on a snap count again smh, {n} touches max",
            "trade offer: my {player} for your {player2} + a {round} round pick",
        ],
        {
            "player": ["Kelce", "CMC", "Jefferson", "Chase", "Hurts", "Bijan", "Lamb"],
            "player2": ["Pacheco", "Olave", "Kittle", "Etienne", "Nacua", "Achane"],
            "team": ["Ravens", "Jets", "Browns", "Niners", "Cowboys", "Bills"],
            "n": ["60", "80", "100", "120"],
            "round": ["2nd", "3rd", "4th", "5th"],
        },
    ),
}


def persona_sentences(name: str, seed: int) -> Iterable[str]:
    """An endless stream of the persona's sentences, filled at random with `seed`."""
    templates, slots = PERSONAS[name]
    rng = random.Random(f"{name}/{seed}")
    while True:
        template = rng.choice(templates)
        fill = {key: rng.choice(values) for key, values in slots.items() if f"{{{key}}}" in
                template}  # fmt: skip
        yield template.format(**fill)
