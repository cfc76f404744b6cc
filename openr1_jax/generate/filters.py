"""Math-verify verdicts per generation and Open-R1's pass-rate filter per row.

Each generation's answer is compared with the row's reference by `openr1_jax.evaluate.scoring.score_math`, which
follows Open-R1's accuracy reward (the reference read as LaTeX, the generation's boxed answer preferred). A
verdict is True/False, or None when it cannot be decided (the reference does not parse, math-verify ran out of
time). The row's pass rate is the mean of its decided verdicts (None if there are none), and the row is kept when
pass_rate_min <= pass_rate <= pass_rate_max. (Open-R1's compute_pass_rate keeps the open band min < rate < max;
a closed band lets the defaults 0 and 1 keep every decided row.) Every row stays in the output, with `kept:
false` when filtered out, so the file still has one line per dataset row, a resume still knows it is done, and
another band can be applied later without generating again.

math-verify bounds its time with signal.alarm, which fails outside a main thread and cannot always interrupt
sympy; the verdicts are computed in worker processes instead (openr1_jax.evaluate.pool), each call killed after
`filters.timeout_s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from openr1_jax.generate.config import FilterSection


def pass_rate(verdicts: Sequence[bool | None]) -> float | None:
    decided = [v for v in verdicts if v is not None]
    return sum(decided) / len(decided) if decided else None


class MathFilter:
    """Adds `verdicts`, `pass_rate` and `kept` to records; call `close()` (or use `with`) to stop the workers."""

    def __init__(self, fc: FilterSection):
        from openr1_jax.evaluate.scoring import math_pool

        self.fc = fc
        self._pool = math_pool(fc.workers, fc.timeout_s)

    def verdicts(self, pairs: Sequence[tuple[str, Any]]) -> list[bool | None]:
        """One verdict per (generation, reference); None where the reference does not parse or time ran out."""
        from openr1_jax.evaluate.scoring import score_math_all

        scores = score_math_all([(text, str(reference)) for text, reference in pairs], pool=self._pool)
        return [None if s.timed_out or s.error is not None else s.correct for s in scores]

    def annotate(self, records: list[dict[str, Any]], references: list[Any]) -> None:
        """Fill the filter fields of each record in place (records with an error get none decided)."""
        pairs, owners = [], []
        for i, (record, reference) in enumerate(zip(records, references, strict=True)):
            if record.get("error") is None and reference is not None:
                for text in record["generations"]:
                    pairs.append((text, reference))
                    owners.append(i)
        flat = self.verdicts(pairs)
        per_row: list[list[bool | None]] = [[] for _ in records]
        for owner, verdict in zip(owners, flat, strict=True):
            per_row[owner].append(verdict)
        for i, record in enumerate(records):
            if record.get("error") is None and references[i] is None:
                per_row[i] = [None] * len(record["generations"])  # no reference: nothing to decide
            rate = pass_rate(per_row[i])
            record["verdicts"] = per_row[i]
            record["pass_rate"] = rate
            record["kept"] = rate is not None and self.fc.pass_rate_min <= rate <= self.fc.pass_rate_max

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathFilter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
