"""Tables of generation statistics, as the CLI prints them (markdown, so they paste into
benchmarks/RESULTS.md as they are)."""
from __future__ import annotations

from collections.abc import Sequence

from hippo.speculative.statistics import GenerationStats


def rounded(value: float | None, digits: int = 2) -> float | None:
    """round(), passing None (a rate over nothing) through."""
    return None if value is None else round(value, digits)


def in_ms(seconds: float | None, digits: int = 3) -> float | None:
    """Seconds as rounded milliseconds, passing None through."""
    return None if seconds is None else round(1e3 * seconds, digits)


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    """numerator / denominator rounded; None where either is missing or the denominator 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


def stats_row(label: str, stats: GenerationStats, baseline: GenerationStats | None = None,
              **extra: object) -> dict:
    """One row: MAT and acceptance beside every time (never a speedup without its MAT). Rates
    over nothing (one token, AR's acceptance) are None."""
    per_token = stats.decode_s_per_token
    row = {"method": label, **extra, "tokens": stats.tokens,
           "MAT": rounded(stats.mean_accepted_tokens),
           "acceptance": rounded(stats.acceptance_rate, 3),
           "prefill ms": round(1e3 * stats.prefill_s, 1),
           "selection ms": round(1e3 * stats.selection_s, 2),
           "draft prefill ms": round(1e3 * stats.draft_prefill_s, 1),
           "draft ms": round(1e3 * stats.draft_s, 1),
           "verify ms": round(1e3 * stats.verify_s, 1),
           "decode ms/token": in_ms(per_token),
           "tokens/s": round(stats.tokens_per_s, 1)}
    if baseline is not None:
        row["decode speedup"] = ratio(baseline.decode_s_per_token, per_token)
    return row


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    """A value as the table shows it: blank where the row has no such column, n/a where it
    has one but the value is a rate over nothing (None)."""
    if column not in row:
        return ""
    value = row[column]
    return "n/a" if value is None else str(value)
