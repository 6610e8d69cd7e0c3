"""PubMed / Ovid query parser: precedence, field tags, truncation, line references, errors."""

import json

import pytest

from deepretrieval.search.base import QuerySyntaxError
from deepretrieval.search.query import (ABSTRACT, ALL_FIELDS, TEXT_WORD_FIELDS, TITLE, Absent, And, DateRange,
                                        Heading, Limit, Near, Not, Or, Ref, Text, detect_dialect, parse,
                                        referenced_lines, to_string)


def words(node):
    """The tree as nested tuples of plain words, for compact expectations."""
    if isinstance(node, Text):
        return node.text
    if isinstance(node, And):
        return ("AND",) + tuple(words(i) for i in node.items)
    if isinstance(node, Or):
        return ("OR",) + tuple(words(i) for i in node.items)
    if isinstance(node, Not):
        return ("NOT", words(node.positive), words(node.negative))
    if isinstance(node, Ref):
        return f"#{node.line}"
    if isinstance(node, Heading):
        return f"{node.kind}:{node.name}"
    return node


# ----------------------------------------------------------------------------- precedence

def test_left_to_right_without_precedence():
    # PubMed: a OR b AND c == (a OR b) AND c  (not a OR (b AND c))
    assert words(parse("a OR b AND c").root) == ("AND", ("OR", "a", "b"), "c")
    assert words(parse("a AND b OR c").root) == ("OR", ("AND", "a", "b"), "c")
    assert words(parse("a NOT b OR c").root) == ("OR", ("NOT", "a", "b"), "c")


def test_parentheses_override_left_to_right():
    assert words(parse("a OR (b AND c)").root) == ("OR", "a", ("AND", "b", "c"))
    assert words(parse("((a))").root) == "a"


def test_and_not_means_without():
    assert words(parse("a AND NOT b").root) == ("NOT", "a", "b")
    assert words(parse("a NOT b").root) == ("NOT", "a", "b")


def test_implicit_and_between_adjacent_terms():
    assert words(parse("aspirin stroke").root) == ("AND", "aspirin", "stroke")
    assert words(parse("aspirin (stroke OR tia)").root) == ("AND", "aspirin", ("OR", "stroke", "tia"))
    # implicit AND sits at the same left-to-right level as explicit operators
    assert words(parse("a b OR c").root) == ("OR", ("AND", "a", "b"), "c")


def test_lowercase_operators_are_words_in_pubmed_with_warning():
    q = parse("cancer or tumor")
    assert words(q.root) == ("AND", "cancer", "or", "tumor")
    assert any("lower-case 'or'" in w for w in q.warnings)


# ----------------------------------------------------------------------------- phrases, tags

def test_quoted_and_tagged_multiword_are_phrases():
    node = parse('"heart attack"').root
    assert isinstance(node, Text) and node.phrase and node.spec is None and node.text == "heart attack"
    node = parse("fungal infection[tw]").root
    assert isinstance(node, Text) and node.phrase and node.text == "fungal infection"
    assert node.spec.fields == TEXT_WORD_FIELDS
    node = parse("Ultrasonography [mh]").root  # a space before the tag is allowed
    assert node == Heading(node.pos, "mesh", "Ultrasonography")


@pytest.mark.parametrize("tag,fields", [
    ("tiab", (TITLE, ABSTRACT)), ("Title/Abstract", (TITLE, ABSTRACT)), ("ti", (TITLE,)), ("Title", (TITLE,)),
    ("ab", (ABSTRACT,)), ("tw", TEXT_WORD_FIELDS), ("Text Word", TEXT_WORD_FIELDS), ("All Fields", ALL_FIELDS),
    ("all", ALL_FIELDS),
])
def test_text_field_tags(tag, fields):
    node = parse(f"aspirin[{tag}]").root
    assert isinstance(node, Text) and node.spec.fields == fields


@pytest.mark.parametrize("tag,kind", [
    ("mh", "mesh"), ("mesh", "mesh"), ("MeSH", "mesh"), ("MeSH Terms", "mesh"), ("mh:noexp", "mesh"),
    ("majr", "majr"), ("MeSH Major Topic", "majr"), ("pt", "pt"), ("Publication Type", "pt"), ("sh", "sh"),
    ("pmid", "id"),
])
def test_heading_like_tags(tag, kind):
    node = parse(f'"Randomized Controlled Trial"[{tag}]').root
    assert isinstance(node, Heading) and node.kind == kind and node.name == "Randomized Controlled Trial"


def test_mesh_with_subheading_pubmed_style():
    node = parse("hypertension/drug therapy[mh]").root
    assert node.name == "hypertension" and node.qualifiers == ("drug therapy",)


def test_dp_single_year_range_and_quoted_range():
    assert parse("2005[dp]").root == DateRange(0, 20050101, 20051231)
    assert parse("2001:2005[dp]").root == DateRange(0, 20010101, 20051231)
    assert parse('"2001/03/15"[dp] : "2002/02"[dp]').root == DateRange(0, 20010315, 20020231)
    node = parse("aspirin AND 2001:2005[dp]").root
    assert isinstance(node, And) and node.items[1] == DateRange(node.items[1].pos, 20010101, 20051231)


def test_proximity_tag():
    node = parse('"hip fracture"[tiab:~3]').root
    assert node.spec.slop == 3 and node.spec.fields == (TITLE, ABSTRACT)


def test_absent_field_parses_to_absent_node():
    node = parse("smith j[au]").root
    assert isinstance(node, Absent) and node.field_name == "au"


def test_tag_after_group_applies_to_untagged_leaves_only():
    node = parse("(aspirin OR warfarin[ti])[ab]").root
    assert [i.spec.fields for i in node.items] == [(ABSTRACT,), (TITLE,)]


# ----------------------------------------------------------------------------- truncation

def test_truncation_kept_in_term_text():
    node = parse("aspergill*[tiab]").root
    assert node.text == "aspergill*" and node.spec.fields == (TITLE, ABSTRACT)
    node = parse('"esophag* varic*"[tiab]').root
    assert node.phrase and node.text == "esophag* varic*"


# ----------------------------------------------------------------------------- multi-line

def test_line_references_with_blank_lines():
    q = parse("aspirin[tiab]\n\nwarfarin[tiab]\n\n#1 OR #2\n\nstroke\n\n#3 AND #4")
    assert words(q.root) == ("AND", "#3", "#4")
    assert words(q.lines[3]) == ("OR", "#1", "#2")
    assert referenced_lines(q) == [1, 2, 3, 4]
    assert "aspirin" in to_string(q.root, q.lines) and "#" not in to_string(q.root, q.lines)


def test_numbered_line_labels():
    q = parse("1. aspirin\n2. warfarin\n3. #1 AND #2")
    assert words(q.root) == ("AND", "#1", "#2") and words(q.lines[2]) == "warfarin"
    q = parse("#1 aspirin\n#2 warfarin\n#1 OR #2")  # "#1 foo" on line 1 is a label, not a self-reference
    assert words(q.root) == ("OR", "#1", "#2") and words(q.lines[1]) == "aspirin"


def test_reference_to_later_or_missing_line_is_an_error():
    with pytest.raises(QuerySyntaxError) as e:
        parse("aspirin\n#1 OR #3")
    assert e.value.position == 14 and "#3" in e.value.problem
    with pytest.raises(QuerySyntaxError) as e:
        parse("#1 AND aspirin")
    assert e.value.position == 0


# ----------------------------------------------------------------------------- Ovid

def test_ovid_dialect_detection():
    assert detect_dialect("Kidney Transplantation/") == "ovid"
    assert detect_dialect("dialysis.tw.") == "ovid"
    assert detect_dialect("or/1-5") == "ovid"
    assert detect_dialect("aspirin[tiab] AND (stroke OR tia)") == "pubmed"
    assert detect_dialect("hormone and/or radiation") == "pubmed"


def test_ovid_constructs():
    q = parse("exp Renal Dialysis/\n*Lymphatic Metastasis/\nKidney/ri\nCoronary Disease/di, pa [Diagnosis]\n"
              "(coronary adj5 disease).tw.\nor/1-5\nlimit 6 to yr=\"2005 -Current\"\n"
              "exp animals/ not humans.sh.\n7 not 8")
    h1, h2, h3, h4 = (q.lines[i] for i in (1, 2, 3, 4))
    assert (h1.kind, h1.name, h1.explode) == ("mesh", "Renal Dialysis", True)
    assert (h2.kind, h2.name) == ("majr", "Lymphatic Metastasis")
    assert h3.qualifiers == ("radionuclide imaging",)
    assert h4.qualifiers == ("diagnosis", "pathology")
    near = q.lines[5]
    assert isinstance(near, Near) and near.distance == 4 and not near.ordered
    assert near.left.spec.fields == (TITLE, ABSTRACT)
    assert words(q.lines[6]) == ("OR", "#1", "#2", "#3", "#4", "#5")
    lim = q.lines[7]
    assert isinstance(lim, Limit) and lim.date == DateRange(lim.date.pos, 20050101, 99991231)
    assert words(q.lines[8]) == ("NOT", "mesh:animals", "mesh:humans")
    assert words(q.root) == ("NOT", "#7", "#8")


def test_ovid_adjacent_words_are_a_phrase_and_brackets_are_comments():
    q = parse("Active compression.mp. [mp=title, abstract]\nDipyridamole/du [Diagnostic Use]\n1 or 2")
    assert q.lines[1].phrase and q.lines[1].spec.fields == ALL_FIELDS
    assert q.lines[2].qualifiers == ("diagnostic use",)


def test_every_topic_boolean_query_parses(data_dir):
    topics = [json.loads(l) for l in (data_dir / "pubmed_mini" / "topics.jsonl").open()]
    queries = [t["boolean_query"] for t in topics if t["boolean_query"]]
    assert len(queries) == 17
    for text in queries:
        q = parse(text)
        assert q.root is not None and referenced_lines(q) is not None


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("query,position,fragment", [
    ("aspirin[tiabx]", 7, "unknown field tag [tiabx]"),
    ("(aspirin OR warfarin", 0, "'(' is never closed"),
    ("aspirin OR warfarin)", 19, "')' without a matching '('"),
    ("aspirin AND", 8, "dangling operator AND"),
    ("OR aspirin", 0, "dangling operator OR"),
    ("aspirin AND OR warfarin", 8, "dangling operator AND"),
    ("(aspirin AND) stroke", 9, "dangling operator AND"),
    ("aspirin[tiab", 7, "unterminated field tag"),
    ("()", 0, "empty parentheses"),
    ("   ", 0, "empty query"),
    ("[tiab]", 0, "does not follow a term"),
    ("abc[dp]", 0, "invalid publication date"),
    ("aspirin AND 2005/13/01[dp]", 12, "invalid publication date"),
])
def test_errors_name_problem_and_position(query, position, fragment):
    with pytest.raises(QuerySyntaxError) as e:
        parse(query)
    assert e.value.position == position, e.value
    assert fragment in e.value.problem
    assert e.value.query == query
    assert f"at position {position}" in str(e.value)


def test_error_position_counts_from_start_of_multiline_query():
    with pytest.raises(QuerySyntaxError) as e:
        parse("aspirin\n\nstroke[xx]")
    assert e.value.position == 15


def test_unmatched_quote_is_ignored_with_warning():
    q = parse('Serology"[MeSH]')
    assert q.root.kind == "mesh" and q.root.name == "Serology"
    assert any("unmatched quotation mark" in w for w in q.warnings)
