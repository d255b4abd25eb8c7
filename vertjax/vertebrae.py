"""The vertebrae vertjax names: T4 to L4, one heatmap layer each, top to bottom."""

NAMES: tuple[str, ...] = tuple(f"T{i}" for i in range(4, 13)) + tuple(f"L{i}" for i in range(1, 5))
K: int = len(NAMES)
INDEX: dict[str, int] = {name: k for k, name in enumerate(NAMES)}


def index(name: str) -> int:
    """Layer index of a vertebra name such as 'T12'; ValueError names the valid ones."""
    key = name.strip().upper()
    if key not in INDEX:
        raise ValueError(f"unknown vertebra {name!r}: expected one of {', '.join(NAMES)}")
    return INDEX[key]
