"""The local PubMed mirror (deepretrieval.search.mirror): baseline + update files applied in order,
deletions and revisions, resume after a damaged file or a kill, refusal of changed/out-of-order files."""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval.cli import main
from deepretrieval.search.ingest import CorpusFormatError
from deepretrieval.search.local import LocalSearchEngine
from deepretrieval.search.local_index import shard_dir_name, shard_of
from deepretrieval.search import mirror
from deepretrieval.search.mirror import MANIFEST_FILE, MirrorError, file_fingerprint, ingest_pubmed

ROOT = Path(__file__).resolve().parents[1]


def article(pmid, title, abstract="", year=None):
    date = f"<PubDate><Year>{year}</Year></PubDate>" if year else "<PubDate></PubDate>"
    body = f"<Abstract><AbstractText>{abstract}</AbstractText></Abstract>" if abstract else ""
    return (f"<PubmedArticle><MedlineCitation><PMID Version=\"1\">{pmid}</PMID><Article><Journal><JournalIssue>"
            f"{date}</JournalIssue></Journal><ArticleTitle>{title}</ArticleTitle>{body}</Article></MedlineCitation>"
            "</PubmedArticle>")


BOOK = "<PubmedBookArticle><BookDocument><PMID>900</PMID></BookDocument></PubmedBookArticle>"


def pubmed_file(path, items, deletes=()):
    """A gzipped baseline/update file with the given articles (XML strings) and DeleteCitation PMIDs."""
    delete = "<DeleteCitation>" + "".join(f"<PMID Version=\"1\">{p}</PMID>" for p in deletes) + "</DeleteCitation>"
    xml = ('<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n' + "\n".join(items)
           + (delete if deletes else "") + "\n</PubmedArticleSet>\n")
    path.write_bytes(gzip.compress(xml.encode()))
    return path


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f1 = pubmed_file(src / "pubmed25n0001.xml.gz", [
        article(1, "Aspirin after stroke", "Aspirin lowered recurrence.", 2001),
        article(2, "Warfarin in atrial fibrillation", year=1999),
        article(3, "Statins and cholesterol", "Statin therapy.", 2005), BOOK])
    f2 = pubmed_file(src / "pubmed25n0002.xml.gz", [
        article(4, "Metformin for diabetes", year=2010), article(5, "Insulin in diabetes", year=2012)])
    f3 = pubmed_file(src / "pubmed25n0003.xml.gz", [  # an update file
        article(1, "Aspirin for migraine", "A revised record.", 2001),  # replaces PMID 1
        article(6, "Apixaban dosing", year=2020),  # new
        article(6, "Apixaban dosing in renal failure", year=2020),  # revised again in the same file
    ], deletes=(3, 99))  # 3 is in the mirror, 99 never was
    return [f1, f2, f3]


def found(index, q):
    return set(LocalSearchEngine(index).search(q, k=50).ids)


def check_final_mirror(index):
    e = LocalSearchEngine(index)
    assert e.num_docs == 5  # 1, 2, 4, 5, 6
    assert found(index, "stroke") == set() and found(index, "migraine") == {"1"}  # 1 replaced
    assert found(index, "cholesterol") == set()  # 3 deleted
    assert found(index, "diabetes") == {"4", "5"}
    assert found(index, "renal") == {"6"} and LocalSearchEngine(index).count("apixaban") == 1
    assert found(index, "2001[dp]") == {"1"}


def test_baseline_and_update_files_are_applied_in_order(files, tmp_path):
    index = tmp_path / "mirror"
    summary = ingest_pubmed(index, list(reversed(files)), progress=False)  # name order, not argument order
    assert summary["files_applied"] == [f.name for f in files] and summary["files_already_done"] == []
    # added: 3 + 2 + 1 (PMID 6); replaced: PMID 1, PMID 6's second version; deleted: 3; absent: 99
    assert summary["run"] == {"added": 6, "replaced": 2, "deleted": 1, "delete_missing": 1,
                              "skipped": {"book record (not indexed)": 1}}
    assert summary["num_docs"] == 5 == summary["run"]["added"] - summary["run"]["deleted"]
    check_final_mirror(index)
    manifest = json.loads((index / MANIFEST_FILE).read_text())
    assert [(f["name"], f["size"], f["added"], f["replaced"]) for f in manifest["files"]] == [
        (files[0].name, files[0].stat().st_size, 3, 0), (files[1].name, files[1].stat().st_size, 2, 0),
        (files[2].name, files[2].stat().st_size, 1, 2)]
    assert manifest["files"][0]["sha256"] == file_fingerprint(files[0])[1]
    meta = LocalSearchEngine(index).meta
    assert meta["num_docs"] == 5 and meta["has_dates"] and meta["deletions"] == 2 and meta["mirror"]["files"] == 3
    # a rerun applies nothing and changes nothing
    again = ingest_pubmed(index, files, progress=False)
    assert again["files_applied"] == [] and again["files_already_done"] == [f.name for f in files]
    assert again["run"]["added"] == 0 and again["num_docs"] == 5


def test_sharded_mirror(files, tmp_path):
    index = tmp_path / "mirror"
    summary = ingest_pubmed(index, files[:2], shards=3, progress=False)
    assert summary["shards"] == 3 and summary["num_docs"] == 5
    with pytest.raises(MirrorError, match="mirror of 3 shard"):
        ingest_pubmed(index, files[2:], shards=2, progress=False)
    summary = ingest_pubmed(index, files[2:], progress=False)  # the shard count it was created with
    assert summary["run"] == {"added": 1, "replaced": 2, "deleted": 1, "delete_missing": 1, "skipped": {}}
    engine = LocalSearchEngine(index)
    assert engine.num_shards == 3
    check_final_mirror(index)
    for pmid in ("1", "2", "4", "5", "6"):  # each record in the shard its id hashes to, once
        shard = shard_of(pmid, 3)
        assert found(index / shard_dir_name(shard), f"{pmid}[pmid]") == {pmid}
        assert all(found(index / shard_dir_name(i), f"{pmid}[pmid]") == set() for i in range(3) if i != shard)


@pytest.mark.parametrize("parse_workers", [0, 2])
def test_damaged_file_stops_the_run_and_a_rerun_resumes(files, tmp_path, monkeypatch, parse_workers):
    """With parse workers file 3 is parsed before file 2's error is raised, and still not applied."""
    monkeypatch.setattr(mirror, "EXISTS_CHUNK", 1)  # the record before the damage reaches the writer
    index = tmp_path / "mirror"
    good = files[1].read_bytes()
    xml = gzip.decompress(good).replace(b"<PubmedArticle><MedlineCitation><PMID Version=\"1\">5<",
                                        b"<PubmedArticle><Medline<PMID>5<")
    files[1].write_bytes(gzip.compress(xml))  # damaged after its first record
    with pytest.raises(CorpusFormatError, match="pubmed25n0002.*malformed XML after 1 articles.*Applied before it in "
                       "this run: 1 file"):
        ingest_pubmed(index, files, progress=False, parse_workers=parse_workers)
    # file 1 is committed and searchable; nothing of file 2 (its records before the damage rolled back)
    assert [f["name"] for f in json.loads((index / MANIFEST_FILE).read_text())["files"]] == [files[0].name]
    assert LocalSearchEngine(index).num_docs == 3 and found(index, "diabetes") == set()
    files[1].write_bytes(good)  # the file is replaced
    summary = ingest_pubmed(index, files, progress=False)
    assert summary["files_already_done"] == [files[0].name]
    assert summary["files_applied"] == [files[1].name, files[2].name]
    assert summary["run"]["added"] == 3 and summary["run"]["replaced"] == 2  # file 1's records not re-added
    assert summary["mirror"]["added"] == 6 and summary["mirror"]["skipped"] == {"book record (not indexed)": 1}
    check_final_mirror(index)


@pytest.mark.parametrize("shards", [None, 2])
def test_damaged_first_file_of_a_new_mirror_resumes(files, tmp_path, monkeypatch, shards):
    """The first file of a new mirror fails: the rerun finds an (empty) mirror, not a foreign folder."""
    monkeypatch.setattr(mirror, "EXISTS_CHUNK", 1)
    index = tmp_path / "mirror"
    good = files[0].read_bytes()
    files[0].write_bytes(gzip.compress(gzip.decompress(good).replace(b"<MedlineCitation><PMID Version=\"1\">2<",
                                                                     b"<Medline<PMID>2<")))
    with pytest.raises(CorpusFormatError, match="pubmed25n0001.*Applied before it in this run: 0 file"):
        ingest_pubmed(index, files, shards=shards, progress=False)
    assert json.loads((index / MANIFEST_FILE).read_text())["files"] == []
    files[0].write_bytes(good)
    summary = ingest_pubmed(index, files, progress=False)
    assert summary["files_already_done"] == [] and summary["files_applied"] == [f.name for f in files]
    assert summary["shards"] == (shards or 1)
    # the same counts as one clean run (PMID 1 of the failed attempt was rolled back, not "replaced")
    assert summary["run"] == {"added": 6, "replaced": 2, "deleted": 1, "delete_missing": 1,
                              "skipped": {"book record (not indexed)": 1}}
    check_final_mirror(index)


@pytest.mark.parametrize("kill_in", ["0002", "0001"])
def test_killed_run_resumes(files, tmp_path, kill_in):
    """SIGKILL in the middle of file 2 (records already handed to the writer): the rerun finds the
    writer lock free, file 1 done, and none of file 2's uncommitted records. Killed in file 1 of a
    new mirror: the rerun resumes the empty mirror."""
    index = tmp_path / "mirror"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / 'code')!r})
from deepretrieval.search import mirror
mirror.EXISTS_CHUNK = 1  # every record reaches the writer at once
real = mirror.read_pubmed_xml
def reader(path, skips=None):
    for i, rec in enumerate(real(path, skips)):
        if path.name.endswith("{kill_in}.xml.gz") and i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield rec
mirror.read_pubmed_xml = reader
mirror.ingest_pubmed({str(index)!r}, {[str(f) for f in files]!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    done = 1 if kill_in == "0002" else 0
    if done:
        assert LocalSearchEngine(index).num_docs == 3 and found(index, "metformin") == set()
    summary = ingest_pubmed(index, files, progress=False)
    assert summary["files_already_done"] == [f.name for f in files[:done]] and len(summary["files_applied"]) == 3 - done
    assert summary["mirror"]["added"] == 6 and summary["mirror"]["replaced"] == 2
    check_final_mirror(index)


def manifest_without_times(index):
    manifest = json.loads((index / MANIFEST_FILE).read_text())
    for entry in manifest["files"]:
        entry.pop("ingested_at")
    return manifest


@pytest.mark.parametrize("shards", [None, 2])
def test_parse_workers_give_the_same_mirror(files, tmp_path, caplog, shards):
    """Files parsed ahead by worker processes are applied as the in-process reader applies them: the same
    counts, manifest and match sets, and the reader's warnings are logged here (by the applying process).
    Scores are not compared: revised records' deleted versions count in BM25's statistics until tantivy's
    background merges drop them, so two in-process runs can already score differently."""
    bad = pubmed_file(files[0].parent / "pubmed25n0004.xml.gz",  # year "20O4" (letter O): a skipped article
                      [article(7, "Heparin bridging", year="20O4"), article(8, "Heparin in pregnancy", year=2021)])
    summaries, warnings = {}, {}
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepretrieval.search.ingest"):
            summaries[workers] = ingest_pubmed(tmp_path / f"m{workers}", files + [bad], shards=shards, progress=False,
                                               parse_workers=workers)
        warnings[workers] = [r.getMessage() for r in caplog.records]
    assert warnings[2] == warnings[0] and len(warnings[0]) == 1 and "PMID 7" in warnings[0][0]
    assert summaries[2]["run"] == summaries[0]["run"] == {
        "added": 7, "replaced": 2, "deleted": 1, "delete_missing": 1,
        "skipped": {"book record (not indexed)": 1, "fields of the wrong type": 1}}
    assert manifest_without_times(tmp_path / "m2") == manifest_without_times(tmp_path / "m0")
    for query in ("diabetes", "heparin OR aspirin OR apixaban", "aspirin[ti]", "2021[dp]"):
        one, many = (LocalSearchEngine(tmp_path / f"m{w}").search(query, k=50) for w in (0, 2))
        assert set(many.ids) == set(one.ids) and one.ids
    with pytest.raises(ValueError, match="parse_workers"):
        ingest_pubmed(tmp_path / "m3", files, progress=False, parse_workers=-1)


def test_a_parse_worker_that_dies_stops_the_run_cleanly(files, tmp_path, monkeypatch):
    """A killed worker (e.g. out of memory) is a MirrorError naming the file; earlier files stay applied."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class PoolWithADyingWorker:  # runs the jobs here; file 0002's worker "dies"
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, path):
            future = Future()
            if path.name.endswith("0002.xml.gz"):
                future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            else:
                future.set_result(fn(path))
            return future

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(mirror, "ProcessPoolExecutor", PoolWithADyingWorker)
    index = tmp_path / "mirror"
    with pytest.raises(MirrorError, match="pubmed25n0002.xml.gz: its parse worker stopped.*rerun to resume"):
        ingest_pubmed(index, files, progress=False, parse_workers=2)
    assert [f["name"] for f in json.loads((index / MANIFEST_FILE).read_text())["files"]] == [files[0].name]
    assert ingest_pubmed(index, files, progress=False)["files_applied"] == [f.name for f in files[1:]]
    check_final_mirror(index)


@pytest.mark.parametrize("shards", [1, 2])
def test_an_id_added_deleted_and_added_again_between_commits_is_there_once(tmp_path, shards):
    """Only an id in the index (committed or applied since) gets a delete before its add: an id
    added, deleted and added again before a commit, or one deleted and added again after a commit,
    must end as one document with the last version; the others untouched."""
    from deepretrieval.search.ingest import Record

    out = tmp_path / "m"
    w = mirror.MirrorWriter(out, shards=shards, num_threads=1, heap_size=20_000_000)
    try:
        c = mirror.Counts()
        w.apply([Record(id="7", title="first aspirin"), Record(id="8", title="placebo"), Record(id="7", deleted=True),
                 Record(id="7", title="second aspirin"), Record(id="9", title="third aspirin")], c)
        assert (c.added, c.replaced, c.deleted) == (4, 0, 1)  # 7 counts as added again after its deletion
        w.commit(None, c)
        c = mirror.Counts()
        w.apply([Record(id="9", deleted=True), Record(id="9", title="fourth aspirin"),
                 Record(id="10", deleted=True)], c)
        assert (c.added, c.replaced, c.deleted, c.delete_missing) == (1, 0, 1, 1)
        w.commit(None, c)
    finally:
        w.close()
    engine = LocalSearchEngine(out)
    assert engine.num_docs == 3  # 7, 8, 9
    assert found(out, "aspirin") == {"7", "9"} and engine.count("aspirin") == 2
    assert found(out, "second") == {"7"} and found(out, "first") == set()
    assert found(out, "fourth") == {"9"} and found(out, "third") == set() and found(out, "placebo") == {"8"}


def test_sharded_mirror_with_deletions_scores_positive(tmp_path):
    """Revised PMIDs leave deleted versions in a shard until tantivy merges them away; they count
    in the document frequency but not in the live document count, so the whole-index IDF boost
    (tantivy's IDF: ln(1 + (N - n + 0.5) / (n + 0.5))) must clamp n to N or turn negative. Here
    shard 0 holds 30 live records (20 with "aspirin"), shard 1 10 records revised 6 times each
    (their deleted versions with "aspirin" too, until merged): unclamped, the whole index's IDF of
    "aspirin" is ln(1 + (40 - n + 0.5) / (n + 0.5)) < 0 for n > 40 while shard 0's is positive."""
    ids = [str(i) for i in range(1, 200)]
    zero, one = [i for i in ids if shard_of(i, 2) == 0][:30], [i for i in ids if shard_of(i, 2) == 1][:10]
    base = pubmed_file(tmp_path / "pubmed25n0001.xml.gz",
                       [article(i, "aspirin trial" if n < 20 else "placebo trial") for n, i in enumerate(zero)]
                       + [article(i, "aspirin trial") for i in one])
    update = pubmed_file(tmp_path / "pubmed25n0002.xml.gz", [article(i, f"aspirin revised {r}") for r in range(6) for i in one])
    ingest_pubmed(tmp_path / "m", [base, update], shards=2, progress=False)
    engine = LocalSearchEngine(tmp_path / "m")
    assert [int(s.num_docs) for s in engine.searchers] == [30, 10]
    assert engine._doc_freq("title", "aspirin") > engine.num_docs == 40  # deleted versions counted
    assert all(engine._idf_ratio(shard, "title", ["aspirin"]) > 0 for shard in (0, 1))
    result = engine.search("aspirin OR trial", k=100)
    assert len(result.ids) == 40 and min(result.scores) > 0


def test_changed_or_out_of_order_files_are_refused(files, tmp_path):
    index = tmp_path / "mirror"
    ingest_pubmed(index, files[1:2], progress=False)  # 0002 first
    with pytest.raises(MirrorError, match="pubmed25n0001.xml.gz sorts before pubmed25n0002"):
        ingest_pubmed(index, files[:2], progress=False)
    pubmed_file(files[1], [article(4, "Metformin for diabetes", year=2011)])  # 0002 changed after it was applied
    with pytest.raises(MirrorError, match="SHA-256"):
        ingest_pubmed(index, files[1:], progress=False)
    summary = ingest_pubmed(index, files[:1], progress=False, allow_out_of_order=True)
    assert summary["files_applied"] == [files[0].name] and summary["num_docs"] == 5


def test_applied_files_are_checked_by_size_and_time_hashed_only_when_asked(files, tmp_path, monkeypatch):
    index = tmp_path / "mirror"
    ingest_pubmed(index, files[:2], progress=False)
    hashed = []
    real = mirror.file_fingerprint
    monkeypatch.setattr(mirror, "file_fingerprint", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    summary = ingest_pubmed(index, files, progress=False)  # 2 done (stat only), 1 new (hashed for the manifest)
    assert summary["files_already_done"] == [files[0].name, files[1].name] and hashed == [files[2].name]
    hashed.clear()
    ingest_pubmed(index, files, progress=False, verify=True)
    assert hashed == [f.name for f in files]
    hashed.clear()
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert ingest_pubmed(index, files, progress=False)["files_applied"] == [] and hashed == [files[0].name]
    # same size, other bytes, other time: the hash finds it
    pubmed_file(files[1], [article(4, "Metformin for diabetes", year=2011),
                           article(5, "Insulin in diabetes", year=2012)])
    assert files[1].stat().st_size == json.loads((index / MANIFEST_FILE).read_text())["files"][1]["size"]
    with pytest.raises(MirrorError, match="SHA-256"):
        ingest_pubmed(index, files, progress=False)
    assert main(["index", "ingest-pubmed", "--index", str(index), "--no-progress", "--verify", str(files[0])]) == 0


def test_not_a_mirror_is_refused(tmp_path, files):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(MirrorError, match="not a mirror"):
        ingest_pubmed(other, files, progress=False)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "1", "title": "t"}\n')
    with pytest.raises(CorpusFormatError, match="not a PubMed"):
        ingest_pubmed(tmp_path / "m", [jsonl], progress=False)
    assert not (tmp_path / "m").exists()


def test_cli_ingest_pubmed(files, tmp_path, capsys):
    index = tmp_path / "mirror"
    argv = ["index", "ingest-pubmed", "--index", str(index), "--no-progress", "--threads", "1", "--heap-mb", "50"]
    assert main(argv + [str(files[0].parent)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "files applied 3, already done (skipped) 0; documents in the mirror 5"
    assert out[1].startswith("this run: added 6, replaced 2, deleted 1, deletions of absent PMIDs 1 in ")
    assert out[2] == "this run skipped book record (not indexed): 1"
    assert main(argv + [str(f) for f in files]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "files applied 0, already done (skipped) 3; documents in the mirror 5"
    assert main(argv[:3] + [str(tmp_path / "m2"), "--no-progress", "--parse-workers", "2"] + [str(f) for f in files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == out[0] and lines[1].startswith(out[1][:out[1].index(" in ")]) and lines[2] == out[2]
    assert main(argv + ["--parse-workers", "-1", str(files[0])]) == 2
    assert "--parse-workers must be" in capsys.readouterr().err
    assert main(["search", "--index", str(index), "--json", "diabetes"]) == 0
    assert set(json.loads(capsys.readouterr().out)["ids"]) == {"4", "5"}
    assert main(argv[:-2] + ["--heap-mb", "10", str(files[0])]) == 2
    assert os.path.exists(index / MANIFEST_FILE)
