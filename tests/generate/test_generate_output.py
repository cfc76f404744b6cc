"""The resumable JSONL output: a partial last line is cut, error records are dropped for another try, a file made
with other settings is refused."""

import json

import pytest

from openr1_jax.errors import UserError
from openr1_jax.generate.output import JsonlOutput

FP = {"sampling": {"temperature": 0.6}, "prompt_template": "{prompt}"}


def _rec(i, error=None):
    return {"id": i, "prompt": f"p{i}", "generations": [] if error else [f"g{i}"], "error": error}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_append_then_resume_skips_finished_rows(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with JsonlOutput(path, FP, resume=True) as out:
        assert out.done == set()
        out.append([_rec(0), _rec(1)])
        out.append([_rec("a b")])
    with JsonlOutput(path, FP, resume=True) as out:
        assert out.done == {"0", "1", '"a b"'}
        out.append([_rec(2)])
    assert [r["id"] for r in _lines(path)] == [0, 1, "a b", 2]
    assert json.loads((tmp_path / "sub" / "out.jsonl.meta.json").read_text())["fingerprint"] == FP


def test_a_partial_last_line_is_truncated(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlOutput(path, FP, resume=True) as out:
        out.append([_rec(0), _rec(1)])
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"id": 2, "prompt": "p2", "generati')  # what a kill in the middle of a write leaves
    with JsonlOutput(path, FP, resume=True) as out:
        assert out.done == {"0", "1"}
        assert path.read_bytes() == whole
        out.append([_rec(2)])
    assert [r["id"] for r in _lines(path)] == [0, 1, 2]


def test_a_file_with_no_complete_line_is_emptied(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 0, "pro')
    with JsonlOutput(path, FP, resume=True) as out:
        assert out.done == set()
    assert path.read_bytes() == b""


def test_error_records_are_dropped_and_retried(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlOutput(path, FP, resume=True) as out:
        out.append([_rec(0), _rec(1, error="connection refused"), _rec(2)])
    with JsonlOutput(path, FP, resume=True) as out:
        assert out.done == {"0", "2"} and out.dropped_errors == 1
        assert [r["id"] for r in _lines(path)] == [0, 2]
        out.append([_rec(1)])
    assert sorted(r["id"] for r in _lines(path)) == [0, 1, 2]


def test_other_settings_or_no_resume_are_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlOutput(path, FP, resume=True) as out:
        out.append([_rec(0)])
    other = {**FP, "sampling": {"temperature": 1.0}}
    with pytest.raises(UserError, match=r"generated with sampling=\{'temperature': 0.6\}, not \{'temperature': 1.0\}"):
        JsonlOutput(path, other, resume=True)
    with pytest.raises(UserError, match="already exists; remove it or set resume=true"):
        JsonlOutput(path, FP, resume=False)
    assert [r["id"] for r in _lines(path)] == [0]


def test_a_damaged_line_in_the_middle_is_a_user_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_rec(0)) + "\nnot json\n" + json.dumps(_rec(1)) + "\n")
    with pytest.raises(UserError, match=r"line 2 of .* is not valid JSON"):
        JsonlOutput(path, FP, resume=True)
    with pytest.raises(UserError, match="is a folder"):
        JsonlOutput(tmp_path, FP, resume=True)
