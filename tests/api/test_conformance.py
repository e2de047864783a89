"""The app's own OpenAPI document against the Llama Stack draft spec: the same operations,
query parameters, request bodies and response media types, and component schemas of the
same structure (properties, required, additionalProperties, enums, types, items, unions).

The structural comparer resolves `$ref` on both sides, reads FastAPI's `anyOf` as the
spec's `oneOf`, and lets an optional property also be null. The app may add numeric and
length bounds where the spec is silent (see the models' Field descriptions); nothing else.
The mutation tests at the end prove the comparer fails on what it must catch.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral import openapi_doc

Schema = dict[str, Any]
SPEC_FILE = "llama-stack-draft-v0.0.1.openapi.json"
REF_PREFIX = "#/components/schemas/"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


# CI sets this so that a missing spec fails the run instead of skipping.
REQUIRE_SPEC = os.environ.get("CORRAL_REQUIRE_SPEC") == "1"


def spec_path() -> Path:
    override = os.environ.get("CORRAL_SPEC_PATH")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "spec" / SPEC_FILE


def load_spec() -> Schema | None:
    """The spec, or None when it is not beside the repository (a fresh clone)."""
    path = spec_path()
    if not path.is_file():
        return None
    spec: Schema = json.loads(path.read_text())
    return spec


def operations(doc: Schema) -> list[tuple[str, str]]:
    return [
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    ]


def op_id(op: tuple[str, str]) -> str:
    return f"{op[0].upper()} {op[1]}"


CORRAL_TAG = "Corral"  # Corral's own operations (/models*), outside the spec


def spec_operations_of_app(doc: Schema) -> list[tuple[str, str]]:
    return [
        (method, path)
        for method, path in operations(doc)
        if CORRAL_TAG not in doc["paths"][path][method].get("tags", [])
    ]


_LOADED_SPEC = load_spec()
# The committed document, compared with the spec here and with the live app in
# tests/test_openapi_doc.py. Without the spec, the parameters come from it so that the
# test ids stay the same and each test skips saying why.
APP_DOC = openapi_doc.committed()
SPEC_OPERATIONS = operations(_LOADED_SPEC) if _LOADED_SPEC else spec_operations_of_app(APP_DOC)
SPEC_COMPONENTS = sorted((_LOADED_SPEC or APP_DOC)["components"]["schemas"])
MISSING_SPEC = (
    f"the Llama Stack spec is not at {spec_path()} (the repository's sibling shared/spec/; "
    "or set CORRAL_SPEC_PATH): the conformance checks need it"
)


@pytest.fixture(scope="module")
def spec() -> Schema:
    """The spec: a skip without it, a failure when CORRAL_REQUIRE_SPEC=1 (CI)."""
    if _LOADED_SPEC is None:
        if REQUIRE_SPEC:
            pytest.fail(f"CORRAL_REQUIRE_SPEC=1 and {MISSING_SPEC}")
        pytest.skip(MISSING_SPEC)
    return _LOADED_SPEC


@pytest.fixture(scope="module")
def app_openapi(spec: Schema) -> Schema:
    """The app's committed OpenAPI document (equal to the live app's: see
    tests/test_openapi_doc.py)."""
    return copy.deepcopy(APP_DOC)


# ---------------------------------------------------------------- the comparer

# Keywords that only describe; never compared.
ANNOTATIONS = frozenset({"title", "description", "examples"})
# Bounds the app may add where the spec is silent.
ADDED_BOUNDS = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
    }
)
# Keywords that must be equal, present or absent alike, on both sides.
EXACT = ("type", "format", "pattern", "contentEncoding", "uniqueItems")
STRUCTURAL = frozenset(
    {
        "$ref",
        "oneOf",
        "anyOf",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "default",
    }
)
KNOWN = ANNOTATIONS | STRUCTURAL | frozenset(EXACT)
NULL = {"type": "null"}


class SchemaComparer:
    """Compares a spec schema with the app's schema for the same thing; `compare` returns
    a list of human-readable differences, empty when they match."""

    def __init__(self, spec_doc: Schema, app_doc: Schema) -> None:
        self.spec_doc = spec_doc
        self.app_doc = app_doc
        self._seen: set[tuple[str, str]] = set()

    def component(self, name: str) -> list[str]:
        if name not in self.app_doc.get("components", {}).get("schemas", {}):
            return [f"{name}: no component schema of that name in the app"]
        ref = {"$ref": REF_PREFIX + name}
        return self.compare(ref, ref, name)

    def compare(
        self, spec: Schema, app: Schema, where: str, *, optional: bool = False
    ) -> list[str]:
        refs = (spec.get("$ref", ""), app.get("$ref", ""))
        if all(refs):
            if refs in self._seen:  # already compared, or being compared up the stack
                return []
            self._seen.add(refs)
        try:
            spec = _resolve(spec, self.spec_doc)
            app = _resolve(app, self.app_doc)
        except KeyError as exc:
            return [f"{where}: unresolvable $ref {exc}"]
        if optional:
            app = _resolve(_without_null(app, spec), self.app_doc)
        problems = [
            f"{where}: spec uses keyword {key!r} that this comparer does not check"
            for key in spec
            if key not in KNOWN
        ]
        problems += [
            f"{where}: app adds keyword {key!r}" for key in app if key not in KNOWN | ADDED_BOUNDS
        ]
        problems += self._union(spec, app, where)
        for key in EXACT:
            if spec.get(key) != app.get(key):
                problems.append(f"{where}: {key} is {app.get(key)!r}, spec says {spec.get(key)!r}")
        spec_enum, app_enum = _enum(spec), _enum(app)
        if spec_enum != app_enum:
            problems.append(f"{where}: enum is {app_enum}, spec says {spec_enum}")
        if "default" in spec and app.get("default") != spec["default"]:
            problems.append(
                f"{where}: default is {app.get('default')!r}, spec says {spec['default']!r}"
            )
        elif "default" not in spec and "default" in app:
            problems.append(f"{where}: app adds default {app['default']!r}")
        problems += self._object(spec, app, where)
        if "items" in spec or "items" in app:
            if "items" not in spec or "items" not in app:
                problems.append(f"{where}: items only on one side")
            else:
                problems += self.compare(spec["items"], app["items"], f"{where}[]")
        return problems

    def _union(self, spec: Schema, app: Schema, where: str) -> list[str]:
        spec_union = spec.get("oneOf", spec.get("anyOf"))
        app_union = app.get("oneOf", app.get("anyOf"))
        if spec_union is None and app_union is None:
            return []
        if spec_union is None or app_union is None:
            return [f"{where}: a union on one side only"]
        if len(spec_union) != len(app_union):
            return [f"{where}: union of {len(app_union)} schemas, spec has {len(spec_union)}"]
        problems: list[str] = []
        for index, (spec_branch, app_branch) in enumerate(zip(spec_union, app_union, strict=True)):
            problems += self.compare(spec_branch, app_branch, f"{where}|{index}")
        return problems

    def _object(self, spec: Schema, app: Schema, where: str) -> list[str]:
        problems: list[str] = []
        spec_props: Schema = spec.get("properties", {})
        app_props: Schema = app.get("properties", {})
        required = set(spec.get("required", []))
        for name in sorted(spec_props.keys() - app_props.keys()):
            problems.append(f"{where}: property {name!r} is missing in the app")
        for name in sorted(app_props.keys() - spec_props.keys()):
            problems.append(f"{where}: the app has an extra property {name!r}")
        for name in sorted(spec_props.keys() & app_props.keys()):
            problems += self.compare(
                spec_props[name], app_props[name], f"{where}.{name}", optional=name not in required
            )
        app_required = set(app.get("required", []))
        if required != app_required:
            problems.append(
                f"{where}: required is {sorted(app_required)}, spec says {sorted(required)}"
            )
        spec_extra = _additional(spec)
        app_extra = _additional(app)
        if isinstance(spec_extra, dict) and isinstance(app_extra, dict):
            problems += self.compare(spec_extra, app_extra, f"{where}{{*}}")
        elif spec_extra != app_extra:
            problems.append(
                f"{where}: additionalProperties is {app_extra!r}, spec says {spec_extra!r}"
            )
        return problems


def _resolve(schema: Schema, doc: Schema) -> Schema:
    """Follow `$ref`s to the component; keywords beside a `$ref` are kept over it."""
    while "$ref" in schema:
        ref: str = schema["$ref"]
        if not ref.startswith(REF_PREFIX):
            raise KeyError(ref)
        target: Schema = doc["components"]["schemas"][ref.removeprefix(REF_PREFIX)]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _without_null(app: Schema, spec: Schema) -> Schema:
    """An optional property that the app also lets be null (`X | None = None`) counts as
    the spec's plain optional `X`."""
    key = "anyOf" if "anyOf" in app else "oneOf"
    branches: list[Schema] | None = app.get(key)
    spec_branches: list[Schema] = spec.get("oneOf") or spec.get("anyOf") or []
    if not branches or NULL not in branches or NULL in spec_branches:
        return app
    rest = [branch for branch in branches if branch != NULL]
    siblings = {k: v for k, v in app.items() if k != key}
    if siblings.get("default", "absent") is None:
        del siblings["default"]
    if len(rest) == 1:
        return {**rest[0], **siblings}
    return {**siblings, key: rest}


def _enum(schema: Schema) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return sorted(values, key=repr) if values is not None else None


def _additional(schema: Schema) -> bool | Schema:
    value: bool | Schema = schema.get("additionalProperties", True)
    return True if value == {} else value


def operation_problems(spec_doc: Schema, app_doc: Schema, method: str, path: str) -> list[str]:
    spec_op: Schema | None = spec_doc["paths"].get(path, {}).get(method)
    app_op: Schema | None = app_doc["paths"].get(path, {}).get(method)
    if spec_op is None or app_op is None:
        side = "app" if app_op is None else "spec"
        return [f"{method.upper()} {path} is not in the {side}"]
    comparer = SchemaComparer(spec_doc, app_doc)
    problems: list[str] = []
    if sorted(spec_op.get("tags", [])) != sorted(app_op.get("tags", [])):
        problems.append(f"tags are {app_op.get('tags')}, spec says {spec_op.get('tags')}")

    spec_params = {(p["in"], p["name"]): p for p in spec_op.get("parameters", [])}
    app_params = {(p["in"], p["name"]): p for p in app_op.get("parameters", [])}
    if spec_params.keys() != app_params.keys():
        problems.append(f"parameters are {sorted(app_params)}, spec says {sorted(spec_params)}")
    for key in sorted(spec_params.keys() & app_params.keys()):
        spec_param, app_param = spec_params[key], app_params[key]
        if bool(spec_param.get("required")) != bool(app_param.get("required")):
            problems.append(f"parameter {key}: required differs from the spec")
        problems += comparer.compare(
            spec_param.get("schema", {}), app_param.get("schema", {}), f"parameter {key[1]}"
        )

    spec_body: Schema | None = spec_op.get("requestBody")
    app_body: Schema | None = app_op.get("requestBody")
    if (spec_body is None) != (app_body is None):
        problems.append("a request body on one side only")
    elif spec_body is not None and app_body is not None:
        if bool(spec_body.get("required")) != bool(app_body.get("required")):
            problems.append("request body: required differs from the spec")
        problems += _content_problems(comparer, spec_body, app_body, "request body")

    spec_ok: Schema | None = spec_op["responses"].get("200")
    app_ok: Schema | None = app_op.get("responses", {}).get("200")
    if spec_ok is None or app_ok is None:
        problems.append("a 200 response on one side only")
    else:
        problems += _content_problems(comparer, spec_ok, app_ok, "200 response")
    return problems


def _content_problems(
    comparer: SchemaComparer, spec_part: Schema, app_part: Schema, where: str
) -> list[str]:
    spec_content: Schema = spec_part.get("content", {})
    app_content: Schema = app_part.get("content", {})
    if spec_content.keys() != app_content.keys():
        return [f"{where}: content types {sorted(app_content)}, spec says {sorted(spec_content)}"]
    problems: list[str] = []
    for media_type in sorted(spec_content):
        problems += comparer.compare(
            spec_content[media_type].get("schema", {}),
            app_content[media_type].get("schema", {}),
            f"{where} {media_type}",
        )
    return problems


# ---------------------------------------------------------------- the app against the spec


def test_spec_is_the_expected_contract(spec: Schema) -> None:
    assert spec["openapi"].startswith("3.1"), "the comparer is written for OpenAPI 3.1"
    assert len(SPEC_OPERATIONS) == 24
    assert len(SPEC_COMPONENTS) == 40


def test_the_app_has_exactly_the_spec_operations(app_openapi: Schema) -> None:
    spec_ops = {op_id(op) for op in SPEC_OPERATIONS}
    app_ops = {op_id(op) for op in spec_operations_of_app(app_openapi)}
    assert sorted(spec_ops - app_ops) == [], "operations missing in the app"
    assert sorted(app_ops - spec_ops) == [], "operations in the app that the spec lacks"


@pytest.mark.parametrize("operation", SPEC_OPERATIONS, ids=op_id)
def test_operation_matches_the_spec(
    spec: Schema, app_openapi: Schema, operation: tuple[str, str]
) -> None:
    method, path = operation
    assert operation_problems(spec, app_openapi, method, path) == []


@pytest.mark.parametrize("name", SPEC_COMPONENTS)
def test_component_schema_matches_the_spec(spec: Schema, app_openapi: Schema, name: str) -> None:
    assert SchemaComparer(spec, app_openapi).component(name) == []


def test_inputs_and_outputs_share_one_schema_per_model(app_openapi: Schema) -> None:
    """FastAPI splits a model into `X-Input` and `X-Output` when its two schemas differ;
    the spec has one schema per name."""
    names = app_openapi["components"]["schemas"]
    assert [name for name in names if name.endswith(("-Input", "-Output"))] == []


# ---------------------------------------------------------------- the comparer catches drift

Mutation = Callable[[Schema], None]


def _schemas(doc: Schema) -> Schema:
    schemas: Schema = doc["components"]["schemas"]
    return schemas


def _rename_property(doc: Schema) -> None:
    dataset = _schemas(doc)["Dataset"]
    dataset["properties"]["content_uri"] = dataset["properties"].pop("content_url")
    dataset["required"] = ["columns", "content_uri", "metadata"]


def _add_property(doc: Schema) -> None:
    _schemas(doc)["TrainingConfig"]["properties"]["gradient_accumulation_steps"] = {
        "type": "integer"
    }


def _drop_property(doc: Schema) -> None:
    """The app then has a property the spec does not."""
    del _schemas(doc)["PostTrainingJobStatusResponse"]["properties"]["resources_allocated"]


def _change_enum(doc: Schema) -> None:
    status = _schemas(doc)["PostTrainingJobStatusResponse"]["properties"]["status"]
    status["enum"] = ["running", "succeeded", "failed", "scheduled"]


def _change_nested_enum(doc: Schema) -> None:
    shield = _schemas(doc)["ShieldConfig"]["properties"]["shield_type"]
    shield["enum"] = [*shield["enum"], "jailbreak_guard"]


def _change_inline_default(doc: Schema) -> None:
    steps = _schemas(doc)["AgenticSystemTurn"]["properties"]["steps"]["items"]["oneOf"]
    steps[1]["properties"]["step_type"]["default"] = "model_inference"


def _change_required(doc: Schema) -> None:
    _schemas(doc)["Attachment"]["required"] = ["url"]


def _allow_extra_fields(doc: Schema) -> None:
    _schemas(doc)["OptimizerConfig"]["additionalProperties"] = True


def _change_type(doc: Schema) -> None:
    _schemas(doc)["TrainingConfig"]["properties"]["n_epochs"]["type"] = "number"


def _drop_union_branch(doc: Schema) -> None:
    _schemas(doc)["Message"]["properties"]["content"]["oneOf"].pop()


def _change_sampling_default(doc: Schema) -> None:
    params = _schemas(doc)["ChatCompletionRequest"]["properties"]["sampling_params"]
    params["properties"]["temperature"]["default"] = 1.0


def _change_url_pattern(doc: Schema) -> None:
    _schemas(doc)["URL"]["pattern"] = "^https://"


def _rename_inline_item_property(doc: Schema) -> None:
    item = _schemas(doc)["PostTrainingJobArtifactsResponse"]["properties"]["checkpoints"]["items"]
    item["properties"]["step"] = item["properties"].pop("iters")
    item["required"] = ["step", "path"]


def _unknown_keyword(doc: Schema) -> None:
    _schemas(doc)["MemoryBank"]["minProperties"] = 1


SCHEMA_MUTATIONS: dict[str, tuple[str, Mutation]] = {
    "renamed property": ("Dataset", _rename_property),
    "property missing in app": ("TrainingConfig", _add_property),
    "extra property in app": ("PostTrainingJobStatusResponse", _drop_property),
    "changed enum": ("PostTrainingJobStatusResponse", _change_enum),
    "added enum value": ("ShieldConfig", _change_nested_enum),
    "inline step default": ("AgenticSystemTurn", _change_inline_default),
    "required set": ("Attachment", _change_required),
    "additionalProperties": ("OptimizerConfig", _allow_extra_fields),
    "integer vs number": ("TrainingConfig", _change_type),
    "union branch": ("Message", _drop_union_branch),
    "inline default": ("ChatCompletionRequest", _change_sampling_default),
    "pattern": ("URL", _change_url_pattern),
    "inline item property": ("PostTrainingJobArtifactsResponse", _rename_inline_item_property),
    "unknown keyword": ("MemoryBank", _unknown_keyword),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_MUTATIONS))
def test_comparer_fails_on_a_mutated_schema(spec: Schema, app_openapi: Schema, case: str) -> None:
    name, mutate = SCHEMA_MUTATIONS[case]
    assert SchemaComparer(spec, app_openapi).component(name) == [], "baseline must match"
    mutated = copy.deepcopy(spec)
    mutate(mutated)
    assert SchemaComparer(mutated, app_openapi).component(name) != []


def _operation(doc: Schema, method: str, path: str) -> Schema:
    op: Schema = doc["paths"][path][method]
    return op


def _rename_query_parameter(doc: Schema) -> None:
    _operation(doc, "get", "/datasets/get")["parameters"][0]["name"] = "uuid"


def _make_parameter_optional(doc: Schema) -> None:
    _operation(doc, "get", "/datasets/get")["parameters"][0]["required"] = False


def _jsonl_to_json(doc: Schema) -> None:
    ok = _operation(doc, "post", "/memory_bank/get")["responses"]["200"]
    ok["content"] = {"application/json": ok["content"]["application/jsonl"]}


def _add_response_content(doc: Schema) -> None:
    ok = _operation(doc, "post", "/datasets/create")["responses"]["200"]
    ok["content"] = {"application/json": {"schema": {"type": "object"}}}


def _drop_request_body(doc: Schema) -> None:
    del _operation(doc, "post", "/memory_bank/delete")["requestBody"]


def _change_body_items(doc: Schema) -> None:
    body = _operation(doc, "post", "/memory_bank/delete")["requestBody"]
    body["content"]["application/json"]["schema"]["items"] = {"type": "integer"}


def _change_inline_body_item(doc: Schema) -> None:
    body = _operation(doc, "post", "/memory_bank/insert")["requestBody"]
    item = body["content"]["application/json"]["schema"]["items"]
    item["required"] = ["uuid", "content", "mime_type"]


def _change_response_schema(doc: Schema) -> None:
    ok = _operation(doc, "get", "/memory_banks/get")["responses"]["200"]
    ok["content"]["application/jsonl"]["schema"] = {"$ref": REF_PREFIX + "MemoryBankDocument"}


def _change_tag(doc: Schema) -> None:
    _operation(doc, "get", "/post_training/job/status")["tags"] = ["Jobs"]


OPERATION_MUTATIONS: dict[str, tuple[str, str, Mutation]] = {
    "renamed query parameter": ("get", "/datasets/get", _rename_query_parameter),
    "optional query parameter": ("get", "/datasets/get", _make_parameter_optional),
    "response media type": ("post", "/memory_bank/get", _jsonl_to_json),
    "response content added": ("post", "/datasets/create", _add_response_content),
    "request body dropped": ("post", "/memory_bank/delete", _drop_request_body),
    "request body items": ("post", "/memory_bank/delete", _change_body_items),
    "inline body item": ("post", "/memory_bank/insert", _change_inline_body_item),
    "response schema": ("get", "/memory_banks/get", _change_response_schema),
    "tag": ("get", "/post_training/job/status", _change_tag),
}


@pytest.mark.parametrize("case", sorted(OPERATION_MUTATIONS))
def test_comparer_fails_on_a_mutated_operation(
    spec: Schema, app_openapi: Schema, case: str
) -> None:
    method, path, mutate = OPERATION_MUTATIONS[case]
    assert operation_problems(spec, app_openapi, method, path) == [], "baseline must match"
    mutated = copy.deepcopy(spec)
    mutate(mutated)
    assert operation_problems(mutated, app_openapi, method, path) != []


def test_a_path_spelled_without_its_trailing_slash_is_a_different_operation(
    spec: Schema,
    app_openapi: Schema,
) -> None:
    mutated = copy.deepcopy(spec)
    mutated["paths"]["/post_training/supervised_fine_tune"] = mutated["paths"].pop(
        "/post_training/supervised_fine_tune/"
    )
    problems = operation_problems(
        mutated, app_openapi, "post", "/post_training/supervised_fine_tune"
    )
    assert problems == ["POST /post_training/supervised_fine_tune is not in the app"]
