"""The extraction app's generator and scorer: seeded dataset, its distractors, normalization
and scoring."""

from __future__ import annotations

import re

import pytest

from apps.extraction.generate import ExtractionExample, generate_dataset
from apps.extraction.score import FIELDS, normalize, score

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@pytest.fixture(scope="module")
def dataset() -> list[ExtractionExample]:
    return generate_dataset(300, seed=11)


def test_same_seed_same_dataset_different_seed_different() -> None:
    assert generate_dataset(40, seed=3) == generate_dataset(40, seed=3)
    first, other = generate_dataset(40, seed=3), generate_dataset(40, seed=4)
    assert [e.article for e in first] != [e.article for e in other]
    assert sum(a.article == b.article for a, b in zip(first, other, strict=True)) == 0


def test_ids_are_unique_and_name_the_seed(dataset: list[ExtractionExample]) -> None:
    assert len({e.id for e in dataset}) == len(dataset)
    assert dataset[3].id == "ex-s11-0003"


def test_truth_appears_verbatim(dataset: list[ExtractionExample]) -> None:
    for example in dataset:
        assert set(example.truth) == set(FIELDS)
        for field in FIELDS:
            assert example.truth[field] in example.article, (example.id, field)


def test_articles_have_three_to_eight_sentences(dataset: list[ExtractionExample]) -> None:
    for example in dataset:
        # Sentence ends: a period followed by a capitalized word, ignoring abbreviations.
        count = len(re.findall(r"[.!?\"](?:\s+(?=[A-Z\"ÉÁ])|$)", example.article))
        assert 3 <= count <= 8, (example.id, count, example.article)


def test_most_articles_carry_a_distractor_email(dataset: list[ExtractionExample]) -> None:
    with_other = [
        e for e in dataset if any(m != e.truth["email"] for m in EMAIL.findall(e.article))
    ]
    assert len(with_other) / len(dataset) > 0.75
    role_accounts = {m.split("@")[0] for e in dataset for m in EMAIL.findall(e.article)}
    assert {"press", "info", "newsroom"} <= role_accounts


def test_every_article_names_other_people(dataset: list[ExtractionExample]) -> None:
    for example in dataset:
        capitalized_pairs = set(re.findall(r"\b([A-Z][\w'-]+ [A-Z][\w'-]+)\b", example.article))
        assert len(capitalized_pairs - {example.truth["name"]}) >= 1, example.article


def test_variety_of_templates_countries_and_names(dataset: list[ExtractionExample]) -> None:
    countries = {e.truth["address"].rsplit(", ", 1)[1] for e in dataset}
    assert {"USA", "United Kingdom", "Germany", "France", "Japan", "Canada"} <= countries
    openings = {" ".join(e.article.split()[:2]) for e in dataset}
    assert len(openings) >= 30
    contact_phrases = ["For inquiries", "can be reached", "To register", "contact", "Bookings"]
    for phrase in contact_phrases:
        assert any(phrase in e.article for e in dataset), phrase
    assert len({e.truth["name"] for e in dataset}) > 150


def test_generate_rejects_non_positive_n() -> None:
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        generate_dataset(0, seed=1)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("name", "  ANN   Lee. ", "ann lee"),
        ("name", '"Étienne Garnier"', "étienne garnier"),
        ("email", "Mailto: Ann.Lee@X.ORG.", "ann.lee@x.org"),
        (
            "address",
            "1 Main St ,Springfield\nIL 62704 ,  USA",
            "1 main st, springfield, il 62704, usa",
        ),
        (
            "address",
            "Lindenstraße 4, 10115 Berlin, Germany.",
            "lindenstrasse 4, 10115 berlin, germany",
        ),
    ],
)
def test_normalize(field: str, value: str, expected: str) -> None:
    assert normalize(field, value) == expected


def test_normalize_rejects_unknown_field() -> None:
    with pytest.raises(ValueError, match="got 'phone'"):
        normalize("phone", "555")


TRUTH = {
    "name": "Anika Weber",
    "email": "anika.weber@altmark-solar.de",
    "address": "Lindenstraße 42, 10115 Berlin, Germany",
}


def test_score_exact_match() -> None:
    result = score(dict(TRUTH), TRUTH)
    assert result.matches == {"name": True, "email": True, "address": True}
    assert result.accuracy == 1.0


def test_score_forgives_case_spacing_and_edge_punctuation() -> None:
    pred = {
        "name": "anika  WEBER.",
        "email": " Anika.Weber@Altmark-Solar.de",
        "address": "Lindenstraße 42,10115 Berlin,\nGermany",
    }
    assert score(pred, TRUTH).accuracy == 1.0


def test_score_wrong_and_missing_fields() -> None:
    pred = {"name": "Jonas Brandt", "email": "press@altmark-solar.de", "address": None}
    result = score(pred, TRUTH)
    assert result.matches == {"name": False, "email": False, "address": False}
    assert result.accuracy == 0.0
    partial = score({"name": "Anika Weber", "address": "Lindenstraße 42, Berlin"}, TRUTH)
    assert partial.matches == {"name": True, "email": False, "address": False}
    assert partial.accuracy == pytest.approx(1 / 3)


def test_truth_must_have_all_fields() -> None:
    with pytest.raises(ValueError, match="truth must have keys"):
        ExtractionExample(id="x", article="a", truth={"name": "A"})
