"""Write the extraction app's dataset: seeded news articles with one contact person each.

    python apps/extraction/generate.py            # data.jsonl beside this file, 200 rows, seed 0
    python apps/extraction/generate.py --rows 40 --seed 3 --out /tmp/more.jsonl

Articles are short news items in several shapes; each names several people but gives contact
details for exactly one (the subject), and most also carry a press or newsroom email and
mention places that are not the subject's address, so a model has to read rather than grab
the first email it sees. Addresses follow the postal conventions of seven countries. Each row
is {"id", "article", "name", "email", "address"}; the same (rows, seed) always writes the
same rows, and the first n rows of a longer file are the n rows of a shorter one.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from apps.extraction.score import FIELDS

DEFAULT_ROWS = 200
DEFAULT_OUT = Path(__file__).resolve().parent / "data.jsonl"


class ExtractionExample(BaseModel):
    """One article with the contact details a perfect extractor returns."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Stable identifier, e.g. 'ex-s7-0003' (seed 7, index 3).")
    article: str = Field(description="The article text given to the application.")
    truth: dict[str, str] = Field(
        description="Ground truth: one entry per field in FIELDS, each verbatim in the article."
    )

    @field_validator("truth")
    @classmethod
    def _truth_has_fields(cls, truth: dict[str, str]) -> dict[str, str]:
        if set(truth) != set(FIELDS):
            raise ValueError(f"truth must have keys {list(FIELDS)}, got {sorted(truth)}")
        return truth

    def row(self) -> dict[str, str]:
        """The example as a row of data.jsonl."""
        return {"id": self.id, "article": self.article, **self.truth}


# --------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------

_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "english": (
        ("Emily", "James", "Olivia", "Daniel", "Hannah", "Marcus", "Grace", "Owen", "Ruth"),
        ("Carter", "Whitfield", "Hughes", "Brennan", "Pryce", "Oakley", "Sutton", "Lowe"),
    ),
    "german": (
        ("Anika", "Jonas", "Katrin", "Matthias", "Lena", "Tobias", "Friederike", "Uwe"),
        ("Weber", "Hoffmann", "Schäfer", "Krüger", "Brandt", "Vogel", "Lindner", "Seidel"),
    ),
    "french": (
        ("Camille", "Étienne", "Margaux", "Julien", "Sophie", "Théo", "Hélène", "Luc"),
        ("Moreau", "Lefèvre", "Garnier", "Rousseau", "Chevalier", "Fontaine", "Dupont"),
    ),
    "japanese": (
        ("Haruka", "Kenji", "Yui", "Takumi", "Aiko", "Ren", "Sakura", "Daisuke"),
        ("Tanaka", "Watanabe", "Kobayashi", "Yamamoto", "Nakamura", "Inoue", "Sato"),
    ),
    "spanish": (
        ("Lucía", "Mateo", "Carmen", "Diego", "Valeria", "Andrés", "Isabel", "Javier"),
        ("García", "Fernández", "Ortega", "Navarro", "Romero", "Delgado", "Castillo"),
    ),
    "indian": (
        ("Priya", "Arjun", "Ananya", "Rohan", "Kavya", "Vikram", "Meera", "Sanjay"),
        ("Sharma", "Iyer", "Reddy", "Banerjee", "Menon", "Kapoor", "Desai", "Nair"),
    ),
    "nigerian": (
        ("Chiamaka", "Tunde", "Ngozi", "Emeka", "Folake", "Obinna", "Adaeze", "Segun"),
        ("Okafor", "Adeyemi", "Eze", "Balogun", "Nwosu", "Okonkwo", "Adebayo"),
    ),
    "chinese": (
        ("Wei", "Mei", "Jun", "Xiaoling", "Hao", "Lan", "Yifan", "Qing"),
        ("Zhang", "Chen", "Liu", "Wang", "Huang", "Zhou", "Lin", "Xu"),
    ),
}

_ORGS: tuple[tuple[str, str], ...] = (
    ("Northfield Robotics", "northfield-robotics.com"),
    ("the Meridian Institute", "meridian-institute.org"),
    ("Bluewater Analytics", "bluewater-analytics.io"),
    ("Harbor Lane Bakery", "harborlanebakery.com"),
    ("the Riverside Historical Society", "riversidehistory.org"),
    ("Copperleaf Books", "copperleafbooks.co"),
    ("Altmark Solar", "altmark-solar.de"),
    ("Atelier Verdure", "atelier-verdure.fr"),
    ("Sakuragi Design Studio", "sakuragi-design.jp"),
    ("Maple Crest Veterinary Clinic", "maplecrestvet.ca"),
    ("Greenway Transit Alliance", "greenwaytransit.org"),
    ("Quillon Biotech", "quillonbio.com"),
    ("the Lakeshore Chamber Orchestra", "lakeshorechamber.org"),
    ("Pinecone Software", "pineconesoftware.dev"),
)

_OUTLETS: tuple[tuple[str, str], ...] = (
    ("The Daily Ledger", "dailyledger.com"),
    ("Riverside Courier", "riversidecourier.net"),
    ("Metro Weekly", "metroweekly.news"),
    ("The Harbour Gazette", "harbourgazette.co.uk"),
    ("Civic Post", "civicpost.org"),
)

_TOPICS: tuple[str, ...] = (
    "a low-cost water sensor for allotments",
    "a study of night-time traffic noise",
    "a volunteer program that repairs old bicycles",
    "an oral history of the town's textile mills",
    "a prototype battery made from recycled glass",
    "a reading club for teenagers",
    "a map of the region's oldest trees",
    "a weekend course on sourdough baking",
    "an app that tracks late buses",
    "a survey of urban bee populations",
)


@dataclass(frozen=True)
class _Country:
    """A country's postal format: a function from the generator to one address string."""

    name: str
    cities: tuple[str, ...]
    make_address: Callable[[random.Random], str]


def _us_address(rng: random.Random) -> str:
    number = rng.randint(100, 9899)
    street = rng.choice(("Maple Avenue", "Oak Street", "Cedar Lane", "Lincoln Road", "Elm Drive"))
    city, state, zip_prefix = rng.choice(
        (
            ("Springfield", "IL", "627"),
            ("Madison", "WI", "537"),
            ("Portland", "OR", "972"),
            ("Austin", "TX", "787"),
            ("Burlington", "VT", "054"),
        )
    )
    unit = f", Apt {rng.randint(1, 40)}{rng.choice('ABCD')}" if rng.random() < 0.4 else ""
    return f"{number} {street}{unit}, {city}, {state} {zip_prefix}{rng.randint(10, 99)}, USA"


def _uk_address(rng: random.Random) -> str:
    number = rng.randint(1, 220)
    street = rng.choice(("Kingsley Road", "Mill Lane", "Victoria Street", "Orchard Close"))
    city, area = rng.choice(
        (
            ("Leeds", "LS"),
            ("Bristol", "BS"),
            ("Manchester", "M"),
            ("York", "YO"),
            ("Leicester", "LE"),
        )
    )
    postcode = f"{area}{rng.randint(1, 28)} {rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
    postcode += rng.choice("ABDEFGHJLNPQRSTUWXYZ")
    return f"{number} {street}, {city} {postcode}, United Kingdom"


def _german_address(rng: random.Random) -> str:
    street = rng.choice(("Lindenstraße", "Bahnhofstraße", "Gartenweg", "Schillerplatz", "Am Markt"))
    city, zip_prefix = rng.choice(
        (("Berlin", "10"), ("Hamburg", "20"), ("Leipzig", "04"), ("Freiburg", "79"))
    )
    return f"{street} {rng.randint(1, 140)}, {zip_prefix}{rng.randint(100, 999)} {city}, Germany"


def _french_address(rng: random.Random) -> str:
    street = rng.choice(
        ("rue des Lilas", "avenue Jean Jaurès", "boulevard Voltaire", "rue Pasteur")
    )
    city, dept = rng.choice((("Lyon", "69"), ("Nantes", "44"), ("Bordeaux", "33"), ("Lille", "59")))
    postcode = f"{dept}{rng.randint(0, 99):02d}0"
    return f"{rng.randint(1, 90)} {street}, {postcode} {city}, France"


def _japanese_address(rng: random.Random) -> str:
    district, ward, city = rng.choice(
        (
            ("Jingumae", "Shibuya-ku", "Tokyo"),
            ("Nishiki", "Naka-ku", "Nagoya"),
            ("Umeda", "Kita-ku", "Osaka"),
            ("Gion", "Higashiyama-ku", "Kyoto"),
        )
    )
    block = f"{rng.randint(1, 6)}-{rng.randint(1, 30)}-{rng.randint(1, 20)}"
    postcode = f"{rng.randint(100, 699)}-{rng.randint(0, 9999):04d}"
    return f"{block} {district}, {ward}, {city} {postcode}, Japan"


def _canadian_address(rng: random.Random) -> str:
    street = rng.choice(("Queen Street West", "Rue Saint-Denis", "Jasper Avenue", "Robson Street"))
    city, province, letter = rng.choice(
        (
            ("Toronto", "ON", "M"),
            ("Montréal", "QC", "H"),
            ("Edmonton", "AB", "T"),
            ("Vancouver", "BC", "V"),
        )
    )
    letters = "ABCEGHJKLMNPRSTVXY"
    postcode = (
        f"{letter}{rng.randint(1, 9)}{rng.choice(letters)} "
        f"{rng.randint(1, 9)}{rng.choice(letters)}{rng.randint(0, 9)}"
    )
    return f"{rng.randint(10, 2400)} {street}, {city}, {province} {postcode}, Canada"


def _australian_address(rng: random.Random) -> str:
    street = rng.choice(("Wattle Street", "Brunswick Road", "Harbour Parade", "Gum Tree Lane"))
    suburb, state, postcode = rng.choice(
        (("Fitzroy", "VIC", "3065"), ("Newtown", "NSW", "2042"), ("Fremantle", "WA", "6160"))
    )
    return f"{rng.randint(1, 300)} {street}, {suburb} {state} {postcode}, Australia"


_COUNTRIES: tuple[_Country, ...] = (
    _Country("USA", ("Chicago", "Denver", "Boston"), _us_address),
    _Country("United Kingdom", ("Sheffield", "Norwich", "Cardiff"), _uk_address),
    _Country("Germany", ("Munich", "Cologne", "Dresden"), _german_address),
    _Country("France", ("Paris", "Toulouse", "Rennes"), _french_address),
    _Country("Japan", ("Sapporo", "Fukuoka", "Sendai"), _japanese_address),
    _Country("Canada", ("Ottawa", "Calgary", "Halifax"), _canadian_address),
    _Country("Australia", ("Perth", "Hobart", "Adelaide"), _australian_address),
)


# --------------------------------------------------------------------------------------------
# People and emails
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Person:
    first: str
    last: str

    @property
    def full(self) -> str:
        return f"{self.first} {self.last}"


def _ascii(text: str) -> str:
    """ASCII-fold a name for an email local part ('Schäfer' -> 'schafer')."""
    folded = unicodedata.normalize("NFKD", text.replace("ß", "ss"))
    return re.sub(r"[^a-z]", "", folded.encode("ascii", "ignore").decode().lower())


def _email_for(person: _Person, domain: str, rng: random.Random) -> str:
    first, last = _ascii(person.first), _ascii(person.last)
    local = rng.choice(
        (f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}", f"{first}{last[0]}")
    )
    return f"{local}@{domain}"


def _people(rng: random.Random, count: int) -> list[_Person]:
    """Distinct people, each from a randomly chosen name pool."""
    chosen: list[_Person] = []
    while len(chosen) < count:
        firsts, lasts = _NAMES[rng.choice(sorted(_NAMES))]
        person = _Person(rng.choice(firsts), rng.choice(lasts))
        if all(p.first != person.first and p.last != person.last for p in chosen):
            chosen.append(person)
    return chosen


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slots:
    """Everything a template may mention; only subject/email/address are the truth."""

    subject: _Person
    others: tuple[_Person, ...]
    email: str
    address: str
    org: str
    org_domain: str
    topic: str
    other_city: str
    outlet: str
    outlet_domain: str
    count: int
    weekday: str
    month: str


def _research(s: _Slots, rng: random.Random) -> list[str]:
    a, b = s.others[0], s.others[1]
    return [
        f"Researchers at {s.org} have published {s.topic}, drawing on data from {s.other_city}.",
        f"The project was led by {s.subject.full}, working with {a.full} and {b.full}.",
        f"According to {a.last}, the first results surprised the team.",
        rng.choice(
            (
                f"The group plans to expand the work next {s.month}.",
                f"A public talk is planned for {s.weekday} evening.",
            )
        ),
        f"For inquiries, contact {s.subject.full} at {s.email} or write to {s.address}.",
    ]


def _appointment(s: _Slots, rng: random.Random) -> list[str]:
    a = s.others[0]
    return [
        f"{s.org} has appointed {s.subject.full} to lead its new office.",
        f"{s.subject.first} {s.subject.last} joins after {rng.randint(4, 19)} years in the field.",
        f'"We are delighted," said chief executive {a.full}.',
        f"The office will open in {s.month} with {s.count} staff.",
        f"{s.subject.last} can be reached by email at {s.email}; "
        f"postal correspondence should go to {s.subject.full}, {s.address}.",
        f"Press enquiries: press@{s.org_domain}.",
    ]


def _community_event(s: _Slots, rng: random.Random) -> list[str]:
    a, b = s.others[0], s.others[1]
    return [
        f"Neighbours are invited to an open afternoon about {s.topic} this {s.weekday}.",
        f"Organiser {s.subject.full} expects around {s.count} participants.",
        f"Last year, volunteers including {a.full} and {b.full} helped run the stalls.",
        rng.choice(
            (
                "Entry is free and refreshments will be provided.",
                "Children are welcome when accompanied by an adult.",
            )
        ),
        f"To register, email {s.email} or send a letter to {s.subject.full} at {s.address}.",
    ]


def _letter_appeal(s: _Slots, rng: random.Random) -> list[str]:
    a = s.others[0]
    return [
        f"A reader from {s.other_city} has asked for help tracing a family photograph album.",
        f"{s.subject.full} believes the album was sold at a market in {s.month}.",
        f"It once belonged to {s.subject.first}'s grandmother, a friend of {a.full}.",
        f"Anyone with information is asked to contact {s.subject.full} directly: "
        f"{s.email}, or by post at {s.address}.",
    ] + (["The album has a green cloth cover and about 40 pages."] if rng.random() < 0.5 else [])


def _shop_opening(s: _Slots, rng: random.Random) -> list[str]:
    a, b = s.others[0], s.others[1]
    return [
        f"{s.org} opens its doors on {s.weekday}, the owners announced.",
        f"Co-founder {a.full} said the idea grew out of {s.topic}.",
        f"Supplier {b.full} will host a tasting during the first week.",
        f"Bookings are handled by manager {s.subject.full} "
        f"({s.email}); the shop's address is {s.address}.",
        rng.choice(
            (
                f"General questions can go to info@{s.org_domain}.",
                f"Opening hours are posted on the {s.org} website.",
            )
        ),
    ]


def _award(s: _Slots, rng: random.Random) -> list[str]:
    a, b = s.others[0], s.others[1]
    return [
        f"{s.subject.full} has won this year's regional prize for {s.topic}.",
        f"The jury, chaired by {a.full}, praised the work's clarity.",
        f"Runner-up {b.full} received a special mention.",
        f"The award ceremony takes place in {s.other_city} in {s.month}.",
        f"Nominations for next year may be sent to {s.subject.first} {s.subject.last} at "
        f"{s.email} or mailed to {s.address}.",
    ]


def _qa_profile(s: _Slots, rng: random.Random) -> list[str]:
    a = s.others[0]
    return [
        f"Five minutes with {s.subject.full}, who coordinates {s.topic}.",
        f"{s.subject.first} started the effort with {a.full} after a meeting in {s.other_city}.",
        f"So far about {s.count} people have taken part.",
        f"{a.last} now runs the workshop side, while {s.subject.last} handles sign-ups.",
        f"Contact: {s.subject.full}, {s.address}. Email: {s.email}.",
    ]


_TEMPLATES: tuple[Callable[[_Slots, random.Random], list[str]], ...] = (
    _research,
    _appointment,
    _community_event,
    _letter_appeal,
    _shop_opening,
    _award,
    _qa_profile,
)

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "March", "April", "June", "September", "October", "November")


def _footer(s: _Slots, rng: random.Random) -> str:
    return rng.choice(
        (
            f"Corrections can be sent to corrections@{s.outlet_domain}.",
            f"{s.outlet} newsroom: newsroom@{s.outlet_domain}.",
            f"Story tips: tips@{s.outlet_domain}.",
            f"Media contact for {s.org}: press@{s.org_domain}.",
        )
    )


def _example(rng: random.Random, seed: int, index: int) -> ExtractionExample:
    people = _people(rng, 3)
    subject, others = people[0], tuple(people[1:])
    org, org_domain = rng.choice(_ORGS)
    outlet, outlet_domain = rng.choice(_OUTLETS)
    country = rng.choice(_COUNTRIES)
    slots = _Slots(
        subject=subject,
        others=others,
        email=_email_for(subject, org_domain, rng),
        address=country.make_address(rng),
        org=org,
        org_domain=org_domain,
        topic=rng.choice(_TOPICS),
        other_city=rng.choice(country.cities),
        outlet=outlet,
        outlet_domain=outlet_domain,
        count=rng.randint(12, 400),
        weekday=rng.choice(_WEEKDAYS),
        month=rng.choice(_MONTHS),
    )
    sentences = rng.choice(_TEMPLATES)(slots, rng)
    if rng.random() < 0.85:
        sentences = [*sentences, _footer(slots, rng)]
    article = " ".join(sentences)
    if not article[:1].isupper():
        article = article[0].upper() + article[1:]
    truth = {"name": subject.full, "email": slots.email, "address": slots.address}
    return ExtractionExample(id=f"ex-s{seed}-{index:04d}", article=article, truth=truth)


def generate_dataset(n: int, seed: int) -> list[ExtractionExample]:
    """n articles with ground truth; the same (n, seed) always gives the same list."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    return [_example(rng, seed, index) for index in range(n)]


def write(path: Path, rows: int, seed: int) -> Path:
    """Write `rows` articles of `seed` as JSONL to path."""
    examples = generate_dataset(rows, seed)
    path.write_text("".join(json.dumps(e.row(), ensure_ascii=False) + "\n" for e in examples))
    return path


def main() -> None:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="articles to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the articles")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSONL file")
    args = parser.parse_args()
    write(args.out, args.rows, args.seed)


if __name__ == "__main__":
    main()
