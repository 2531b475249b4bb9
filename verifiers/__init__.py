"""The built-in verifiers of verified-cascade.

Each is a small class implementing :class:`cascade.verify.Verifier`; configure them by short name
(``schema``, ``confidence``, ``judge``, ``refusal``, ``agreement``) and their settings become the
constructor's keyword arguments. They depend only on the verifier protocol in ``cascade.verify``
and the shared text helpers in ``cascade.text``.
"""

from __future__ import annotations

from verifiers.agreement import AgreementVerifier
from verifiers.confidence import ConfidenceVerifier
from verifiers.judge import JudgeVerifier
from verifiers.refusal import RefusalVerifier
from verifiers.schema import SchemaVerifier

__all__ = [
    "AgreementVerifier",
    "ConfidenceVerifier",
    "JudgeVerifier",
    "RefusalVerifier",
    "SchemaVerifier",
]
