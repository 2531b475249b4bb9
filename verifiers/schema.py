"""The schema verifier: the answer must be JSON that validates against a schema or pydantic model.

The cheapest useful check for structured output. It finds the JSON in the reply (fences, prose),
validates it, and leaves the parsed object in ``ctx.shared["parsed"]`` for ``answer.parsed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
import referencing.exceptions
from pydantic import BaseModel, ValidationError

from cascade.text import JSONExtractError, extract_json, json_path, json_validator
from cascade.verify import ConfigError, Verdict, VerifyContext, import_object

__all__ = ["SchemaVerifier"]


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


class SchemaVerifier:
    """Passes when the answer parses as JSON and validates (JSON Schema 2020-12, or pydantic).

    Which schema: the ``schema`` or ``model`` setting; else the request's ``output_type`` or
    ``schema``; with none of these, any well-formed JSON passes. Structured output already
    validated by the provider (``completion.parsed``) is accepted as is.
    """

    expensive = False
    inline = True
    """Runs on the event loop: a bounded check of a reply already capped in size."""

    def __init__(
        self,
        schema: Mapping[str, Any] | None = None,
        model: str | type[BaseModel] | None = None,
        *,
        check_formats: bool = False,
        name: str = "schema",
    ) -> None:
        if schema is not None and model is not None:
            raise ConfigError("give either 'schema' or 'model', not both", source="verifier "
                              f"{name!r}", key="schema")
        self.name = name
        self.check_formats = check_formats
        self.schema = dict(schema) if schema is not None else None
        if self.schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(self.schema)
            except jsonschema.SchemaError as e:
                raise ConfigError(f"is not a valid JSON Schema: {e.message}",
                                  source=f"verifier {name!r}", key="schema") from None
        self.model: type[BaseModel] | None = None
        if isinstance(model, str):
            try:
                loaded = import_object(model, kind="model", implements=_is_model,
                                       source=f"verifier {name!r}", key="model")
            except ImportError as e:
                raise ConfigError(f"cannot import {model!r}: {e}", source=f"verifier {name!r}",
                                  key="model") from None
            if not _is_model(loaded):
                raise ConfigError(f"{model!r} is not a pydantic model class",
                                  source=f"verifier {name!r}", key="model")
            self.model = loaded
        elif model is not None:
            if not _is_model(model):
                raise ConfigError("must be a pydantic model class or 'package.module:Class'",
                                  source=f"verifier {name!r}", key="model")
            self.model = model

    @property
    def checks_request_schema(self) -> bool:
        """Whether this checks the request's own schema (it has none of its own): where no
        bound verifier does, the climb adds one, so no answer escapes the schema asked for."""
        return self.model is None and self.schema is None

    def verify(self, ctx: VerifyContext) -> Verdict:
        completion = ctx.candidate.completion
        # When structured output failed (instructor's parse_error), the text is still judged
        # here: a reply in a ```json fence, say, is valid once extracted, and a real failure
        # gets a reason that names the JSON path.
        model, schema = self._target(ctx)
        if completion.parse_error and model is None and schema is None:
            return Verdict(passed=False,
                           reason=f"structured output did not validate: {completion.parse_error}")
        ready = completion.parsed if completion.parsed is not None else ctx.candidate.parsed
        if ready is not None:
            obj: Any = ready
            if self.model is not None and not isinstance(ready, self.model):
                # The provider parsed into the request's type (or a dict): this verifier's own
                # model has not been checked yet.
                dumped = ready.model_dump(mode="json") if isinstance(ready, BaseModel) else ready
                try:
                    obj = self.model.model_validate(dumped)
                except ValidationError as e:
                    return Verdict(passed=False, reason=_pydantic_reason(self.model, e))
            if self.schema is not None:  # an explicit schema still applies to structured output
                data = ready.model_dump(mode="json") if isinstance(ready, BaseModel) else ready
                failure = self._schema_failure(data, self.schema)
                if failure:
                    return Verdict(passed=False, reason=failure)
            ctx.shared["parsed"] = obj
            return Verdict(passed=True, reason="structured output validated by the provider")
        try:
            data = extract_json(ctx.candidate.text)
        except JSONExtractError as e:
            return Verdict(passed=False, reason=f"not JSON: {e}")
        if model is not None:
            try:
                obj = model.model_validate(data)
            except ValidationError as e:
                return Verdict(passed=False, reason=_pydantic_reason(model, e))
        else:
            if schema is not None:
                failure = self._schema_failure(data, schema)
                if failure:
                    return Verdict(passed=False, reason=failure)
            obj = data
        ctx.shared["parsed"] = obj
        what = (model.__name__ if model is not None
                else "the schema" if schema is not None else "well-formed JSON")
        return Verdict(passed=True, reason=f"valid JSON matching {what}")

    def _target(self, ctx: VerifyContext) -> tuple[type[BaseModel] | None,
                                                    Mapping[str, Any] | None]:
        if self.model is not None or self.schema is not None:
            return self.model, self.schema
        out_type = ctx.request.output_type
        if _is_model(out_type):
            return out_type, None
        return None, ctx.request.schema

    def _schema_failure(self, data: Any, schema: Mapping[str, Any]) -> str | None:
        validator = json_validator(schema, check_formats=self.check_formats)
        try:
            errors = list(validator.iter_errors(data))
        except referencing.exceptions.Unresolvable as e:
            return (f"schema has a $ref that cannot be resolved locally: {e} (remote and file "
                    "refs are never fetched)")
        if not errors:
            return None
        best = jsonschema.exceptions.best_match(errors)
        assert best is not None
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        return f"schema violation at {best.json_path}: {best.message}{more}"


def _pydantic_reason(model: type[BaseModel], e: ValidationError) -> str:
    errs = e.errors(include_url=False)
    first = errs[0]
    more = f" (and {len(errs) - 1} more error(s))" if len(errs) > 1 else ""
    return (f"does not validate as {model.__name__} at {json_path(first['loc'])}: "
            f"{first['msg']}{more}")
