"""The one error type for problems a user can cause (bad path, column, config, update)."""

import math


class FedmiError(Exception):
    """A user-facing error: the message says what is wrong and where.

    The CLI prints it in one or two lines and exits with status 2, without a traceback.
    """


def check_number(name: str, value: float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` if it is a finite number within the bounds, else a FedmiError naming `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise FedmiError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return value


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one line, "Type: message" (a log line or a FedmiError's detail)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun in its right number: counted(1, "round") is "1 round", counted(2, "round") "2 rounds"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
