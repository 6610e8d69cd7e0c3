"""Corpus readers: vendored JSONL, PubMed baseline XML (deletions, revisions), CT.gov v2 JSON."""

import json
import zipfile
from pathlib import Path

import pytest

from deepretrieval.search.ingest import (CorpusFormatError, detect_format, iter_records, parse_date,
                                         read_ctgov, read_pubmed_xml)
from deepretrieval.search.local import LocalSearchEngine, build_index

FIXTURES = Path(__file__).parent / "fixtures" / "search"
XML = FIXTURES / "pubmed_sample.xml.gz"
CTGOV_DIR = FIXTURES / "ctgov"
CTGOV_PAGE = FIXTURES / "ctgov_page.json"


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
