"""Finding verifiers by name: built-ins, the ``cascade.verifiers`` entry-point group, dotted paths.

(Placeholder interface; the full implementation lands with the verifiers issue.)
"""

from __future__ import annotations

from cascade.config import VerifierConfig
from cascade.verify import Verifier

__all__ = ["load_verifier"]


def load_verifier(cfg: VerifierConfig) -> Verifier:
    """Build the verifier ``cfg`` names, calling its factory with ``cfg.settings``."""
    raise NotImplementedError
