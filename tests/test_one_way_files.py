"""One atomic folder write (softprompt.files.atomic_folder) for every folder written whole: prompt
checkpoints, the offline model's conversion, lm-adapt's step folders, a search's downloaded prompts."""
from __future__ import annotations

import pytest

from softprompt.files import atomic_folder

pytestmark = pytest.mark.no_ray  # `make test` runs it beside the loopback `ray up` test (pyproject.toml)


def test_a_folder_written_again_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    for text in ("old", "new"):
        with atomic_folder(tmp_path / "out") as partial:
            assert partial.parent == tmp_path and not any(partial.iterdir())  # a fresh folder
            (partial / "a").write_text(text)
            if text == "old":
                (partial / "b").write_text(text)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"] and (tmp_path / "out" / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_write_that_fails_leaves_the_previous_folder_and_no_partial_one(tmp_path):
    with atomic_folder(tmp_path / "out") as partial:
        (partial / "a").write_text("kept")
    with pytest.raises(OSError), atomic_folder(tmp_path / "out") as partial:
        (partial / "a").write_text("half")
        raise OSError("disk full")
    assert (tmp_path / "out" / "a").read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_is_made_with_its_parents(tmp_path):
    with atomic_folder(tmp_path / "a" / "b" / "out") as partial:
        (partial / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "out" / "x").read_text() == "x"
