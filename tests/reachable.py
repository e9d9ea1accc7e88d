"""What an object holds: the arrays the memory tests look for (tests/test_quantize.py,
tests/test_int8_head.py)."""

import numpy as np


def reachable_arrays(obj, seen=None) -> list[np.ndarray]:
    """Every ndarray reachable from obj through attributes of minitf objects, dicts, lists and
    tuples, each view's base array too."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj] + ([obj.base] if isinstance(obj.base, np.ndarray) else [])
    items = []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("minitf"):
        items = list(vars(obj).values())
    return [a for item in items for a in reachable_arrays(item, seen)]
