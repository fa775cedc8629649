"""Tables of generation statistics, as the CLI prints them (markdown, so they paste into
benchmarks/RESULTS.md as they are)."""
from __future__ import annotations

from collections.abc import Sequence

from hippo.speculative.statistics import GenerationStats


def stats_row(label: str, stats: GenerationStats, baseline: GenerationStats | None = None,
              **extra: object) -> dict:
    """One row: MAT and acceptance beside every time (never a speedup without its MAT)."""
    decode_ms_per_token = 1e3 * stats.decode_s_per_token
    row = {"method": label, **extra, "tokens": stats.tokens,
           "MAT": round(stats.mean_accepted_tokens, 2),
           "acceptance": round(stats.acceptance_rate, 3),
           "prefill ms": round(1e3 * stats.prefill_s, 1),
           "selection ms": round(1e3 * stats.selection_s, 2),
           "draft prefill ms": round(1e3 * stats.draft_prefill_s, 1),
           "draft ms": round(1e3 * stats.draft_s, 1),
           "verify ms": round(1e3 * stats.verify_s, 1),
           "decode ms/token": round(decode_ms_per_token, 3),
           "tokens/s": round(stats.tokens_per_s, 1)}
    if baseline is not None:
        base = 1e3 * baseline.decode_s_per_token
        row["decode speedup"] = round(base / decode_ms_per_token, 2) if decode_ms_per_token else 0
    return row


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
