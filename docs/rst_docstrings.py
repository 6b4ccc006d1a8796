"""A griffe extension that turns the reStructuredText in samx's docstrings into Markdown.

samx writes its docstrings in the optax style: Google sections (``Args:``,
``Returns:``) around reStructuredText pieces that Markdown does not understand.
mkdocstrings renders docstrings as Markdown, so this extension rewrites, before
griffe parses the sections:

* ``.. math::`` blocks into ``$$ ... $$`` blocks and ``:math:`x``` into ``$x$``
  (rendered by ``pymdownx.arithmatex``);
* literal blocks (a paragraph ending in ``::`` and an indented block) and doctest
  blocks (``>>>`` lines) into fenced code blocks;
* ``:func:``, ``:class:``, ``:mod:``, ... roles into cross-references to the samx API
  pages (optional ones: a name without a page is shown as code, with no warning);
* ```Title <url>`_`` links into Markdown links;
* RST section underlines (a line of ``-`` or ``=``) into bold paragraph titles.

It is loaded by ``mkdocs.yml`` (``extensions: [docs/rst_docstrings.py]``) and changes
nothing in the package: only the text the API pages are rendered from.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|attr|data|obj|exc|const):`([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>\s]+)>`__?")
_UNDERLINE = re.compile(r"^\s*([-=~^])\1{2,}\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:\d+\.|[-*+])\s")
_DIRECTIVE = re.compile(r"^\s*\.\. [A-Za-z-]+::")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" "))


def _public_names() -> set[str]:
  try:
    import samx
  except ImportError:  # the package cannot be imported: link nothing at the top level
    return set()
  return set(getattr(samx, "__all__", ()))


class _Converter:
  """Rewrites docstrings; ``convert``'s ``module`` resolves unqualified role targets."""

  def __init__(self, public: set[str]):
    self.public = public

  # --------------------------------------------------------------------------- blocks

  @staticmethod
  def lists(lines: list[str]) -> list[str]:
    """Indents the continuation lines of list items by 4, as Markdown needs."""
    out: list[str] = []
    item: tuple[int, int] | None = None  # (content indent, shift)
    for line in lines:
      match = _LIST_ITEM.match(line)
      if match:
        base = _indent(line)
        item = (match.end(), base + 4 - match.end())
        out.append(line)
      elif item and line.strip() and _indent(line) >= item[0]:
        out.append(" " * item[1] + line if item[1] >= 0 else line[-item[1] :])
      else:
        if line.strip():
          item = None
        out.append(line)
    return out

  def blocks(self, text: str) -> str:
    lines = self.lists(text.split("\n"))
    out: list[str] = []
    i = 0
    while i < len(lines):
      line = lines[i]
      stripped = line.strip()
      if stripped.startswith(".. math::"):
        i = self._math_block(lines, i, out)
      elif stripped.startswith(">>>"):
        i = self._doctest_block(lines, i, out)
      elif stripped.endswith("::") and not _DIRECTIVE.match(line) and self._has_body(lines, i):
        i = self._literal_block(lines, i, out)
      elif (
        _UNDERLINE.match(line)
        and out
        and out[-1].strip()
        and len(stripped) >= len(out[-1].strip())
      ):
        out[-1] = " " * _indent(out[-1]) + f"**{out[-1].strip()}**"
        out.append("")
        i += 1
        while i < len(lines) and not lines[i].strip():
          i += 1
      else:
        out.append(line)
        i += 1
    return "\n".join(out)

  @staticmethod
  def _body(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines after ``start`` indented deeper than ``indent`` (blank lines included)."""
    body: list[str] = []
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
      body.append(lines[j])
      j += 1
    while body and not body[-1].strip():
      body.pop()
    return body, start + len(body)

  def _has_body(self, lines: list[str], i: int) -> bool:
    body, _ = self._body(lines, i + 1, _indent(lines[i]))
    return any(line.strip() for line in body)

  @staticmethod
  def _dedent(body: list[str]) -> list[str]:
    while body and not body[0].strip():
      body = body[1:]
    depth = min((_indent(line) for line in body if line.strip()), default=0)
    return [line[depth:] if line.strip() else "" for line in body]

  @staticmethod
  def _blank_before(out: list[str]) -> None:
    if out and out[-1].strip():
      out.append("")

  def _math_block(self, lines: list[str], i: int, out: list[str]) -> int:
    indent = _indent(lines[i])
    inline = lines[i].strip()[len(".. math::") :].strip()
    body, end = self._body(lines, i + 1, indent)
    content = ([inline] if inline else []) + [line for line in self._dedent(body) if line]
    pad = " " * indent
    self._blank_before(out)
    out.append(pad + "$$")
    out.extend(pad + line for line in content)
    out.append(pad + "$$")
    if end < len(lines) and lines[end].strip():
      out.append("")
    return end

  def _fence(self, out: list[str], indent: int, code: list[str], language: str) -> None:
    pad = " " * indent
    self._blank_before(out)
    out.append(pad + "```" + language)
    out.extend((pad + line) if line else "" for line in code)
    out.append(pad + "```")

  def _literal_block(self, lines: list[str], i: int, out: list[str]) -> int:
    line = lines[i]
    indent = _indent(line)
    text = line.rstrip()
    # RST: "text::" reads "text:"; a lone "::" (or " ::") disappears.
    text = text[:-2].rstrip() if text.endswith(" ::") or text.strip() == "::" else text[:-1]
    if text.strip():
      out.append(text)
    # Inside a list item the block belongs to the item (content indented by 4).
    if _LIST_ITEM.match(line):
      indent += 4
    body, end = self._body(lines, i + 1, indent)
    self._fence(out, indent, self._dedent(body), "python")
    if end < len(lines) and lines[end].strip():
      out.append("")
    return end

  def _doctest_block(self, lines: list[str], i: int, out: list[str]) -> int:
    indent = _indent(lines[i])
    j = i
    while j < len(lines) and lines[j].strip() and _indent(lines[j]) >= indent:
      j += 1
    self._fence(out, indent, [line[indent:] for line in lines[i:j]], "python")
    if j < len(lines) and lines[j].strip():
      out.append("")
    return j

  # --------------------------------------------------------------------------- inline

  def _target(self, name: str, module: str) -> str | None:
    if name.startswith("samx."):
      return name
    if name in self.public:
      return f"samx.{name}"
    if "." not in name and module.startswith("samx"):
      return f"{module}.{name}"
    return None  # outside samx: shown as code

  def inline(self, text: str, module: str) -> str:
    # Code spans are left alone: split on them, rewrite the text in between.
    parts = re.split(r"(``[^`]+``)", text)
    for k in range(0, len(parts), 2):
      part = _LINK.sub(lambda m: f"[{' '.join(m[1].split())}]({m[2]})", parts[k])
      part = _MATH_ROLE.sub(lambda m: f"${m[1]}$", part)
      part = _ROLE.sub(lambda m: self._role(m[1], m[2], module), part)
      parts[k] = part
    return "".join(parts)

  def _role(self, kind: str, raw: str, module: str) -> str:
    short = raw.startswith("~")
    name = raw.lstrip("~").strip()
    bare = name[:-2] if name.endswith("()") else name
    title = bare.rsplit(".", 1)[-1] if short else name
    target = self._target(bare, module)
    if target is None:
      return f"<code>{title}</code>"
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'

  def convert(self, text: str, module: str) -> str:
    return self.blocks(self.inline(text, module))


class RstToMarkdown(griffe.Extension):
  """Rewrites every samx docstring from reStructuredText pieces to Markdown."""

  def __init__(self, **options: Any):
    super().__init__()
    self._converter = _Converter(_public_names())
    self._done: set[int] = set()

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    # Called once per object as the tree is built (every griffe version the docs extra
    # allows has this hook); the docstring is already attached at that point.
    del kwargs
    docstring = obj.docstring
    if docstring is None or id(docstring) in self._done:
      return
    if not obj.path.startswith("samx"):
      return
    module = obj.path if obj.is_module else obj.module.path
    docstring.value = self._converter.convert(docstring.value, module)
    self._done.add(id(docstring))
