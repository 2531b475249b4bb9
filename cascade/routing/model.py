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

__all__ = ["FORMAT", "VERSION", "Corpus", "RouterModel", "cross_fit", "fit_and_cross_fit",
           "fit_model", "prompt_groups", "read_model", "score_many"]

FORMAT = "verified-cascade-router"
VERSION = 1

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

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


def _same(tokens: list[str]) -> list[str]:
    """The vectorizer's analyzer over tokens :func:`analyze` already gave (each distinct
    request is tokenised once, not once per fold)."""
    return tokens


def _vectorizer(n: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer=_same, min_df=2 if n >= 20 else 1, sublinear_tf=True,
                           norm="l2", smooth_idf=True, dtype=np.float64)


@dataclass(frozen=True)
class Corpus:
    """A suite's requests tokenised once, with identical ones grouped.

    Why group: recorded traffic repeats prompts, and a prompt's copies have the same features,
    so a fold that scores one copy with a model fitted on another is in-sample. Copies are
    requests whose :func:`analyze` tokens are the same multiset (the TF-IDF vector is then the
    same): the same words and word pairs, whatever their case, spacing or punctuation."""

    tokens: list[list[str]]
    """Per group, its tokens."""
    groups: IntArray
    """Per request, its group (numbered in order of first appearance)."""
    first: IntArray
    """Per group, its first request."""

    @classmethod
    def of(cls, docs: Sequence[Sequence[Message]]) -> Corpus:
        seen: dict[tuple[Message, ...], int] = {}
        bags: dict[tuple[str, ...], int] = {}
        tokens: list[list[str]] = []
        first: list[int] = []
        groups = np.zeros(len(docs), dtype=np.int64)
        for i, d in enumerate(docs):
            key = tuple(d)
            g = seen.get(key)
            if g is None:
                toks = analyze(key)
                g = bags.setdefault(tuple(sorted(toks)), len(tokens))
                if g == len(tokens):
                    tokens.append(toks)
                    first.append(i)
                seen[key] = g
            groups[i] = g
        return cls(tokens, groups, np.asarray(first, dtype=np.int64))


def prompt_groups(docs: Sequence[Sequence[Message]]) -> IntArray:
    """Per request, which group of identical requests it is in (see :class:`Corpus`)."""
    return Corpus.of(docs).groups


def _fit(corpus: Corpus, docs: Sequence[Sequence[Message]], rows: IntArray,
         correct: BoolArray, rungs: Sequence[str], c: float) -> RouterModel:
    """:func:`fit_model` on requests ``rows`` of ``corpus`` (``correct``: one row each).

    Each rung's regression sees one row per distinct (request, grade), weighted by how often
    it occurs: the same objective as every copy (scikit-learn's weighted loss), fitted on a
    fraction of the rows when prompts repeat. Without repeats it is the same fit, row for
    row."""
    from sklearn.linear_model import LogisticRegression

    n = len(rows)
    if n == 0:
        raise ConfigError("the router needs at least one labelled case")
    g = corpus.groups[rows]
    copied = _tfidf_of_copies(corpus, g) if np.unique(g).size < n else None
    if copied is None:
        vec = _vectorizer(n)
        x = vec.fit_transform([corpus.tokens[int(i)] for i in g])
        vocab, idf = vec.get_feature_names_out().tolist(), vec.idf_
    else:  # one row per distinct request; request i's is row ``at_row[i]``
        x, at_row, vocab, idf = copied
        x = x[at_row]
    coef = np.zeros((len(vocab), len(rungs)))
    icpt = np.zeros(len(rungs))
    for j in range(len(rungs)):
        y = correct[:, j].astype(np.int64)
        k = int(y.sum())
        if k in (0, n):
            p = (k + 0.5) / (n + 1.0)
            icpt[j] = math.log(p / (1 - p))
            continue
        _u, at, counts = np.unique(2 * g + y, return_index=True, return_counts=True)
        if at.size == n:  # no copies: the rows as they are
            lr = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        else:
            order = np.argsort(at)
            keep = at[order]
            lr = LogisticRegression(C=c, max_iter=2000).fit(
                x[keep], y[keep], sample_weight=counts[order].astype(np.float64))
        coef[:, j] = lr.coef_[0]
        icpt[j] = float(lr.intercept_[0])
    return RouterModel(tuple(rungs), Featurizer(vocab, idf.tolist()), coef, icpt,
                       frozenset(system_key(docs[int(i)]) for i in rows), n)


def _tfidf_of_copies(corpus: Corpus, g: IntArray) -> tuple[Any, IntArray, list[str],
                                                              FloatArray] | None:
    """The TF-IDF scikit-learn's vectorizer fits on requests ``g`` (groups, copies counted in
    the document frequencies), computed once per distinct request: the matrix (one row per
    distinct request, in order of first appearance), each request's row in it, the vocabulary
    and the idf. Why: the vectorizer counts every token of every copy in Python, 2.5 s of
    the router's 8 on 10,000 cases that repeat 1,482 prompts. None when no term is frequent
    enough (the vectorizer then says why)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    n = g.size
    uniq, first, inverse, copies = np.unique(g, return_index=True, return_inverse=True,
                                             return_counts=True)
    order = np.argsort(first)
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    cv = CountVectorizer(analyzer=_same, dtype=np.float64)
    counts = cv.fit_transform([corpus.tokens[int(u)] for u in uniq[order]]).tocsr()
    per_row = np.repeat(copies[order].astype(np.float64), np.diff(counts.indptr))
    df = np.bincount(counts.indices, weights=per_row, minlength=counts.shape[1])
    keep = df >= (2 if n >= 20 else 1)
    if not keep.any():
        return None
    x = counts[:, np.nonzero(keep)[0]].tocsr()
    x.sort_indices()
    idf = np.log((n + 1) / (df[keep] + 1)) + 1  # smooth idf, as TfidfTransformer
    x.data = (np.log(x.data) + 1) * idf[x.indices]  # sublinear tf
    vocab = cv.get_feature_names_out()[keep].tolist()
    return normalize(x, norm="l2", copy=False), pos[inverse.ravel()], vocab, idf


def _one_blas_thread() -> Any:
    """Fitting with one BLAS thread: L-BFGS's vector operations are too small to share, and
    on a busy machine their threads cost more than they save (the regressions on 10,000
    cases, 40,000 features: 46 s against 7 s on 2 shared cores). Below 10,000 features
    OpenBLAS runs them on one thread anyway: those fits are as they were."""
    import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS: only loaded ones are limited)
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # sklearn's

    return threadpool_limits(limits=1, user_api="blas")


def fit_model(docs: Sequence[Sequence[Message]], correct: BoolArray, rungs: Sequence[str],
              *, c: float = _C) -> RouterModel:
    """Fit one logistic regression per rung (a rung right on every case, or none, gets its
    smoothed rate as a constant)."""
    if len(docs) == 0:
        raise ConfigError("the router needs at least one labelled case")
    with _one_blas_thread():
        return _fit(Corpus.of(docs), docs, np.arange(len(docs)), correct, rungs, c)


def score_many(model: RouterModel, docs: Sequence[Sequence[Message]]) -> FloatArray:
    """Scores of many requests at once (offline: tuning and evaluation)."""
    out = np.zeros((len(docs), len(model.rungs)))
    for i, d in enumerate(docs):
        out[i] = model.scores(d)
    return out


def _fold_of(corpus: Corpus, folds: int, seed: int) -> tuple[IntArray, int]:
    """Each request's fold and the number of folds: every copy of a request in the fold of its
    first one (a random permutation of the requests, modulo the folds: without copies, the
    folds as they always were)."""
    n = len(corpus.groups)
    k = max(2, min(folds, n))
    by_group = (np.random.default_rng(seed).permutation(n) % k)[corpus.first]
    if np.unique(by_group).size < 2:  # every request in one fold: nothing to fit it on
        by_group = np.arange(by_group.size) % k
    return by_group[corpus.groups], k


def _cross_fit(corpus: Corpus, docs: Sequence[Sequence[Message]], correct: BoolArray,
               rungs: Sequence[str], folds: int, seed: int, c: float) -> FloatArray:
    n = len(docs)
    out = np.zeros((n, len(rungs)))
    if corpus.first.size < 2:  # one distinct request: no model can score it without it
        out[:] = (correct.sum(axis=0) + 0.5) / (n + 1.0)
        return out
    fold, k = _fold_of(corpus, folds, seed)
    for f in range(k):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        if te.size == 0:
            continue
        m = _fit(corpus, docs, tr, correct[tr], rungs, c)
        # one score per distinct request: its copies have the same features
        gs, inv = np.unique(corpus.groups[te], return_inverse=True)
        out[te] = score_many(m, [docs[int(corpus.first[g])] for g in gs])[inv.ravel()]
    return out


def cross_fit(docs: Sequence[Sequence[Message]], correct: BoolArray, rungs: Sequence[str],
              *, folds: int = 5, seed: int = 0, c: float = _C) -> FloatArray:
    """Out-of-fold scores: each case scored by a model fitted without it, nor any copy of its
    request (:class:`Corpus`), so thresholds chosen on them see the router as it will be on
    new requests."""
    with _one_blas_thread():
        return _cross_fit(Corpus.of(docs), docs, correct, rungs, folds, seed, c)


def fit_and_cross_fit(docs: Sequence[Sequence[Message]], correct: BoolArray,
                      rungs: Sequence[str], *, folds: int = 5, seed: int = 0,
                      c: float = _C) -> tuple[RouterModel, FloatArray]:
    """:func:`fit_model` and :func:`cross_fit` at once, tokenising each request once."""
    if len(docs) == 0:
        raise ConfigError("the router needs at least one labelled case")
    corpus = Corpus.of(docs)
    with _one_blas_thread():
        model = _fit(corpus, docs, np.arange(len(docs)), correct, rungs, c)
        return model, _cross_fit(corpus, docs, correct, rungs, folds, seed, c)
