"""Small value helpers shared by the config schema, its validation and the data pipeline."""

from __future__ import annotations

from megalm.errors import MegalmError


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive b, in integers."""
    return -(-a // b)


def llama_ffn_width(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4d, rounded up to a multiple (keeps FLOPs of a 4d GELU MLP)."""
    return multiple_of * ceil_div(int(8 * hidden_size / 3), multiple_of)


def parse_split(split: str) -> list[float]:
    """'98,1,1' -> [0.98, 0.01, 0.01] (train, validation, test fractions); 'a,b' means 'a,b,0'."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise MegalmError(f"data.split must be three non-negative weights like '98,1,1', got '{split}'")
    total = sum(parts)
    return [x / total for x in parts]
