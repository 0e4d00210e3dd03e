"""Render Triton kernel sources from the Jinja templates in codegen/templates/.

Templates are `*.py.j2` files rendered with `StrictUndefined`, so a parameter a
template uses but the caller did not pass is an error, never an empty string. Every
error names the template and, when the caller passes one, the fused region.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from ..compiler.errors import StratoError

TEMPLATE_DIR = Path(__file__).parent / "templates"


class CodegenError(StratoError):
    """A kernel template failed to render, or rendered to invalid Python."""


@cache
def template_environment() -> jinja2.Environment:
    """The one Jinja environment over codegen/templates/ (strict, no autoescape)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_names() -> list[str]:
    """Names of the available templates (e.g. 'pointwise.py.j2')."""
    return sorted(template_environment().list_templates(extensions=["j2"]))


def render_template(template_name: str, *, region: str | None = None, **params: Any) -> str:
    """Render `template_name` with `params` into Python source, checked to parse.

    `region` only labels errors (e.g. the fused region's name); it is not passed to the
    template. Raises CodegenError naming the template, the region and what was wrong.
    """
    where = f"template {template_name!r}" + (f" for region {region!r}" if region else "")
    env = template_environment()
    try:
        template = env.get_template(template_name)
    except jinja2.TemplateNotFound as exc:
        raise CodegenError(
            f"{where}: no such template in {TEMPLATE_DIR}; available: {', '.join(template_names())}."
        ) from exc
    except jinja2.TemplateSyntaxError as exc:
        raise CodegenError(f"{where}: syntax error at line {exc.lineno}: {exc.message}") from exc
    try:
        source = template.render(**params)
    except jinja2.UndefinedError as exc:
        raise CodegenError(
            f"{where}: {exc.message}; pass it to render_template (given: {', '.join(sorted(params)) or 'nothing'})."
        ) from exc
    except Exception as exc:
        raise CodegenError(f"{where}: rendering raised {type(exc).__name__}: {exc}") from exc
    try:
        ast.parse(source)
    except SyntaxError as exc:
        line = source.splitlines()[exc.lineno - 1] if exc.lineno else ""
        raise CodegenError(
            f"{where}: rendered source is not valid Python (line {exc.lineno}: {exc.msg}: {line.strip()!r})."
        ) from exc
    return source
