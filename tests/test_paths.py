"""leanfm.paths: the shared reader of saved descriptions (one-line errors for every wrong folder)."""

import json

import pytest

from leanfm.errors import LeanfmError
from leanfm.paths import read_description


def test_read_description_accepts_its_format_and_names_every_wrong_case(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"format": "x/1", "a": 2}))
    assert read_description(tmp_path, "run.json", "x/1", "an x run") == {"format": "x/1", "a": 2}
    cases = [
        (tmp_path / "empty", None, "'{d}' is not an x run (run.json missing); make one"),
        (tmp_path / "bad", "{not json", "is not valid JSON"),
        (tmp_path / "other", json.dumps({"format": "x/2"}), "'{d}' is not an x run of format x/1; make one"),
        (tmp_path / "list", json.dumps([1]), "is not an x run of format x/1"),
    ]
    for folder, text, message in cases:
        folder.mkdir()
        if text is not None:
            (folder / "run.json").write_text(text)
        with pytest.raises(LeanfmError) as err:
            read_description(folder, "run.json", "x/1", "an x run", "make one")
        assert message.format(d=folder) in str(err.value) and len(str(err.value).splitlines()) == 1
