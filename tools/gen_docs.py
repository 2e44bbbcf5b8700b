"""Regenerate the settings and metrics tables of docs/operations.md from the code.

The tables sit between marker comments (``<!-- BEGIN GENERATED: settings -->`` ...
``<!-- END GENERATED: settings -->``); everything outside the markers is hand-written.

    python tools/gen_docs.py            # rewrite docs/operations.md in place
    python tools/gen_docs.py --check    # exit 1 if the committed file is out of date

The settings table walks ``daemon.settings.Settings.model_fields`` recursively, so it follows
whatever fields exist; the metrics table instantiates ``daemon.metrics.Metrics`` on a fresh
registry and reads each metric's name, type, labels and help.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["DOC", "metric_rows", "metrics_table", "render", "settings_rows", "settings_table"]

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operations.md"


# ---- settings ------------------------------------------------------------------------------

def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``path``, ``list[int]``, ``"auto" | "cpu"``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "*(required)*"
    else:
        value = field.default
    if value is None:
        return "*(unset)*"
    if isinstance(value, str) and value == "":
        return '`""` (empty)'
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value, separators=(',', ':'))}`"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
           ("min_length", "length >="), ("max_length", "length <="))


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sign} {bound}")
    return ", ".join(parts)


def settings_rows(model: type[BaseModel], prefix: str, delimiter: str) -> Iterator[tuple[str, ...]]:
    """(env var, type, default, description) for every leaf field, sections walked in order."""
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        if _is_section(field.annotation):
            yield from settings_rows(field.annotation, env + delimiter, delimiter)
            continue
        description = (field.description or "").strip()
        bounds = _constraints(field)
        if bounds:
            description = f"{description} ({bounds})" if description else f"must be {bounds}"
        yield (f"`{env}`", _type_name(field.annotation), _default(field), description)


def settings_table() -> str:
    """The Markdown table of every ``GNPD_`` environment variable."""
    from daemon.settings import Settings

    config = Settings.model_config
    rows = settings_rows(Settings, config.get("env_prefix", ""),
                         config.get("env_nested_delimiter") or "__")
    return _table(("Environment variable", "Type", "Default", "Description"), rows)


# ---- metrics -------------------------------------------------------------------------------

def metric_rows() -> Iterator[tuple[str, ...]]:
    """(name, type, labels, help) of every metric ``daemon.metrics.Metrics`` registers."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from daemon.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    values: dict[str, dict[str, list[str]]] = {}  # family -> label -> pre-created values
    for family in metrics.registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label != "le" and value not in values.setdefault(family.name, {}).setdefault(label, []):
                    values[family.name][label].append(value)
    for wrapper in vars(metrics).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        name, kind = wrapper._name, wrapper._type  # noqa: SLF001 - no public accessor
        exposed = f"{name}_total" if kind == "counter" else name
        labels = []
        for label in wrapper._labelnames:  # noqa: SLF001
            known = values.get(name, {}).get(label)
            labels.append(f"`{label}` ({', '.join(known)})" if known else f"`{label}`")
        yield (f"`{exposed}`", kind, "; ".join(labels), wrapper._documentation)  # noqa: SLF001


def metrics_table() -> str:
    """The Markdown table of every metric the daemon exports."""
    return _table(("Metric", "Type", "Labels", "Help"), metric_rows())


# ---- the document --------------------------------------------------------------------------

def _table(header: tuple[str, ...], rows: typing.Iterable[tuple[str, ...]]) -> str:
    def cell(text: str) -> str:
        # One line; '<topic>' would read as an HTML tag, a bare '|' would end the cell.
        text = re.sub(r"<(?=[A-Za-z/])", "&lt;", text.replace("\n", " "))
        return re.sub(r"(?<!\\)\|", "\\|", text)

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell(c) for c in cells) + " |"
    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _replace_between(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    try:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
    except ValueError:
        raise ValueError(f"{DOC.name} lacks the markers {begin} ... {end}") from None
    return f"{head}{begin}\n<!-- made by tools/gen_docs.py; edit the code, not this table -->\n" \
           f"{body}\n{end}{tail}"


def render(text: str) -> str:
    """``text`` with both generated tables brought up to date."""
    text = _replace_between(text, "settings", settings_table())
    return _replace_between(text, "metrics", metrics_table())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 (and write nothing) if the file is out of date")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file to update")
    args = parser.parse_args(argv)
    current = args.doc.read_text(encoding="utf-8")
    updated = render(current)
    if args.check:
        if updated != current:
            print(f"{args.doc} is out of date: run python tools/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        args.doc.write_text(updated, encoding="utf-8")
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
