"""``GET /openapi.json``: the OpenAPI 3.1 document of every route, built once per process.

Its error responses come from the error classes themselves (each status lists the codes that
route can answer), and the deployment action and answer from the types that decode and encode
them (``state.Action``, ``state.Deployment``), so a new error, action or field cannot be missing
here. tests/test_docs.py holds its paths against the application's routes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fastserve.actions import Action, Deployment
from fastserve.errors import (
    BadFeatures,
    BodyTimeout,
    BodyTooLarge,
    DeployConflict,
    DeployDisabled,
    Draining,
    FastServeError,
    MalformedBody,
    ModelError,
    ModelRejectedInput,
    NotReady,
    QueueFull,
    QueueTimeout,
    StateUnavailable,
    TooManyRows,
    Unauthorized,
    UnknownModel,
    UnknownOutput,
    UnknownRoute,
    UnknownVersion,
    UnsupportedMediaType,
    VersionNotReady,
)
from fastserve.version import __version__

_REF = "#/components/schemas/{name}"
_MEDIA_TYPES = ("application/json", "application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

# What each route can answer besides its 200, by error class. A bug is a 500 internal_error on
# every route: listed, so that the document is true, and never expected by the tests.
_PREDICT_ERRORS: tuple[type[FastServeError], ...] = (
    MalformedBody,
    UnknownOutput,
    UnknownModel,
    UnknownRoute,
    BodyTimeout,
    BodyTooLarge,
    TooManyRows,
    UnsupportedMediaType,
    BadFeatures,
    ModelRejectedInput,
    QueueFull,
    ModelError,
    FastServeError,
    NotReady,
    Draining,
    QueueTimeout,
)
_DEPLOY_ERRORS: tuple[type[FastServeError], ...] = (
    MalformedBody,
    Unauthorized,
    DeployDisabled,
    UnknownModel,
    UnknownVersion,
    UnknownRoute,
    DeployConflict,
    VersionNotReady,
    BodyTimeout,
    BodyTooLarge,
    FastServeError,
    NotReady,
    Draining,
    StateUnavailable,
)
_METADATA_ERRORS: tuple[type[FastServeError], ...] = (
    UnknownModel,
    UnknownRoute,
    FastServeError,
    NotReady,
    Draining,
)
_OPS_ERRORS: tuple[type[FastServeError], ...] = (FastServeError,)

_NUMBER_OR_VALUE = {"type": ["number", "string", "boolean", "null"]}
_PREDICT_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": (
        "Exactly one of the row forms: `features` (one row), `instances` (rows, named rows, or raw "
        "little-endian float64 bytes with `shape`), `inputs` (columns), `dataframe_split` or "
        "`dataframe_records`; optionally `outputs`. Other keys are ignored. The feature count and "
        "the columns are the version's (GET /models/{model})."
    ),
    "properties": {
        "features": {
            "oneOf": [
                {"type": "array", "items": _NUMBER_OR_VALUE},
                {"type": "object", "additionalProperties": _NUMBER_OR_VALUE},
            ]
        },
        "instances": {
            "oneOf": [
                {"type": "array", "items": {"type": "array", "items": _NUMBER_OR_VALUE}},
                {"type": "array", "items": {"type": "object", "additionalProperties": _NUMBER_OR_VALUE}},
                {"type": "string", "contentEncoding": "base64", "description": "raw rows, with `shape`"},
            ]
        },
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "inputs": {"type": "object", "additionalProperties": {"type": "array", "items": _NUMBER_OR_VALUE}},
        "dataframe_split": {
            "type": "object",
            "properties": {
                "columns": {"type": "array", "items": {"type": "string"}},
                "data": {"type": "array", "items": {"type": "array", "items": _NUMBER_OR_VALUE}},
            },
        },
        "dataframe_records": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": _NUMBER_OR_VALUE},
        },
        "outputs": {
            "type": "array",
            "items": {"enum": ["predict", "predict_proba", "predict_log_proba", "decision_function"]},
            "minItems": 1,
            "uniqueItems": True,
        },
    },
}
_PREDICT_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["model", "version"],
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "string"},
        "predictions": {"type": "array", "description": "one value a row"},
        "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "log_probabilities": {
            "type": "array",
            "items": {"type": "array", "items": {"type": ["number", "null"]}},
        },
        "scores": {"type": "array"},
        "classes": {"type": "array"},
    },
}
_OBJECT = {"type": "object"}


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"enum": sorted(set(codes))}, "message": {"type": "string"}},
            }
        },
    }


def _errors(classes: tuple[type[FastServeError], ...], media_types: tuple[str, ...]) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for cls in classes:
        by_status.setdefault(cls.status, []).append(cls.code)
    responses: dict[str, Any] = {}
    for status, codes in sorted(by_status.items()):
        response: dict[str, Any] = {
            "description": ", ".join(sorted(set(codes))),
            "content": {media: {"schema": _error_schema(codes)} for media in media_types},
        }
        if status == QueueFull.status:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        if status == Unauthorized.status:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[str(status)] = response
    return responses


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in names
    ]


def _predict(summary: str, *params: str) -> dict[str, Any]:
    errors = _PREDICT_ERRORS + ((UnknownVersion,) if "version" in params else ())
    return {
        "post": {
            "summary": summary,
            "parameters": [
                *_path_params(*params),
                {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "X-Routing-Key", "in": "header", "required": False, "schema": {"type": "string"}},
            ],
            "requestBody": {
                "required": True,
                "content": {media: {"schema": _PREDICT_REQUEST} for media in _MEDIA_TYPES},
            },
            "responses": {
                "200": {
                    "description": "the predictions, in the format Accept asks for (else the request's)",
                    "headers": {
                        "X-Model-Version": {"schema": {"type": "string"}},
                        "X-Request-ID": {"schema": {"type": "string"}},
                    },
                    "content": {media: {"schema": _PREDICT_RESPONSE} for media in _MEDIA_TYPES[:2]},
                },
                **_errors(errors, _MEDIA_TYPES[:2]),
            },
        }
    }


def _get(
    summary: str, ok: dict[str, Any], errors: tuple[type[FastServeError], ...], *params: str
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": ok, **_errors(errors, ("application/json",))},
    }
    if params:
        operation["parameters"] = _path_params(*params)
    return {"get": operation}


# The Open Inference Protocol (KServe V2): its errors are {"error": "<message>"}, and it has no
# 422 (v2.V2Wire answers those 400).
_V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_V2_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
        "datatype": {"type": "string"},
        "parameters": _OBJECT,
        "data": {"type": "array"},
    },
}
_V2_INFER_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "description": "JSON, or with the binary tensor extension a JSON header of "
    "Inference-Header-Content-Length bytes followed by the tensors' bytes",
    "properties": {
        "id": {"type": "string"},
        "parameters": _OBJECT,
        "inputs": {"type": "array", "items": _V2_TENSOR},
        "outputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        },
    },
}
_V2_INFER_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _V2_TENSOR},
    },
}


def _v2_errors(classes: tuple[type[FastServeError], ...]) -> dict[str, Any]:
    statuses = sorted({400 if cls.status == 422 else cls.status for cls in classes})
    return {
        str(status): {
            "description": "an error",
            "content": {"application/json": {"schema": _V2_ERROR}},
            **(
                {"headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}}
                if status == QueueFull.status
                else {}
            ),
        }
        for status in statuses
    }


def _v2_get(summary: str, errors: tuple[type[FastServeError], ...], *params: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": _json(_OBJECT, summary), **_v2_errors(errors)},
    }
    if params:
        operation["parameters"] = _path_params(*params)
    return {"get": operation}


def _v2_infer(summary: str, *params: str) -> dict[str, Any]:
    errors = _PREDICT_ERRORS + ((UnknownVersion,) if "version" in params else ())
    return {
        "post": {
            "summary": summary,
            "parameters": [
                *_path_params(*params),
                {
                    "name": "Inference-Header-Content-Length",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _V2_INFER_REQUEST}},
            },
            "responses": {
                "200": {
                    "description": "the outputs; binary ones follow the JSON, whose length is in "
                    "Inference-Header-Content-Length",
                    "content": {
                        "application/json": {"schema": _V2_INFER_RESPONSE},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                **_v2_errors(errors),
            },
        }
    }


def _v2_paths() -> dict[str, Any]:
    unknown = (UnknownModel, FastServeError, NotReady)
    pinned = (*unknown, UnknownVersion)
    return {
        "/v2": _v2_get("V2 server metadata", (FastServeError,)),
        "/v2/health/live": _v2_get("V2 liveness", (FastServeError,)),
        "/v2/health/ready": _v2_get("V2 readiness", (FastServeError, NotReady, Draining)),
        "/v2/models/{model}": _v2_get("V2 model metadata", unknown, "model"),
        "/v2/models/{model}/versions/{version}": _v2_get("V2 version metadata", pinned, "model", "version"),
        "/v2/models/{model}/ready": _v2_get("V2 model readiness", unknown, "model"),
        "/v2/models/{model}/versions/{version}/ready": _v2_get(
            "V2 version readiness", pinned, "model", "version"
        ),
        "/v2/models/{model}/infer": _v2_infer("V2 infer, routed as POST /predict/{model}", "model"),
        "/v2/models/{model}/versions/{version}/infer": _v2_infer(
            "V2 infer from one pinned version", "model", "version"
        ),
    }


def document() -> dict[str, Any]:
    """The OpenAPI document of fastserve's routes."""
    (action, deployment), components = msgspec.json.schema_components([Action, Deployment], ref_template=_REF)
    readiness = (NotReady, Draining, FastServeError)
    paths = {
        "/predict/{model}": _predict("Predictions from the model's stable version (or its canary)", "model"),
        "/predict/{model}/versions/{version}": _predict(
            "Predictions from one pinned version", "model", "version"
        ),
        "/deploy/{model}": {
            "post": {
                "summary": "A deployment action",
                "security": [{"bearer": []}],
                "parameters": _path_params("model"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": action}}},
                "responses": {
                    "200": _json(deployment, "the model's deployment after the action"),
                    **_errors(_DEPLOY_ERRORS, ("application/json",)),
                },
            }
        },
        "/healthz": _get(
            "Liveness",
            _json({"type": "object", "properties": {"status": {"const": "alive"}}}, "the process serves"),
            _OPS_ERRORS,
        ),
        "/readyz": _get(
            "Readiness of every worker",
            _json({"type": "object", "properties": {"status": {"const": "ready"}}}, "ready"),
            readiness,
        ),
        "/status": _get(
            "Models, versions, counts and the deployment log", _json(_OBJECT, "status"), _OPS_ERRORS
        ),
        "/metrics": _get(
            "Prometheus text exposition",
            {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            _OPS_ERRORS,
        ),
        "/models/{model}": _get(
            "A model's aliases and versions", _json(_OBJECT, "metadata"), _METADATA_ERRORS, "model"
        ),
        "/models/{model}/versions/{version}": _get(
            "One version's metadata",
            _json(_OBJECT, "metadata"),
            (*_METADATA_ERRORS, UnknownVersion),
            "model",
            "version",
        ),
        "/openapi.json": _get("This document", _json(_OBJECT, "the OpenAPI document"), _OPS_ERRORS),
        **_v2_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fastserve",
            "version": __version__,
            "description": "A production model server for scikit-learn models. Errors are "
            '`{"error": {"code": ..., "message": ...}}`; a path the API does not have is a 404 '
            "`not_found`, a method a path does not take a 405 `method_not_allowed`.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


__all__ = ["document"]
