"""Decontamination: Open-R1's word 8-gram overlap, on hand-made rows."""

import json

import pytest

from openr1_jax.errors import UserError
from openr1_jax.evaluate.decontaminate import (
    BenchmarkRef,
    DecontaminateConfig,
    build_lookup,
    is_contaminated,
    load_decontaminate_config,
    normalize_text,
    run_decontaminate,
    word_ngrams,
)

BENCH = "Find the number of ordered pairs of positive integers such that their product is 2024."


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_normalization_and_ngrams():
    assert normalize_text("  Find THE\tnumber\n\nof  pairs ") == "find the number of pairs"
    assert word_ngrams("a b c d", 2) == {"a b", "b c", "c d"}
    assert word_ngrams("a b c", 4) == set()  # shorter than n: no n-grams, never flagged


def test_the_exact_8_gram_boundary():
    lookup = build_lookup([BENCH], 8)
    words = BENCH.split()
    seven = " ".join(words[3:10])  # 7 consecutive benchmark words
    eight = " ".join(words[3:11])
    assert not is_contaminated(f"Unrelated start {seven} unrelated end", lookup, 8)
    assert is_contaminated(f"Unrelated start {eight} unrelated end", lookup, 8)
    assert is_contaminated(f"unrelated START {eight.upper()}  end", lookup, 8)  # case and spacing do not matter


@pytest.fixture
def files(tmp_path):
    words = BENCH.split()
    train = _write(
        tmp_path / "train.jsonl",
        [
            {"problem": BENCH, "solution": "copied"},  # verbatim
            {"problem": "Prove that " + " ".join(words[:8]) + " is even.", "solution": "8 shared words"},
            {"problem": "Prove that " + " ".join(words[:7]) + " is even.", "solution": "7 shared words"},
            {"problem": "What is 2 + 2?", "solution": "clean"},
            {"problem": "Compute the area of a triangle with sides three four and five units.", "solution": "other"},
        ],
    )
    bench_a = _write(tmp_path / "math.jsonl", [{"problem": BENCH}, {"problem": "short one"}])
    bench_b = _write(
        tmp_path / "gpqa.jsonl", [{"Question": "Compute the area of a triangle with sides three four and five."}]
    )
    return tmp_path, train, bench_a, bench_b


def test_flag_mode_adds_one_column_per_benchmark(files):
    tmp_path, train, bench_a, bench_b = files
    cfg = DecontaminateConfig(
        dataset=str(train),
        benchmarks=[BenchmarkRef(path=str(bench_a)), BenchmarkRef(path=str(bench_b), problem_column="Question")],
        output_path=str(tmp_path / "out.jsonl"),
    )
    counts = run_decontaminate(cfg)
    assert counts["rows"] == counts["kept"] == 5
    assert counts["contaminated"] == {"math": 2, "gpqa": 1}
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["contaminated_math"] for r in rows] == [True, True, False, False, False]
    assert [r["contaminated_gpqa"] for r in rows] == [False, False, False, False, True]
    assert rows[0]["solution"] == "copied"  # every original column is kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_remove_mode_drops_flagged_rows_and_columns(files):
    tmp_path, train, bench_a, bench_b = files
    cfg = load_decontaminate_config(
        None,
        [
            f"dataset={train}",
            f"benchmarks=[{{path: {bench_a}, name: math500}}, {{path: {bench_b}, problem_column: Question}}]",
            "mode=remove",
            f"output_path={tmp_path / 'clean.parquet'}",
        ],
    )
    counts = run_decontaminate(cfg)
    assert counts["contaminated"] == {"math500": 2, "gpqa": 1} and counts["kept"] == 2
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "clean.parquet")
    assert table.column("solution").to_pylist() == ["7 shared words", "clean"]
    assert table.column_names == ["problem", "solution"]


def test_shorter_ngrams_catch_the_embedded_task(tmp_path):
    """The embedded benchmark's problems are 5 words ("What is 77 + 33?"): 8-grams never match them, 5-grams do;
    its train and test splits are disjoint by construction, so only a copied problem is flagged."""
    train = _write(tmp_path / "t.jsonl", [{"problem": "What is 77 + 33?"}, {"problem": "What is 33 + 78?"}])
    counts = run_decontaminate(
        DecontaminateConfig(dataset=str(train), ngram_size=5, output_path=str(tmp_path / "o.jsonl"))
    )
    assert counts["contaminated"] == {"embedded_math": 1}
    eight = run_decontaminate(DecontaminateConfig(dataset=str(train), output_path=str(tmp_path / "o.jsonl")))
    assert eight["contaminated"] == {"embedded_math": 0}


def test_bad_input(files):
    tmp_path, train, bench_a, bench_b = files
    out = tmp_path / "never.jsonl"
    with pytest.raises(UserError, match=rf"dataset '{train}' has no column 'question' \(problem_column\)"):
        run_decontaminate(DecontaminateConfig(dataset=str(train), problem_column="question", output_path=str(out)))
    with pytest.raises(UserError, match=rf"benchmark '{bench_b}' has no column 'problem'"):
        run_decontaminate(
            DecontaminateConfig(dataset=str(train), benchmarks=[BenchmarkRef(path=str(bench_b))], output_path=str(out))
        )
    assert not out.exists()
    with pytest.raises(UserError, match="both named 'math'"):
        DecontaminateConfig(benchmarks=[BenchmarkRef(path=str(bench_a)), BenchmarkRef(path=str(bench_a))])
    with pytest.raises(UserError, match="ngram_size must be >= 1"):
        DecontaminateConfig(ngram_size=0)
    with pytest.raises(UserError, match=r"dataset file '\./missing\.jsonl' does not exist"):
        run_decontaminate(DecontaminateConfig(dataset="./missing.jsonl", output_path=str(out)))
    with pytest.raises(UserError, match="unknown benchmark 'nope'"):
        run_decontaminate(
            DecontaminateConfig(dataset=str(train), benchmarks=[BenchmarkRef(path="nope")], output_path=str(out))
        )
