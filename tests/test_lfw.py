import os
from pathlib import Path

import pytest

from conftest import LFW_DIR
from pdsn_cli.errors import BadInputError, SchemaError
from pdsn_cli.data.lfw import Pair, identities_outside_pairs, limit_pairs, pair_identities, read_pairs

PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cy_C": 1, "Dee_D": 2}


def _touch_images(root: Path, people: dict[str, int]) -> None:
    for name, count in people.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(b"\xff\xd8 not decoded by the parser")


def _fold_lines() -> list[str]:
    # 2 matched then 2 mismatched, mixing tabs and spaces as hand-edited copies do
    return ["Ann_A\t1\t2", "Bob_B 1 2", "Ann_A\t3\tCy_C\t1", "Bob_B  2 Dee_D 1"]


@pytest.fixture
def root(tmp_path):
    _touch_images(tmp_path / "data", PEOPLE)
    return tmp_path / "data"


def _write_pairs(path: Path, folds: int, lines_per_fold: list[str], header: str | None = None) -> Path:
    header = header if header is not None else f"{folds}\t{len(lines_per_fold) // 2}"
    path.write_text("\n".join([header] + lines_per_fold * folds) + "\n\n")
    return path


def test_parses_folds_paths_and_labels(root, tmp_path):
    pairs = read_pairs(_write_pairs(tmp_path / "pairs.txt", 3, _fold_lines()), root)
    assert len(pairs) == 12
    assert pairs[0] == Pair("Ann_A/Ann_A_0001.jpg", "Ann_A/Ann_A_0002.jpg", True, 0)
    assert pairs[2] == Pair("Ann_A/Ann_A_0003.jpg", "Cy_C/Cy_C_0001.jpg", False, 0)
    assert pairs[3] == Pair("Bob_B/Bob_B_0002.jpg", "Dee_D/Dee_D_0001.jpg", False, 0)
    assert [p.fold for p in pairs] == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.same for p in pairs] == [True, True, False, False] * 3


def test_single_number_header_is_one_fold(root, tmp_path):
    pairs = read_pairs(_write_pairs(tmp_path / "p.txt", 1, _fold_lines(), header="2"), root)
    assert {p.fold for p in pairs} == {0} and len(pairs) == 4


@pytest.mark.parametrize(
    "bad_line, lineno, message",
    [
        ("Ann_A 1", 3, "a matched pair needs"),
        ("Ann_A 1 2", 5, "a mismatched pair needs"),  # a matched line in a mismatched slot
        ("Ann_A one 2", 2, "not an integer"),
        ("Ann_A 0 2", 6, "outside 1..9999"),
        ("Ann_A 1 Cy_C", 9, "a mismatched pair needs"),
    ],
)
def test_malformed_line_names_its_number(root, tmp_path, bad_line, lineno, message):
    lines = ["Ann_A 1 2"] * 2 + ["Ann_A 3 Cy_C 1"] * 2
    lines = ["2 2"] + lines * 2
    lines[lineno - 1] = bad_line
    (tmp_path / "p.txt").write_text("\n".join(lines))
    with pytest.raises(SchemaError, match=rf"p\.txt:{lineno}: .*{message}"):
        read_pairs(tmp_path / "p.txt", root)


def test_header_and_line_count_are_checked(root, tmp_path):
    with pytest.raises(SchemaError, match=r":1: expected the header"):
        read_pairs(_write_pairs(tmp_path / "a.txt", 1, _fold_lines(), header="ten 2"), root)
    with pytest.raises(SchemaError, match="header says 3 folds"):
        read_pairs(_write_pairs(tmp_path / "b.txt", 2, _fold_lines(), header="3 2"), root)
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(SchemaError, match="empty"):
        read_pairs(tmp_path / "c.txt", root)


@pytest.mark.parametrize("name", ["..", "/etc", "a/../..", "..\\x", "."])
def test_names_that_are_paths_are_refused(root, tmp_path, name):
    lines = [f"{name} 1 2", "Bob_B 1 2", "Ann_A 3 Cy_C 1", "Bob_B 2 Dee_D 1"]
    with pytest.raises(SchemaError, match=r"p\.txt:2: .*not a valid identity name"):
        read_pairs(_write_pairs(tmp_path / "p.txt", 1, lines), root)


def test_symlink_leading_out_of_the_root_is_refused(root, tmp_path):
    _touch_images(tmp_path / "elsewhere", {"Eve_E": 2})
    os.symlink(tmp_path / "elsewhere" / "Eve_E", root / "Eve_E")
    lines = ["Eve_E 1 2", "Bob_B 1 2", "Ann_A 3 Cy_C 1", "Bob_B 2 Dee_D 1"]
    with pytest.raises(SchemaError, match=r"p\.txt:2: .*outside the data root"):
        read_pairs(_write_pairs(tmp_path / "p.txt", 1, lines), root)
    assert "Eve_E" not in identities_outside_pairs(root, [])


def test_missing_images_are_reported_unless_not_required(root, tmp_path):
    lines = ["Ann_A 1 9", "Bob_B 1 2", "Ann_A 3 Cy_C 1", "Bob_B 2 Dee_D 1"]
    path = _write_pairs(tmp_path / "p.txt", 1, lines)
    with pytest.raises(SchemaError, match=r"p\.txt:2: image Ann_A/Ann_A_0009.jpg is missing"):
        read_pairs(path, root)
    assert len(read_pairs(path, root, require_images=False)) == 4
    with pytest.raises(BadInputError, match="not found"):
        read_pairs(tmp_path / "nope.txt", root)
    with pytest.raises(BadInputError, match="not a folder"):
        read_pairs(path, tmp_path / "nope")


def _synthetic_pairs(folds=10, per_half=30):
    pairs = []
    for f in range(folds):
        pairs += [Pair(f"m{f}_{i}/a", f"m{f}_{i}/b", True, f) for i in range(per_half)]
        pairs += [Pair(f"x{f}_{i}/a", f"y{f}_{i}/b", False, f) for i in range(per_half)]
    return pairs


@pytest.mark.parametrize("n, per_fold", [(20, 2), (45, 4), (100, 10), (599, 58)])
def test_limit_pairs_keeps_folds_balanced(n, per_fold):
    pairs = _synthetic_pairs()
    subset = limit_pairs(pairs, n)
    assert len(subset) == per_fold * 10
    for f in range(10):
        in_fold = [p for p in subset if p.fold == f]
        assert sum(p.same for p in in_fold) == per_fold // 2
        assert sum(not p.same for p in in_fold) == per_fold // 2
    # file order is kept: the subset is the first pairs of each (fold, class) block
    assert subset == [p for p in pairs if p in set(subset)]
    assert subset[0] == pairs[0]


def test_limit_pairs_bounds():
    pairs = _synthetic_pairs()
    with pytest.raises(BadInputError, match="at least 20"):
        limit_pairs(pairs, 19)
    assert limit_pairs(pairs, 600) == pairs
    assert limit_pairs(pairs, 10**6) == pairs
    # an unbalanced list cannot give what was asked
    lopsided = [p for p in pairs if p.same or p.fold != 3 or p.path1.endswith("_0/a")]
    with pytest.raises(BadInputError, match="fold 3 has only 1 mismatched"):
        limit_pairs(lopsided, 100)


def test_identities_in_and_outside_pairs(root, tmp_path):
    _touch_images(root, {"Fay_F": 2, "Gus_G": 1})
    (root / "Empty_Person").mkdir()
    (root / ".hidden").mkdir()
    (root / "Fay_F" / "notes.txt").write_text("not an image")
    pairs = read_pairs(_write_pairs(tmp_path / "p.txt", 2, _fold_lines()), root)
    assert pair_identities(pairs) == {"Ann_A", "Bob_B", "Cy_C", "Dee_D"}
    outside = identities_outside_pairs(root, pairs)
    assert outside == {"Fay_F": ["Fay_F/Fay_F_0001.jpg", "Fay_F/Fay_F_0002.jpg"], "Gus_G": ["Gus_G/Gus_G_0001.jpg"]}
    assert list(outside) == sorted(outside)


@pytest.mark.skipif(not (LFW_DIR / "pairs.txt").is_file(), reason="real LFW not present")
def test_real_lfw_view2():
    pairs = read_pairs(LFW_DIR / "pairs.txt", LFW_DIR)
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    assert {p.fold for p in pairs} == set(range(10))
    assert pairs[0] == Pair("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", True, 0)
    outside = identities_outside_pairs(LFW_DIR, pairs)
    assert len(outside) == 1468
    assert sum(len(v) for v in outside.values()) == 1549
    assert len(limit_pairs(pairs, 200)) == 200
