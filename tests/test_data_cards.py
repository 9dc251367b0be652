"""Data cards stay in step with the named corpora (lmprune.core.data.NAMED) and the files they
read."""

from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from lmprune.core.data import NAMED, data_dir, load_corpus

CARDS = Path(__file__).resolve().parents[1] / "data_cards"
REQUIRED = {"license", "language", "task_categories", "size_categories", "source_datasets",
            "pretty_name"}
SECTIONS = ["## Dataset Description", "## Source", "## License", "## Size", "## Language",
            "## Content warning", "## How lmprune uses it", "## Known biases and limitations",
            "## Citation"]


def _cards() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(CARDS.glob("*.md"))}


@pytest.mark.parametrize("card", sorted(p.name for p in CARDS.glob("*.md")))
def test_data_card_has_the_hub_metadata_and_sections(card):
    data = DatasetCard.load(CARDS / card).data.to_dict()
    assert REQUIRED <= set(data), f"{card} lacks {REQUIRED - set(data)}"
    text = (CARDS / card).read_text(encoding="utf-8")
    assert [s for s in SECTIONS if s not in text] == []


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_named_corpus_has_a_card_with_its_file_and_size(name):
    """The card that names the shortcut's file also names the shortcut and the number of
    documents lmprune reads from it (counted here from the file itself)."""
    file_name = NAMED[name][0].split("?")[0]
    cards = [text for text in _cards().values() if f"`{file_name}`" in text]
    assert cards, f"no data card in data_cards/ mentions {file_name} (used by {name})"
    if data_dir() is None or not (data_dir() / file_name).is_file():
        pytest.skip("LMPRUNE_DATA_DIR does not hold the shared data sets")
    documents = len(load_corpus(name).texts)
    assert any(f"`{name}`" in text and f"{documents:,} documents" in text for text in cards)
