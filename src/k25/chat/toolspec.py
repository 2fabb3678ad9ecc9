"""TypeScript-style tool declarations (``tools_ts_str``) as the Kimi K2.5 tokenizer writes them.

The release's tokenizer turns OpenAI tool schemas into a ``namespace functions { ... }`` block
(spec §5.5) and the chat template falls back to compact JSON when that conversion fails. This
module is our implementation of the same output; ``tools_to_typescript`` raises
``ToolSchemaError`` (or another exception for malformed input) where the release's converter
fails, so :func:`k25.chat.template.render` falls back in the same cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

INDENT = "  "
FIELD_SEP = ",\n"

# Constraint keywords shown as comments, per scalar/array type.
_CONSTRAINT_KEYS: dict[str, tuple[str, ...]] = {
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
}
_ARRAY_CONSTRAINT_KEYS = ("minItems", "maxItems")
_UNION_NAMES = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "{}",
    "array": "Array<any>",
}


class ToolSchemaError(ValueError):
    """A tool's JSON schema cannot be written as a TypeScript declaration."""


def deep_sort(value: Any) -> Any:
    """Sort every mapping by key, recursively (the release sorts tools this way before rendering)."""
    if isinstance(value, dict):
        return {k: deep_sort(v) for k, v in sorted(value.items(), key=lambda kv: kv[0])}
    if isinstance(value, list):
        return [deep_sort(v) for v in value]
    return value


def comment_lines(text: str, indent: str = "") -> str:
    """``// line`` per line of ``text``; empty lines stay empty (no indent, no slashes)."""
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


@dataclass
class _Scope:
    """Per-function state: named ``$defs`` seen so far and whether ``$ref: "#"`` occurred."""

    defs: dict[str, Any] = field(default_factory=dict)
    self_ref: bool = False


@dataclass
class _Type:
    """A parsed schema node. ``kind`` picks how ``ts`` renders it."""

    kind: str  # scalar | object | array | enum | anyof | union | ref
    description: Any = ""
    constraints: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # scalar type name or ref target
    members: list[_Type] = field(default_factory=list)  # anyOf members, or [item] for arrays
    values: list[Any] = field(default_factory=list)  # enum values / union names
    props: list[_Prop] = field(default_factory=list)
    extra: Any = None  # additionalProperties: None, True, False, or a _Type

    def doc(self, indent: str) -> str:
        """Description and constraint comments, each line ending in a newline."""
        lines = []
        if self.description:
            if not isinstance(self.description, str):
                raise ToolSchemaError(f"description must be a string, got {self.description!r}")
            lines.append(comment_lines(self.description, indent))
        if self.constraints:
            pairs = sorted(self.constraints.items(), key=lambda kv: kv[0])
            lines.append(indent + "// " + ", ".join(f"{k}: {v}" for k, v in pairs))
        return "".join(line + "\n" for line in lines)

    def ts(self, indent: str = "") -> str:
        """The TypeScript type expression at nesting ``indent``."""
        if self.kind == "scalar":
            return "number" if self.name == "integer" else f"{self.name}"
        if self.kind == "ref":
            return self.name
        if self.kind in ("anyof",):
            return " | ".join(m.ts(indent) for m in self.members)
        if self.kind == "union":
            return " | ".join(self.values)
        if self.kind == "enum":
            return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in self.values)
        if self.kind == "array":
            item = self.members[0]
            inner = indent + INDENT
            item_doc = item.doc(inner)
            if item_doc:
                return f"Array<\n{item_doc}{inner}{item.ts(inner)}\n{indent}>"
            return f"Array<{item.ts(indent)}>"
        return self._object_ts(indent)

    def _object_ts(self, indent: str) -> str:
        inner = indent + INDENT
        ordered = sorted((p for p in self.props if not p.optional), key=lambda p: p.name)
        ordered += sorted((p for p in self.props if p.optional), key=lambda p: p.name)
        fields = [p.ts(inner) for p in ordered]
        if self.extra is not None:
            if self.extra is True:
                extra = "any"
            elif self.extra is False:
                extra = "never"
            elif isinstance(self.extra, _Type):
                extra = self.extra.ts(inner)
            else:
                raise ToolSchemaError(f"unsupported additionalProperties: {self.extra!r}")
            fields.append(f"{inner}[k: string]: {extra}")
        if not fields:
            return "{}"
        return "{\n" + FIELD_SEP.join(fields) + "\n" + indent + "}"


@dataclass
class _Prop:
    """An object field: name, type, ``?`` when not required, and its default."""

    name: str
    type: _Type
    optional: bool
    default: Any = None

    def ts(self, indent: str) -> str:
        text = self.type.doc(indent)
        if self.default is not None:
            if isinstance(self.default, (bool, int, float)):
                shown = repr(self.default)
            else:
                shown = json.dumps(self.default, ensure_ascii=False)
            text += f"{indent}// Default: {shown}\n"
        mark = "?" if self.optional else ""
        return f"{text}{indent}{self.name}{mark}: {self.type.ts(indent)}"


def _enum_type_check(schema: dict[str, Any]) -> None:
    """Reject enums whose values disagree with the declared ``type`` (as the release does)."""
    if "type" not in schema:
        return
    declared = schema["type"]
    if isinstance(declared, list):
        if len(declared) == 1:
            declared = declared[0]
        elif len(declared) == 2 and "null" in declared:
            declared = declared[0] if declared[0] != "null" else declared[1]
        else:
            raise ToolSchemaError(f"enum with type {declared} is not supported")
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, (int, float)),
        "integer": lambda v: isinstance(v, int),
        "boolean": lambda v: isinstance(v, bool),
    }
    check = checks.get(declared) if isinstance(declared, str) else None
    if check is None:
        return
    for v in schema["enum"]:
        if v is not None and not check(v):
            raise ToolSchemaError(f"enum value {v!r} is not of type {declared}")


def _parse(schema: Any, scope: _Scope) -> _Type:
    """Parse one JSON-schema node (dict, or a boolean schema)."""
    if schema is True:
        return _Type("scalar", name="any")
    if schema is False:
        return _Type("scalar", name="null")
    if not isinstance(schema, dict):
        raise ToolSchemaError(f"invalid JSON schema node: {schema!r}")
    desc = schema.get("description", "")
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref == "#":
            scope.self_ref = True
            return _Type("ref", desc, name="parameters")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = ref.split("/")[-1]
            if target not in scope.defs:
                raise ToolSchemaError(f"$ref {ref} names no definition seen so far")
            return _Type("ref", desc, name=target)
        raise ToolSchemaError(f"unsupported $ref {ref!r}")
    if "anyOf" in schema:
        return _Type("anyof", desc, members=[_parse(s, scope) for s in schema["anyOf"]])
    if "enum" in schema:
        _enum_type_check(schema)
        return _Type("enum", desc, values=list(schema["enum"]))
    if "type" in schema:
        typ = schema["type"]
        if isinstance(typ, list):
            try:
                names = [_UNION_NAMES[t] for t in typ]
            except (KeyError, TypeError):
                raise ToolSchemaError(f"unsupported type list {typ!r}") from None
            return _Type("union", desc, values=names)
        if typ == "object":
            return _parse_object(schema, scope)
        if typ == "array":
            cons = {k: schema[k] for k in _ARRAY_CONSTRAINT_KEYS if k in schema}
            items = schema.get("items")
            item = _parse(items, scope) if items else _Type("scalar", name="any")
            return _Type("array", desc, constraints=cons, members=[item])
        keys = _CONSTRAINT_KEYS.get(typ, ()) if isinstance(typ, str) else ()
        return _Type("scalar", desc, constraints={k: schema[k] for k in keys if k in schema}, name=typ)
    if schema == {}:
        return _Type("scalar", name="any")
    raise ToolSchemaError(f"JSON schema node has no type, enum, anyOf or $ref: {schema!r}")


def _parse_object(schema: dict[str, Any], scope: _Scope) -> _Type:
    """An object node; registers its ``$defs`` first so its fields can refer to them."""
    node = _Type("object", schema.get("description", ""))
    if not schema:
        return node
    defs = schema.get("$defs")
    if defs:
        scope.defs.update(defs)
    extra = schema.get("additionalProperties")
    node.extra = _parse(extra, scope) if isinstance(extra, dict) else extra
    if "properties" not in schema:
        return node
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        node.props.append(
            _Prop(
                name=name,
                type=_parse(prop, scope),
                optional=name not in required,
                default=prop.get("default") if isinstance(prop, dict) else None,
            )
        )
    return node


def function_to_typescript(function: dict[str, Any]) -> str:
    """One ``type NAME = (_: {...}) => any;`` declaration, preceded by its interfaces and description."""
    scope = _Scope()
    params = function.get("parameters") or {}
    if not isinstance(params, dict):
        raise ToolSchemaError(f"parameters of {function.get('name')!r} must be an object schema")
    root = _parse_object(params, scope)
    blocks = []
    root_self_ref = scope.self_ref  # decided before the $defs are parsed, as in the release
    if root_self_ref:
        body = FIELD_SEP.join(p.ts(INDENT) for p in root.props)
        blocks.append("interface parameters {" + (f"\n{body}\n" if body else "") + "}")
    for def_name, def_schema in dict(scope.defs).items():
        if not isinstance(def_schema, dict):
            raise ToolSchemaError(f"$defs entry {def_name!r} must be an object")
        body = _parse(def_schema, scope).ts()
        desc = def_schema.get("description", "")
        head = comment_lines(desc) + "\n" if desc else ""
        blocks.append(f"{head}interface {def_name} {body}")
    name = function.get("name", "function")
    signature = "parameters" if root_self_ref else root.ts()
    description = function.get("description")
    parts = [
        "\n".join(blocks),
        comment_lines(description) if description else "",
        f"type {name} = (_: {signature}) => any;",
    ]
    return "\n".join(p for p in parts if p)


def tools_to_typescript(tools: list[dict[str, Any]] | None) -> str:
    """The ``# Tools`` block for the ``tool_declare`` turn; "" when no function tools are given."""
    if not tools:
        return ""
    functions = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise ToolSchemaError(f"tool must be an object, got {tool!r}")
        if tool.get("type") != "function":
            continue
        fn = tool.get("function", {})
        if fn:
            functions.append(function_to_typescript(fn))
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
