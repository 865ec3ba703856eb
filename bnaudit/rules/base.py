"""The rule machinery: the Rule base class, the Example cases every rule carries, and the registry.

A rule is a small class with class attributes (code, name, severity, summary, fix, options, defaults,
requires) and one method, ``check(ctx)``, that yields Findings. Its docstring is its documentation: ``bnaudit
rules CODE`` prints it. ``@register`` adds it to the registry and refuses a duplicate code or name.
The complete catalogue, and the look-ups that need all of it, live in ``catalog``, which imports every family;
this module never imports it. Nothing here imports torch at module load."""

from __future__ import annotations

import fnmatch
import inspect
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from bnaudit.errors import ConfigError
from bnaudit.findings import Finding, check_severity

if TYPE_CHECKING:
    from bnaudit.context import RuleContext

CODE_RE = re.compile(r"^BN\d{3}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

# What a rule may need from the audit; a rule whose needs are not met is skipped with this reason.
REQUIREMENTS = {
    "graph": "needs the layer graph",
    "shapes": "needs --data or --input-shape (runs one forward pass)",
    "data": "needs --data",
    "predict": "needs --data (and uses --predict when given)",
    "history": "needs a recorded training run (bnaudit.record or train-compare)",
    "distributed": "needs a torch.distributed process group",
}


@dataclass(frozen=True)
class Example:
    """A tiny case that must (``Rule.invalid``) or must not (``Rule.valid``) make the rule fire.

    Attributes:
        model: zero-argument factory returning an nn.Module.
        data: zero-argument factory returning anything ``--data`` accepts (a tensor, an (x, y) pair, a
            DataLoader...). Its first batch is also the example input for the graph.
        predict: optional ``predict(model, inputs)`` for the inference-path rules.
        options: rule options for this case.
        layer: for invalid cases, the layer the finding must name (None: any layer).
        note: one line saying what the case shows.
        context: extra keyword arguments for ``bnaudit.inspect`` (e.g. a recorded history).
    """

    model: Callable[[], Any]
    data: Callable[[], Any] | None = None
    predict: Callable[..., Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    layer: str | None = None
    note: str = ""
    context: Callable[[], Mapping[str, Any]] | None = None


class Rule:
    """Base class of every rule. Subclasses set the class attributes and implement ``check``."""

    code: ClassVar[str]
    name: ClassVar[str]
    severity: ClassVar[str]
    summary: ClassVar[str]
    fix: ClassVar[str]
    family: ClassVar[str] = "architecture"
    requires: ClassVar[frozenset[str]] = frozenset({"graph"})
    options: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    valid: ClassVar[tuple[Example, ...]] = ()
    invalid: ClassVar[tuple[Example, ...]] = ()

    def __init__(self, severity: str | None = None, options: Mapping[str, Any] | None = None):
        self.severity_override = check_severity(severity) if severity else None
        self.config = self.resolve_options(options or {})

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``options`` over the defaults, type-checking every value.

        Raises:
            ConfigError: an unknown option, a value of the wrong type, or one outside its choices.
        """
        merged = dict(cls.defaults)
        for key, value in options.items():
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                raise ConfigError(f"{cls.code} has no option {key!r} (options: {known})")
            expected = cls.options[key]
            # bool is an int subclass; an option typed float accepts ints but never bools.
            ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in _as_tuple(expected))
            if not ok and float in _as_tuple(expected) and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                names = " or ".join(t.__name__ for t in _as_tuple(expected))
                raise ConfigError(f"{cls.code} option {key!r} must be {names}, got {value!r}")
            if key in cls.choices and value not in cls.choices[key]:
                raise ConfigError(f"{cls.code} option {key!r} must be one of {list(cls.choices[key])}, got {value!r}")
            merged[key] = value
        return merged

    def check(self, ctx: RuleContext) -> Iterator[Finding]:  # pragma: no cover - interface
        raise NotImplementedError

    def finding(
        self,
        layer: str | None,
        message: str,
        evidence: Mapping[str, Any] | None = None,
        *,
        fix: str | None = None,
        severity: str | None = None,
    ) -> Finding:
        """Build a Finding for this rule. ``severity`` lets a rule escalate one case (e.g. an error
        where a warning is the norm); a configured severity always wins."""
        return Finding(
            code=self.code,
            name=self.name,
            severity=self.severity_override or severity or self.severity,
            layer=layer,
            message=message,
            fix=fix or self.fix,
            evidence=dict(evidence or {}),
        )

    @classmethod
    def doc(cls) -> str:
        """The rule's documentation: its docstring, dedented."""
        return textwrap.dedent(inspect.getdoc(cls) or "").strip()


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


_REGISTRY: dict[str, type[Rule]] = {}
_BY_NAME: dict[str, str] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator adding a rule to the registry.

    Raises:
        ValueError: malformed code/name/severity, or a code or name already registered.
    """
    for attr in ("code", "name", "severity", "summary", "fix"):
        if not getattr(cls, attr, None):
            raise ValueError(f"rule {cls.__name__} lacks the class attribute {attr!r}")
    if not CODE_RE.match(cls.code):
        raise ValueError(f"rule code {cls.code!r} must look like BN123")
    if not NAME_RE.match(cls.name):
        raise ValueError(f"rule name {cls.name!r} must be kebab-case")
    check_severity(cls.severity)
    if cls.code in _REGISTRY:
        raise ValueError(f"rule code {cls.code} is registered twice ({_REGISTRY[cls.code].__name__}, {cls.__name__})")
    if cls.name in _BY_NAME:
        raise ValueError(f"rule name {cls.name!r} is registered twice ({_BY_NAME[cls.name]}, {cls.code})")
    unknown = set(cls.requires) - set(REQUIREMENTS)
    if unknown:
        raise ValueError(f"rule {cls.code} requires unknown capabilities {sorted(unknown)}")
    missing = set(cls.options) - set(cls.defaults)
    if missing:
        raise ValueError(f"rule {cls.code} options {sorted(missing)} have no default")
    _REGISTRY[cls.code] = cls
    _BY_NAME[cls.name] = cls.code
    return cls


def registered_rules() -> list[type[Rule]]:
    """The rules registered so far, ordered by code. ``bnaudit.rules.catalog.all_rules`` is the complete list:
    it imports every family first."""
    return [_REGISTRY[c] for c in sorted(_REGISTRY)]


def find_registered(code_or_name: str) -> type[Rule] | None:
    """A registered rule by code (``BN101``, any case) or name (``redundant-bias``), or None."""
    key = code_or_name.strip()
    if key.upper() in _REGISTRY:
        return _REGISTRY[key.upper()]
    if key in _BY_NAME:
        return _REGISTRY[_BY_NAME[key]]
    return None


def matches(code: str, name: str, patterns: Iterable[str]) -> bool:
    """True when a code/name is selected by any pattern: a code (``BN101``), a prefix (``BN1``, ``BN``),
    a name (``redundant-bias``) or a glob (``BN10*``)."""
    for pattern in patterns:
        p = pattern.strip()
        if not p:
            continue
        if p == name or code.startswith(p.upper()) or fnmatch.fnmatch(code, p.upper()):
            return True
    return False
