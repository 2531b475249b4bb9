"""The router's model: per rung, a logistic regression of "this rung's answer is right" on the
request's TF-IDF features, fitted with scikit-learn and saved as versioned JSON.

Why logistic regression on TF-IDF: a few hundred labelled prompts are too few for anything
richer, its probabilities are calibrated well enough to threshold, and scoring is one sparse dot
product. The file is plain JSON (vocabulary, idf, coefficients), never pickle: loading it runs
no code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import ConfigError
from cascade.messages import Message
from cascade.routing.features import ANALYZER, Featurizer, analyze, system_key

__all__ = ["FORMAT", "VERSION", "RouterModel", "cross_fit", "fit_model", "read_model"]

FORMAT = "verified-cascade-router"
VERSION = 1

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_C = 4.0
"""Inverse regularisation of each rung's logistic regression: C = 1, 4 and 16 gave cross-fitted
AUCs within 0.03 of each other on mmlu_llama and triviaqa_qwen_oai; 4 was at least as good."""


@dataclass(frozen=True)
class RouterModel:
    """P(rung j's answer is right) for each rung of ``rungs``, from a request's features."""

    rungs: tuple[str, ...]
    featurizer: Featurizer
    coef: FloatArray
    """(features, rungs)."""
    intercept: FloatArray
    systems: frozenset[str] = frozenset()
    """The system prompts (``system_key``) of the cases it was fitted on."""
    trained_on: int = 0

    def scores(self, messages: Sequence[Message]) -> FloatArray:
        """Per rung, the probability that its answer to ``messages`` is right."""
        idx, vals = self.featurizer.transform(messages)
        z = vals @ self.coef[idx] + self.intercept
        out: FloatArray = 1.0 / (1.0 + np.exp(-z))
        return out

    def subset(self, rungs: Sequence[int]) -> RouterModel:
        """The same model for some of its rungs (the ones a tuned ladder keeps)."""
        ix = list(rungs)
        return RouterModel(tuple(self.rungs[j] for j in ix), self.featurizer,
                           np.ascontiguousarray(self.coef[:, ix]), self.intercept[ix],
                           self.systems, self.trained_on)

    def to_json(self) -> dict[str, Any]:
        vocab = self.featurizer.vocabulary()
        return {
            "format": FORMAT, "version": VERSION,
            "rungs": list(self.rungs),
            "features": {"analyzer": ANALYZER, "weighting": "tfidf-sublinear-smooth-l2",
                         "vocabulary": vocab,
                         "idf": [round(float(x), 6) for x in self.featurizer.idf],
                         "system_prompts": sorted(self.systems)},
            "model": {"kind": "logistic",
                      "coef": [[round(float(x), 6) for x in col] for col in self.coef.T],
                      "intercept": [round(float(x), 6) for x in self.intercept]},
            "trained_on": self.trained_on,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False) + "\n",
                              encoding="utf-8")


def _need(cond: bool, what: str, source: str) -> None:
    if not cond:
        raise ConfigError(f"router file: {what}", source=source)


def read_model(path: str | os.PathLike[str]) -> RouterModel:
    """Load and check a router file; every defect is a ConfigError naming the file."""
    src = str(path)
    try:
        obj: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the router file: {e.strerror}", source=src) from None
    except ValueError as e:
        raise ConfigError(f"the router file is not valid JSON: {e}", source=src) from None
    _need(isinstance(obj, dict) and obj.get("format") == FORMAT,
          f"not a router file (format must be {FORMAT!r})", src)
    version = obj.get("version")
    # bool is an int: ``true`` == 1 must not pass for version 1
    _need(type(version) is int and version == VERSION,
          f"version is {version!r}; this cascade reads version {VERSION}", src)
    rungs, feats, model = obj.get("rungs"), obj.get("features"), obj.get("model")
    _need(isinstance(rungs, list) and bool(rungs) and all(isinstance(r, str) for r in rungs),
          "'rungs' must be a non-empty list of rung labels", src)
    _need(isinstance(feats, dict) and feats.get("analyzer") == ANALYZER,
          f"features.analyzer is {feats.get('analyzer') if isinstance(feats, dict) else None!r}"
          f"; this cascade computes {ANALYZER!r}", src)
    assert isinstance(feats, dict) and isinstance(rungs, list)
    vocab, idf = feats.get("vocabulary"), feats.get("idf")
    _need(isinstance(vocab, list) and all(isinstance(t, str) for t in vocab)
          and len(set(vocab)) == len(vocab), "features.vocabulary must be distinct strings", src)
    _need(isinstance(idf, list) and len(idf) == len(vocab or ()),
          "features.idf must give one number per vocabulary entry", src)
    systems = feats.get("system_prompts")
    _need(isinstance(systems, list) and all(isinstance(x, str) for x in systems),
          "features.system_prompts must be a list of system-prompt keys", src)
    assert isinstance(systems, list)
    _need(isinstance(model, dict) and model.get("kind") == "logistic",
          "model.kind must be 'logistic'", src)
    assert isinstance(model, dict) and isinstance(vocab, list) and isinstance(idf, list)
    coef, icpt = model.get("coef"), model.get("intercept")
    _need(isinstance(coef, list) and len(coef) == len(rungs)
          and all(isinstance(c, list) and len(c) == len(vocab) for c in coef),
          "model.coef must hold one row per rung with one number per feature", src)
    _need(isinstance(icpt, list) and len(icpt) == len(rungs),
          "model.intercept must give one number per rung", src)
    try:
        c = np.array(coef, dtype=np.float64).T.reshape(len(vocab), len(rungs))
        b = np.array(icpt, dtype=np.float64)
        w = np.array(idf, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("router file: model numbers must be numbers", source=src) from None
    _need(bool(np.isfinite(c).all() and np.isfinite(b).all() and np.isfinite(w).all()),
          "model numbers must be finite", src)
    trained = obj.get("trained_on", 0)
    _need(type(trained) is int and trained >= 0,
          f"trained_on is {trained!r}; it must be a count of cases", src)
    return RouterModel(tuple(rungs), Featurizer(vocab, w.tolist()), np.ascontiguousarray(c), b,
                       frozenset(systems), trained)


def _vectorizer(n: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer=analyze, min_df=2 if n >= 20 else 1, sublinear_tf=True,
                           norm="l2", smooth_idf=True, dtype=np.float64)


def fit_model(docs: Sequence[Sequence[Message]], correct: BoolArray, rungs: Sequence[str],
              *, c: float = _C) -> RouterModel:
    """Fit one logistic regression per rung (a rung right on every case, or none, gets its
    smoothed rate as a constant)."""
    from sklearn.linear_model import LogisticRegression

    n = len(docs)
    if n == 0:
        raise ConfigError("the router needs at least one labelled case")
    vec = _vectorizer(n)
    x = vec.fit_transform(list(docs))
    vocab = vec.get_feature_names_out().tolist()
    coef = np.zeros((len(vocab), len(rungs)))
    icpt = np.zeros(len(rungs))
    for j in range(len(rungs)):
        y = correct[:, j].astype(np.int64)
        k = int(y.sum())
        if k in (0, n):
            p = (k + 0.5) / (n + 1.0)
            icpt[j] = math.log(p / (1 - p))
            continue
        lr = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        coef[:, j] = lr.coef_[0]
        icpt[j] = float(lr.intercept_[0])
    return RouterModel(tuple(rungs), Featurizer(vocab, vec.idf_.tolist()), coef, icpt,
                       frozenset(system_key(d) for d in docs), n)


def score_many(model: RouterModel, docs: Sequence[Sequence[Message]]) -> FloatArray:
    """Scores of many requests at once (offline: tuning and evaluation)."""
    out = np.zeros((len(docs), len(model.rungs)))
    for i, d in enumerate(docs):
        out[i] = model.scores(d)
    return out


def cross_fit(docs: Sequence[Sequence[Message]], correct: BoolArray, rungs: Sequence[str],
              *, folds: int = 5, seed: int = 0, c: float = _C) -> FloatArray:
    """Out-of-fold scores: each case scored by a model fitted without it, so thresholds chosen
    on them see the router as it will be on new requests."""
    n = len(docs)
    k = max(2, min(folds, n))
    fold = np.random.default_rng(seed).permutation(n) % k
    out = np.zeros((n, len(rungs)))
    for f in range(k):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        m = fit_model([docs[int(i)] for i in tr], correct[tr], rungs, c=c)
        out[te] = score_many(m, [docs[int(i)] for i in te])
    return out
