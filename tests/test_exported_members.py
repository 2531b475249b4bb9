"""The public API is exactly cascade.__all__, and every exported name says why it exists."""

from __future__ import annotations

import cascade


def test_all_names_resolve_and_are_documented() -> None:
    assert len(cascade.__all__) == len(set(cascade.__all__))
    for name in cascade.__all__:
        obj = getattr(cascade, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_all_is_exactly_the_public_names() -> None:
    """Submodules (``cascade.engine``…) are attributes too, once imported; every other public
    name of the package is in ``__all__``, and ``__all__`` holds nothing else."""
    public = {n for n in vars(cascade) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(cascade, n)).__name__ == "module"}
    assert public - modules - {"annotations"} == set(cascade.__all__)
