"""The typed settings of a ladder: rungs, verifiers, policy, cache and reliability.

Plain frozen dataclasses, what a config file holds once :mod:`cascade.config` has read and
validated it; code may also build them directly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "STRUCTURED_BY_KIND",
    "STRUCTURED_OUTPUTS",
    "TRANSPORTS",
    "VENDOR_KEY_ENVS",
    "BreakerConfig",
    "BudgetConfig",
    "CacheConfig",
    "CascadeConfig",
    "PolicyConfig",
    "RetryConfig",
    "RungConfig",
    "VerifierConfig",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


STRUCTURED_OUTPUTS: tuple[str, ...] = (
    "json_schema", "json_object_schema", "json_object", "tools", "prompt",
)
"""How a rung asks for structured output; the README's compatibility table says who takes which."""
STRUCTURED_BY_KIND: Mapping[str, tuple[str, ...]] = {
    "anthropic": ("json_schema", "tools", "prompt"),
}
"""The built-in kinds that take only some of :data:`STRUCTURED_OUTPUTS` (the messages API has
no ``json_object``); their providers' ``structured_modes`` are these. Config refuses the others
at load, a fallback's inherited mode too, rather than the provider at the first call
(mid-request, for a fallback). Every other kind takes them all."""
DEFAULT_MAX_REPLY_BYTES = 8 * 1024 * 1024
VENDOR_KEY_ENVS: dict[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
"""The variable a vendor kind reads when its rung names none (and only for the vendor's own
URL): the providers send it, and the redactor cuts it wherever it is quoted."""
TRANSPORTS: tuple[str, ...] = ("auto", "httpx", "aiohttp")
"""The HTTP client under a rung's SDK: the SDK's own two (``httpx``, its default, and its
``aiohttp`` option); ``auto`` picks aiohttp where that is exact (:mod:`cascade.providers._http`)."""


@dataclass(frozen=True, kw_only=True)
class RungConfig:
    """One model endpoint of the ladder (or a failover alternative for one)."""

    model: str
    """The model name sent to the provider."""
    provider: str = "openai"
    """A provider kind: built in (openai, anthropic, openai-compatible, local, replay),
    registered with ``register_provider``, or installed by a ``cascade.providers`` entry point."""
    base_url: str | None = None
    """Required for ``openai-compatible``; optional override for the others."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key. The key itself never enters config."""
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    price: Literal["unknown"] | None = None
    """``"unknown"``: the model's price is not known, so its cost counts as 0 and the ladder
    refuses cost caps and budgets (they could not hold). Config files must give every rung a
    price (the table, the two keys, or this)."""
    max_tokens: int = 512
    temperature: float = 0.0
    timeout_s: float = 60.0
    logprobs: bool = False
    """Ask for token log-probabilities (OpenAI-style); the confidence verifier reads them."""
    name: str = ""
    """A label for traces and per-rung settings; defaults to the model name."""
    verifiers: tuple[str, ...] | None = None
    """Ids of the verifiers that judge this rung; None means every configured verifier."""
    thresholds: Mapping[str, float] = field(default_factory=dict)
    """Per-verifier score thresholds for this rung, overriding the verifier's own."""
    max_retries: int | None = None
    """Overrides ``[retry] max_attempts - 1`` for this rung."""
    drift_max_disagreement: float | None = None
    """The disagreement rate with the top rung this rung showed on the suite (``cascade tune``
    writes it); the drift alarm fires when production is credibly above it."""
    fallbacks: tuple[RungConfig, ...] = ()
    """Alternative endpoints for the same rung (e.g. the same model at another provider)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Extra request fields passed to the provider unchanged."""
    structured_output: str | None = None
    """How a JSON Schema or pydantic type is asked for (one of :data:`STRUCTURED_OUTPUTS`);
    None uses the provider kind's default (``json_schema``; ``tools`` for anthropic)."""
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    """The largest reply body (decoded) read from the endpoint; a larger one is ReplyTooLarge."""
    stop: tuple[str, ...] = ()
    """Stop sequences sent with every call of this rung."""
    check_model: bool = False
    """Before the first call, ask the server's ``/models`` and fail clearly when it does not
    list ``model``: for servers that answer any model name with what they loaded."""
    transport: str = "auto"
    """The HTTP client the SDK sends with (one of :data:`TRANSPORTS`). ``auto``: aiohttp on an
    asyncio loop with no proxy set in the environment (0.2-0.4 ms less a served request), else
    httpx. It changes no answer, so it is not part of the cache key."""

    @property
    def label(self) -> str:
        return self.name or self.model

    @property
    def endpoint(self) -> str:
        """Identifies the endpoint (breakers, latency, health, metrics, recordings): provider,
        base URL and model. Credentials in the URL are never part of it: it is shown and
        stored in many places (see :func:`_shown_url`)."""
        return f"{self.provider}|{self.shown_url}|{self.model}"

    @property
    def shown_url(self) -> str:
        """``base_url`` as traces, health output and endpoint keys show it: credentials
        (``user:password@``, query values) masked; "" for the provider's default URL."""
        return _shown_url(self.base_url or "")

    @property
    def price_known(self) -> bool:
        return self.price != "unknown"

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (
            input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok
        ) / 1e6

    def identity(self) -> dict[str, Any]:
        """What changes this rung's answers: part of the cache key. Excludes secrets and labels."""
        return {
            "model": self.model,
            "provider": self.provider,
            "base_url": self.base_url,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "logprobs": self.logprobs,
            "verifiers": list(self.verifiers) if self.verifiers is not None else None,
            "thresholds": dict(sorted(self.thresholds.items())),
            "extra": dict(self.extra),
            # Only when set, so keys written before these settings existed stay valid.
            **({"structured_output": self.structured_output} if self.structured_output else {}),
            **({"stop": list(self.stop)} if self.stop else {}),
        }


@dataclass(frozen=True, kw_only=True)
class VerifierConfig:
    """One verifier of the ladder: which plugin, its id, its threshold and its settings."""

    name: str
    """Built-in short name, entry-point name, or ``package.module:factory``."""
    id: str = ""
    """How rungs and thresholds refer to it; defaults to ``name``."""
    threshold: float | None = None
    """Score threshold applied by the policy; None uses the verifier's own pass/fail."""
    timeout_s: float = 30.0
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.id or self.name

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.key,
            "threshold": self.threshold,
            "settings": _jsonable(self.settings),
        }


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """How verdicts become a decision."""

    on_unverified: Literal["return", "raise"] = "return"
    """When the top rung is rejected too: return it with ``verified=False``, or raise."""
    short_circuit: bool = True
    """Skip expensive verifiers once a cheap one has rejected the candidate."""
    shadow_rate: float = 0.0
    """Share of answers accepted below the top rung that are also sent to the top rung, to
    watch in production whether the tuned thresholds still hold (``cascade.health()``)."""
    shadow_normaliser: str = "normalised"
    """How a shadow answer is compared with the accepted one (as the agreement verifier)."""
    shadow_max_in_flight: int = 8
    """Shadow checks running at once (off the response path); beyond it a sample is dropped."""
    drift_max_disagreement: float | None = None
    """Default tolerated disagreement rate with the top rung; a rung's own value (written by
    ``cascade tune``) wins. Above it, credibly, the drift alarm puts the rung in safe mode."""
    drift_alpha: float = 0.001
    """The drift alarm's false-alarm rate: at most one false alarm per ``1 / drift_alpha``
    shadow checks on average while a rung stays within its tolerated rate."""


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    enabled: bool = True
    directory: str | None = None
    """Default: ``$CASCADE_CACHE_DIR`` or the user cache dir."""
    ttl_s: float | None = None
    size_limit_mb: float = 1024.0
    key_metadata: tuple[str, ...] = ()
    """Request metadata keys that also enter the cache key: ``["client"]`` behind ``cascade
    serve`` keeps each client's verified answers apart (shared by default: one client's hit
    would tell another that the same question was asked, and when)."""


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    max_attempts: int = 3
    """Calls per endpoint, first try included. The SDKs' own retries are switched off."""
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    jitter: float = 0.5
    """Full jitter fraction: each delay is drawn from [d·(1-jitter), d]."""


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    failure_threshold: int = 5
    """Consecutive transport failures that open an endpoint's circuit."""
    cooldown_s: float = 30.0


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """A spending cap per key (user, tenant, session) and period, shared in the process."""

    limit_usd: float | None = None
    period_s: float = 86400.0


@dataclass(frozen=True, kw_only=True)
class CascadeConfig:
    """A whole ladder with its verifiers and settings."""

    rungs: tuple[RungConfig, ...]
    verifiers: tuple[VerifierConfig, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    max_cost_usd: float | None = None
    """Per-request cap; rungs whose estimated cost exceeds what is left are skipped."""
    timeout_s: float | None = None
    """Per-request deadline over the whole climb."""
    source: str = "<config>"
    server: Mapping[str, Any] = field(default_factory=dict)
    """The raw ``[server]`` table; ``cascade.serve`` validates it (its errors name the key)."""
    store: Mapping[str, Any] = field(default_factory=dict)
    """The raw ``[store]`` table; ``cascade.store`` validates it."""
    router: Mapping[str, Any] = field(default_factory=dict)
    """The raw ``[router]`` table (what ``cascade tune`` writes); ``cascade.routing`` reads it."""

    def verifiers_for(self, rung: RungConfig) -> tuple[VerifierConfig, ...]:
        if rung.verifiers is None:
            return self.verifiers
        by_key = {v.key: v for v in self.verifiers}
        return tuple(by_key[k] for k in rung.verifiers)

    def threshold(self, rung: RungConfig, verifier: VerifierConfig) -> float | None:
        return rung.thresholds.get(verifier.key, verifier.threshold)

    def identity(self) -> dict[str, Any]:
        """Everything that changes which answer is returned: the cache key's config part."""
        return {
            "rungs": [r.identity() for r in self.rungs],
            "verifiers": [v.identity() for v in self.verifiers],
        }

    def replace(self, **changes: Any) -> CascadeConfig:
        return replace(self, **changes)


@functools.lru_cache(maxsize=1024)
def _shown_url(base_url: str) -> str:
    """``base_url`` with its credentials (``user:password@``) masked. No digest of the real URL
    tells endpoints that differ only in their credentials apart: ``/healthz`` shows this
    without a key, and a digest of a URL whose every other part is shown lets anyone test
    guesses of the password offline. Such endpoints share a circuit and a latency record."""
    from cascade.secrets import mask_credentials  # secrets reads this module's settings

    return mask_credentials(base_url)
