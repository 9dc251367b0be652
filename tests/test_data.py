"""Corpora from local files, the Hub code path (on a local dataset folder) and named shortcuts."""

import json

import pytest

from lmprune.core.data import NAMED, load_corpus, resolve_spec
from lmprune.core.errors import LmpruneError


def test_txt_lines_and_blank_separated(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\n\ntwo words\n three \n")
    assert load_corpus(str(f)).texts == ["one", "two words", "three"]
    f.write_text("para one\nstill one\n\npara two\n")
    assert load_corpus(f"{f}?split=blank").texts == ["para one\nstill one", "para two"]


def test_a_mix_joins_its_parts_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("a1\na2\n")
    (tmp_path / "b.tsv").write_text("text\tother\nb1\tx\nb2\ty\n")
    mix = load_corpus(f"{tmp_path / 'a.txt'} + {tmp_path / 'b.tsv'}?column=text", limit=3)
    assert mix.texts == ["a1", "a2", "b1"]
    with pytest.raises(LmpruneError, match="not found"):
        load_corpus(f"{tmp_path / 'a.txt'} + {tmp_path / 'missing.txt'}")


def test_jsonl_dotted_field_and_missing_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": {"text": t}, "id": i})
                           for i, t in enumerate(["a b", "c"])))
    assert load_corpus(f"{f}?field=prompt.text").texts == ["a b", "c"]
    with pytest.raises(LmpruneError, match="no text field 'text'.*prompt, id"):
        load_corpus(str(f))


def test_tsv_column_missing_column_and_limit(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text('toxic\tneutral1\nx y\tz\n"q\nr"\tw\n')
    assert load_corpus(f"{f}?column=toxic").texts == ["x y", "q\nr"]
    assert load_corpus(f"{f}?column=toxic", limit=1).texts == ["x y"]
    with pytest.raises(LmpruneError, match="no column 'bad'.*toxic, neutral1"):
        load_corpus(f"{f}?column=bad")


def test_csv(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('text,label\n"hello, world",1\nbye,0\n')
    assert load_corpus(str(f)).texts == ["hello, world", "bye"]


def test_errors_missing_empty_unreadable_unknown_option(tmp_path):
    with pytest.raises(LmpruneError, match="not found"):
        load_corpus(str(tmp_path / "none.txt"))
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(LmpruneError, match="has no documents"):
        load_corpus(str(tmp_path / "e.txt"))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LmpruneError, match="not UTF-8"):
        load_corpus(str(tmp_path / "b.txt"))
    with pytest.raises(LmpruneError, match="unknown option"):
        load_corpus(f"{tmp_path / 'e.txt'}?colum=x")


def test_hub_code_path_on_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"prompt": {"text": f"p{i}"}, "challenging": i % 2 == 0} for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = f"hf:{folder}?split=train&column=prompt.text&where=challenging"
    assert load_corpus(spec).texts == ["p0", "p2", "p4"]
    assert load_corpus(spec.replace("where=", "where=!")).texts == ["p1", "p3", "p5"]
    with pytest.raises(LmpruneError, match="no column 'nope'"):
        load_corpus(f"hf:{folder}?split=train&column=nope")


def test_named_shortcuts_resolve_to_the_data_dir_or_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("LMPRUNE_DATA_DIR", str(tmp_path))
    assert resolve_spec("paradetox:toxic") == f"{tmp_path}/paradetox.tsv?column=toxic"
    monkeypatch.delenv("LMPRUNE_DATA_DIR")
    assert resolve_spec("wikitext2:test").startswith("hf:Salesforce/wikitext:wikitext-2-v1")
    assert resolve_spec("mine.txt") == "mine.txt"


@pytest.mark.parametrize("name,rows", [("paradetox:toxic", 11927), ("paradetox:neutral", 11927),
                                       ("rtp:challenging", 598), ("rtp:nontoxic", 1200)])
def test_named_shared_data_sets(name, rows):
    corpus = load_corpus(name)
    assert len(corpus.texts) == rows
    assert corpus.describe()["sha256"] == load_corpus(name).sha256
    assert set(NAMED) >= {name}


def test_paradetox_pairs_stay_aligned():
    toxic, neutral = load_corpus("paradetox:toxic"), load_corpus("paradetox:neutral")
    assert toxic.texts[0] == "he had steel balls too !"
    assert neutral.texts[0] == "he was brave too!"
