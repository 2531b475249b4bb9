"""The public API is exactly cascade.__all__, and every exported name says why it exists."""

from __future__ import annotations

import cascade


def test_all_names_resolve_and_are_documented() -> None:
    assert len(cascade.__all__) == len(set(cascade.__all__))
    for name in cascade.__all__:
        obj = getattr(cascade, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_no_public_name_escapes_all() -> None:
    public = {n for n in vars(cascade) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(cascade, n)).__name__ == "module"}
    leaked = public - set(cascade.__all__) - modules - {"annotations", "threading", "Any",
                                                        "Mapping", "Sequence"}
    assert not leaked, f"exported but not in __all__: {sorted(leaked)}"
