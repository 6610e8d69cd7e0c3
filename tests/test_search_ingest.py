"""Corpus readers: vendored JSONL, PubMed baseline XML (deletions, revisions), CT.gov v2 JSON."""

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from deepretrieval.search import ingest
from deepretrieval.search.ingest import (CorpusFormatError, SkipLog, check_date_filter, detect_format, iter_records,
                                         parse_date, read_ctgov, read_pubmed_xml)
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import build_index, build_summary

FIXTURES = Path(__file__).parent / "fixtures" / "search"
XML = FIXTURES / "pubmed_sample.xml.gz"
CTGOV_DIR = FIXTURES / "ctgov"
CTGOV_PAGE = FIXTURES / "ctgov_page.json"
SMALL_JSONL = FIXTURES / "small_corpus.jsonl"


@pytest.mark.parametrize("value,end,expected", [
    ("2005", False, 20050101), ("2005", True, 20051231), ("2005/03", False, 20050301),
    ("2005/03", True, 20050331), ("2005/03/15", False, 20050315), ("2005-03-15", True, 20050315),
    ("1999 Dec 02", False, 19991202), (2010, False, 20100101), (20100315, False, 20100315),
    ("Current", False, None), (None, False, None),
])
def test_parse_date(value, end, expected):
    assert parse_date(value, end=end) == expected


def test_detect_format(data_dir, tmp_path):
    assert detect_format(data_dir / "pubmed_mini" / "corpus.jsonl.gz") == "jsonl"
    assert detect_format(data_dir / "trials_sigir" / "corpus.jsonl.gz") == "jsonl"
    assert detect_format(FIXTURES / "small_corpus.jsonl") == "jsonl"
    assert detect_format(XML) == "pubmed-xml"
    assert detect_format(CTGOV_PAGE) == "ctgov"
    assert detect_format(CTGOV_DIR / "NCT00000102.json") == "ctgov"  # pretty-printed study
    bad = tmp_path / "x.txt"
    bad.write_text("hello")
    with pytest.raises(CorpusFormatError):
        detect_format(bad)


def test_vendored_jsonl_rows_are_normalised(data_dir):
    recs = iter_records(data_dir / "pubmed_mini" / "corpus.jsonl.gz")
    first = next(recs)
    assert first.id == "11006" and first.title.startswith("The processing of human bone marrow")
    assert first.abstract.startswith("Bone marrow was aspirated") and first.mesh == [] and first.pub_date is None
    trial = next(iter_records(data_dir / "trials_sigir" / "corpus.jsonl.gz"))
    assert trial.id == "NCT00000369" and trial.abstract.startswith("The purpose of this study")


def test_pubmed_xml_fields():
    recs = list(read_pubmed_xml(XML))
    assert [(r.id, r.deleted) for r in recs] == [
        ("10000001", False), ("10000002", False), ("10000003", False), ("10000004", False),
        ("10000005", False), ("10000005", False), ("10000004", True)]  # the book article is skipped
    a = recs[0]
    assert a.title == "Galactomannan detection for invasive aspergillosis in immunocompromised patients."
    assert a.abstract == ("BACKGROUND: Invasive aspergillosis is a serious fungal infection. "
                          "RESULTS: The serum galactomannan assay had a sensitivity of 71%.")
    assert a.mesh == ["Aspergillosis", "Humans", "Mannans"]
    assert a.mesh_major == ["Aspergillosis"]  # major through its qualifier
    assert a.qualifiers == ["Aspergillosis/diagnosis", "Mannans/blood"]
    assert a.pt == ["Journal Article", "Meta-Analysis"] and a.keywords == ["platelia"]
    assert a.pub_date == 20040316
    assert recs[1].pub_date == 19981201  # MedlineDate "1998 Dec-1999 Jan"
    assert recs[1].mesh_major == ["Atenolol"]
    assert recs[2].pub_date == 20120101 and recs[2].mesh == []
    assert recs[5].title == "Revised version about apixaban dosing." and recs[5].pub_date == 20110203


def test_pubmed_xml_index_applies_deletions_and_revisions(tmp_path):
    meta = build_index(XML, tmp_path / "idx", progress=False)
    assert meta["formats"] == ["pubmed-xml"] and meta["num_docs"] == 4 and meta["deletions"] == 1
    assert meta["has_major"] and meta["has_qualifiers"] and meta["has_dates"]
    e = LocalSearchEngine(tmp_path / "idx")

    def found(q, **kw):
        return set(e.search(q, k=10, **kw).ids)

    assert found("10000004[pmid]") == set() and found("deleted") == set()
    assert found("apixaban") == {"10000005"} and found("warfarin") == set()  # only the revision
    assert found("Aspergillosis/diagnosis[mh]") == {"10000001"}
    assert found("Aspergillosis/blood[mh]") == set()
    assert found("diagnosis[sh]") == {"10000001"}
    assert found("Atenolol[majr]") == {"10000002"} and found("Humans[majr]") == set()
    assert found("Humans[mh]") == {"10000001", "10000002"}
    assert found("*Aspergillosis/") == {"10000001"}  # Ovid major topic
    assert found("Hypertension/dt") == {"10000002"}  # Ovid subheading code
    assert found("2004[dp]") == {"10000001"}
    assert found("1998:1999[dp]") == {"10000002"}
    assert found("Meta-Analysis[pt]") == {"10000001"}
    assert found("platelia[ot]") == {"10000001"}
    assert found("aspergill*", min_date="2010") == {"10000003"}


def test_ctgov_studies(tmp_path):
    recs = list(iter_records(CTGOV_DIR))
    assert [r.id for r in recs] == ["NCT00000102", "NCT01234567"]
    a = recs[0]
    assert a.title == ("Congenital Adrenal Hyperplasia: Calcium Channel Blockers as Adjunctive Therapy "
                       "Study of Nifedipine in Children With Congenital Adrenal Hyperplasia")
    assert a.abstract.startswith("This study will test") and a.abstract.endswith("treated with glucocorticoids.")
    assert a.conditions == ["Adrenal Hyperplasia, Congenital"] and a.keywords == ["glucocorticoid sparing"]
    assert a.interventions == ["Nifedipine"] and a.mesh == ["Adrenal Hyperplasia, Congenital", "Nifedipine"]
    assert "Children aged 6 to 18" in a.eligibility
    assert a.pub_date == 19991019 and a.pt == ["INTERVENTIONAL", "PHASE1", "PHASE2"]
    page = list(read_ctgov(CTGOV_PAGE))
    assert [r.id for r in page] == ["NCT02000001", "NCT00000102"] and page[0].pub_date == 20131201
    # the bulk download is a zip of one JSON file per study
    zpath = tmp_path / "ctg.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(CTGOV_DIR.iterdir()):
            zf.write(f, f"ctg-studies/{f.name}")
    assert detect_format(zpath) == "ctgov" and [r.id for r in iter_records(zpath)] == ["NCT00000102", "NCT01234567"]


def test_ctgov_index_fields_and_revision(tmp_path):
    meta = build_index([CTGOV_DIR, CTGOV_PAGE], tmp_path / "idx", progress=False)
    assert meta["num_docs"] == 3
    e = LocalSearchEngine(tmp_path / "idx")

    def found(q):
        return set(e.search(q, k=10).ids)

    assert found("pregnancy") == {"NCT01234567"}  # eligibility criteria are searchable
    assert found("obesity") == {"NCT01234567"}  # conditions
    assert found('"revised title"[ti]') == {"NCT00000102"}  # the later copy replaced the first
    assert found("nifedipine") == set()
    assert found("2013[dp]") == {"NCT02000001"}


def test_bad_inputs_are_classified(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{not json}\n')
    with pytest.raises(CorpusFormatError, match=r"bad.jsonl:2"):
        list(iter_records(bad))
    noid = tmp_path / "noid.jsonl"
    noid.write_text('{"text": "no id here"}\n')
    with pytest.raises(CorpusFormatError, match="without an id"):
        list(iter_records(noid))
    with pytest.raises(CorpusFormatError, match="unknown corpus format"):
        list(iter_records(noid, "csv"))
    with pytest.raises(FileNotFoundError):
        list(iter_records(tmp_path / "missing.jsonl"))
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"protocolSection": {"identificationModule": {}}}))
    with pytest.raises(CorpusFormatError, match="nctId"):
        list(iter_records(study))


# ----------------------------------------------------------------------------- bad input (issue 19)

@pytest.mark.parametrize("value,end,expected", [
    ("2020/13/45", False, None), ("2020/00/10", False, None), ("2021/02/29", False, None),
    ("2020/02/29", True, 20200229), ("2020/02", True, 20200231), ("2020/04", False, 20200401), ("2005 Foo 12", False, None), (20201345, False, None), (20200230, False, None),
    (True, False, None), ("2005-03-15T10:00:00Z", False, 20050315), (2005.0, True, 20051231),
])
def test_parse_date_rejects_days_that_do_not_exist(value, end, expected):
    assert parse_date(value, end=end) == expected


def test_check_date_filter():
    assert check_date_filter("2020/2/29") == 20200229 and check_date_filter("2020", end=True) == 20201231
    assert check_date_filter("2019-02", end=True) == 20190231 and check_date_filter("2019.12.31") == 20191231
    for bad in ("2020/13/45", "2019/02/29", "2020/1/1x", "2020-01/05", "20", "2005 Mar", "", "2020/1/"):
        with pytest.raises(ValueError, match="is not a valid date"):
            check_date_filter(bad, name="--min-date")


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def doc(i, **extra):
    return json.dumps({"id": f"g{i}", "title": f"good record {i}", "text": "aspirin", **extra})


def test_bad_records_are_skipped_and_counted(tmp_path):
    corpus = write_lines(tmp_path / "mixed.jsonl", [
        doc(1),
        "{not json",                                       # invalid JSON
        "[" * 100_000 + "]" * 100_000,                      # nested too deeply (a list: also not an object)
        '{"a": ' * 100_000 + "1" + "}" * 100_000,           # nested too deeply
        "[1, 2]",                                           # not an object
        json.dumps({"title": "no id"}),                     # no id
        json.dumps({"id": {"x": 1}, "title": "dict id"}),   # bad id
        json.dumps({"id": True, "title": "bool id"}),       # bad id
        json.dumps({"id": "g9", "mesh": 5}),                # mesh is not a list: wrong type
        b'{"id": "latin", "title": "caf\xe9"}',             # not UTF-8
        '{"id": "surrogate", "title": "\\ud800"}',          # a lone surrogate tantivy cannot take
        doc(2),
        "",
        doc(3),
    ])
    meta = build_index(corpus, tmp_path / "idx", progress=False)
    assert meta["num_docs"] == 3 and meta["records_added"] == 3
    assert meta["skipped"] == {"JSON nested too deeply": 2, "bad id": 2, "cannot be indexed": 1,
                               "fields of the wrong type": 1, "invalid JSON": 1, "no id": 1, "not UTF-8": 1,
                               "not a JSON object": 1}
    assert meta["records_read"] == 3 + 10 and meta["duplicates"] == 0
    assert meta["skipped_examples"][0] == f"{corpus}:2: invalid JSON (Expecting property name enclosed in double " \
                                          "quotes)"
    assert set(LocalSearchEngine(tmp_path / "idx").search("aspirin").ids) == {"g1", "g2", "g3"}
    # strict reading (no SkipLog) still stops at the first bad record, naming file and line
    with pytest.raises(CorpusFormatError, match=r"mixed.jsonl:2: invalid JSON"):
        list(iter_records(corpus))
    skips = SkipLog(max_examples=2)
    assert [r.id for r in iter_records(corpus, skips=skips)] == ["g1", "surrogate", "g2", "g3"]
    assert skips.total == 9 and len(skips.examples) == 2


def test_overlong_line_is_skipped_without_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_LINE_BYTES", 100)
    corpus = write_lines(tmp_path / "long.jsonl", [doc(1), json.dumps({"id": "big", "text": "x" * 1000}), doc(2)])
    skips = SkipLog()
    assert [r.id for r in iter_records(corpus, skips=skips)] == ["g1", "g2"]
    assert skips.counts == {"line too long": 1} and f"{corpus}:2" in skips.examples[0]


def test_duplicate_ids_keep_the_last_record(tmp_path):
    corpus = write_lines(tmp_path / "dups.jsonl", [
        json.dumps({"id": "a", "title": "first version"}),
        json.dumps({"id": "b", "title": "other"}),
        json.dumps({"id": "a", "title": "second version"}),
        json.dumps({"id": "a", "title": "third version"}),
    ])
    meta = build_index(corpus, tmp_path / "idx", progress=False, batch_size=2)  # a commit between the copies
    assert meta["num_docs"] == 2 and meta["records_added"] == 4 and meta["duplicates"] == 2
    e = LocalSearchEngine(tmp_path / "idx")
    assert e.search("version[ti]").ids == ["a"]  # once, not three times
    assert e.search('"third version"[ti]').ids == ["a"] and e.search("first[ti] OR second[ti]").ids == []
    assert any("duplicate ids 2" in line for line in build_summary(meta))


def test_truncated_gzip_fails_and_keeps_the_previous_index(tmp_path):
    lines = [doc(i) for i in range(3000)]
    full = gzip.compress("\n".join(lines).encode())
    truncated = tmp_path / "corpus.jsonl.gz"
    truncated.write_bytes(full[: len(full) // 2])
    out = tmp_path / "idx"
    build_index(SMALL_JSONL, out, progress=False)
    with pytest.raises(CorpusFormatError, match=r"corpus.jsonl.gz: the file is truncated or corrupt after line \d+"):
        build_index(truncated, out, progress=False)
    assert LocalSearchEngine(out).num_docs == 8  # the old index is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl.gz", "idx"]  # no partial left
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(full[:20] + bytes(b ^ 0xFF for b in full[20:200]) + full[200:])
    with pytest.raises(CorpusFormatError, match="truncated or corrupt"):
        build_index(corrupt, tmp_path / "idx2", progress=False)
    tiny = tmp_path / "tiny.jsonl.gz"
    tiny.write_bytes(full[:10])  # not even the first block: format detection itself meets the damage
    with pytest.raises(CorpusFormatError, match="truncated or corrupt"):
        build_index(tiny, tmp_path / "idx3", progress=False)


def test_truncated_pubmed_xml_fails(tmp_path):
    data = gzip.decompress(XML.read_bytes())
    cut = tmp_path / "pubmed_cut.xml.gz"
    cut.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(CorpusFormatError, match="truncated or corrupt|malformed XML"):
        list(read_pubmed_xml(cut))
    half = tmp_path / "pubmed_half.xml"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusFormatError, match="malformed XML after"):
        build_index(half, tmp_path / "idx", progress=False)


def test_pubmed_article_with_bad_fields_is_skipped(tmp_path):
    data = gzip.decompress(XML.read_bytes()).decode()
    bad = data.replace("<PubDate><Year>2004</Year>", "<PubDate><Year>20O4</Year>", 1)  # letter O: int() fails
    assert bad != data
    path = tmp_path / "bad_year.xml"
    path.write_text(bad)
    skips = SkipLog()
    ids = [r.id for r in read_pubmed_xml(path, skips)]
    assert "10000001" not in ids and len(ids) == 6
    assert skips.counts == {"fields of the wrong type": 1, "book record (not indexed)": 1}
    assert "PMID 10000001" in skips.examples[0]


def test_ctgov_bad_files_and_deep_lists(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    good = json.loads((CTGOV_DIR / "NCT00000102.json").read_text())
    (folder / "a.json").write_text(json.dumps([[[[good]]], 5]))  # lists of lists, and a stray number
    (folder / "b.json").write_text('{"protocolSection": ')  # cut short: one skipped file
    (folder / "c.json").write_text("[" * 50_000 + "]" * 50_000)  # nested too deeply for json
    (folder / "d.json").write_text(json.dumps({"protocolSection": {  # a module of the wrong type
        "identificationModule": {"nctId": "NCT09"}, "descriptionModule": "not an object"}}))
    (folder / "e.json").write_text(json.dumps({"protocolSection": []}))  # no nctId anywhere
    skips = SkipLog()
    assert [r.id for r in iter_records(folder, "ctgov", skips=skips)] == ["NCT00000102"]
    assert skips.counts == {"JSON nested too deeply": 1, "fields of the wrong type": 1, "invalid JSON": 1,
                            "no id": 1, "not a study object": 1}
    zpath = tmp_path / "bulk.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("x/NCT1.json", json.dumps(good))
        zf.writestr("x/NCT2.json", "{oops")
    skips = SkipLog()
    assert [r.id for r in read_ctgov(zpath, skips)] == ["NCT00000102"] and skips.counts == {"invalid JSON": 1}
    broken_zip = tmp_path / "broken.zip"
    broken_zip.write_bytes(zpath.read_bytes()[:-60])
    assert detect_format(broken_zip) == "ctgov"
    with pytest.raises(CorpusFormatError, match="zip archive without its directory"):
        list(read_ctgov(broken_zip, SkipLog()))


def test_nothing_indexable_is_an_error(tmp_path):
    corpus = write_lines(tmp_path / "all_bad.jsonl", ["{oops", "[1]", json.dumps({"title": "no id"})])
    with pytest.raises(CorpusFormatError, match=r"no record could be indexed: 3 skipped \(invalid JSON: 1, no id: 1, "
                                                r"not a JSON object: 1\); first: .*all_bad.jsonl:1"):
        build_index(corpus, tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists()


def test_cli_build_summary(tmp_path, capsys):
    from deepretrieval.cli import main

    corpus = write_lines(tmp_path / "c.jsonl", [doc(1), doc(1), "{oops", doc(2)])
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("indexed 2 documents (jsonl)")
    assert out[1] == "  records read 4; documents in the index 2"
    assert out[2] == "  duplicate ids 1: each id is indexed once, from its last record"
    assert out[3] == "  skipped 1 records (invalid JSON: 1)"
    assert out[4] == f"    {corpus}:3: invalid JSON (Expecting property name enclosed in double quotes)"
