"""Search spaces: the ``tune.search_space`` section of a search YAML -> Ray Tune's param space.

Each entry maps one config key (dotted, e.g. ``model.num_layers``) -- or several keys joined by commas,
which then always take the same value (``model.prior_attention.enabled,model.posterior_attention.enabled``)
-- to the values a trial may take::

    model.num_layers: [2, 4, 8]                  # a list: tune.choice (sampled)
    model.num_filters: {choice: [16, 32]}        # the same, spelled out
    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}     # tune.loguniform(low, high)
    optim.weight_decay: {uniform: [0.0, 3.0e-4]} # tune.uniform(low, high)
    train.kl_warmup_steps: {randint: [50, 200]}  # tune.randint(low, high), high excluded
    model.latent_channels: {grid_search: [8, 20]}  # every value, once per tune.num_samples

also ``quniform``/``qloguniform`` ``[low, high, q]`` and ``lograndint`` ``[low, high]``.  Nested
mappings (``model: {num_layers: [2, 4]}``) are read as dotted keys, so a dotlist override such as
``tune.search_space.model.num_layers=[2,4]`` works too.

Every key and value is checked against the config schema before a search starts: an unknown key,
a value of the wrong type (a float distribution on an integer key) or a value that ``validate()``
refuses is an error naming the entry.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from avi_scale.config import ConfigError, ExperimentConfig, apply_overrides

# keys Tune itself sets for every trial: searching them would fight the trial set-up
RESERVED_KEYS = ("train.output_dir", "train.checkpoint_dir", "train.resume")
RESERVED_PREFIXES = ("tune.",)

# keys a checkpoint does not depend on: PBT may change them when a trial clones another one's
# checkpoint (the model, data layout and optimizer type must stay as the checkpoint was written)
PBT_MUTABLE_KEYS = (
    "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.eps", "optim.betas", "optim.gradient_clipping",
    "optim.warmup_steps", "train.kl_beta_min", "train.kl_warmup_steps", "train.ema_decay",
    "train.skip_threshold", "data.random_flips",
)

_BOUNDS = {"uniform": 2, "loguniform": 2, "randint": 2, "lograndint": 2, "quniform": 3, "qloguniform": 3}
_LISTS = ("choice", "grid_search")
KINDS = _LISTS + tuple(_BOUNDS)
_FLOAT_KINDS = ("uniform", "loguniform", "quniform", "qloguniform")
_INT_KINDS = ("randint", "lograndint")


@dataclass(frozen=True)
class Dimension:
    """One searched entry: the name Ray sees, the config key(s) it sets, and its distribution."""

    name: str
    keys: tuple[str, ...]
    kind: str
    args: tuple

    def domain(self) -> Any:
        """The Ray Tune object for the param space (a search-space domain or a grid_search dict)."""
        from ray import tune

        a = self.args
        if self.kind == "grid_search":
            return tune.grid_search(list(a))
        if self.kind == "choice":
            return tune.choice(list(a))
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "qloguniform":
            return tune.qloguniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "lograndint":
            return tune.lograndint(a[0], a[1])
        raise ConfigError(f"tune.search_space[{self.name!r}]: unknown kind {self.kind!r}")

    def mutation(self) -> Any:
        """What PBT perturbs: the list of values (stepping to a neighbour) or the distribution."""
        if self.kind in _LISTS:
            return list(self.args)
        return self.domain()

    @property
    def pbt_mutable(self) -> bool:
        return all(k in PBT_MUTABLE_KEYS for k in self.keys)

    def probe_values(self) -> list:
        """Values checked against the schema before the search: every listed value, or both bounds."""
        a = self.args
        if self.kind in _LISTS:
            return list(a)
        if self.kind in _INT_KINDS:
            return [a[0], a[1] - 1]
        return [float(a[0]), float(a[1])]


def _plain(value: Any) -> Any:
    """numpy scalars (Ray samples with numpy) -> Python scalars; lists and dicts recursively."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _flatten(space: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in space.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"tune.search_space: keys must be config keys such as 'model.num_layers', got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            kinds = [k for k in value if k in KINDS]
            if kinds and len(value) == 1:
                items.append((name, value))
                continue
            if kinds:
                raise ConfigError(f"tune.search_space[{name!r}]: a distribution is one of {list(KINDS)} "
                                  f"alone, got the keys {sorted(value)}")
            if "," in name:
                raise ConfigError(f"tune.search_space[{name!r}]: comma-joined keys cannot hold a nested mapping")
            if not value:
                raise ConfigError(f"tune.search_space[{name!r}]: empty mapping (expected values or a distribution "
                                  f"such as {{loguniform: [1.0e-4, 1.0e-2]}})")
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def _number(name: str, kind: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} bounds must be numbers, got {x!r}")
    if not math.isfinite(x):
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} bounds must be finite, got {x!r}")
    return x


def _dimension(name: str, spec: Any) -> Dimension:
    keys = tuple(k.strip() for k in name.split(","))
    if any(not k for k in keys):
        raise ConfigError(f"tune.search_space[{name!r}]: empty key in a comma-joined list")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"tune.search_space[{name!r}]: a key is listed twice")
    if isinstance(spec, (list, tuple)):
        kind, args = "choice", list(spec)
    elif isinstance(spec, dict):
        (kind, args), = spec.items()
    else:
        raise ConfigError(f"tune.search_space[{name!r}]: expected a list of values or a distribution such as "
                          f"{{loguniform: [1.0e-4, 1.0e-2]}}, got {spec!r} (fixed values belong in the config "
                          f"sections, not in the search space)")
    if not isinstance(args, (list, tuple)):
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} takes a list, got {args!r}")
    args = [_plain(a) for a in args]
    if kind in _LISTS:
        if not args:
            raise ConfigError(f"tune.search_space[{name!r}]: {kind} needs at least one value")
        return Dimension(name, keys, kind, tuple(args))
    n = _BOUNDS[kind]
    if len(args) != n:
        form = "[low, high, q]" if n == 3 else "[low, high]"
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} takes {form}, got {args!r}")
    low, high = (_number(name, kind, x) for x in args[:2])
    if not low < high:
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} needs low < high, got {args!r}")
    if kind in ("loguniform", "qloguniform", "lograndint") and low <= 0:
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} needs low > 0, got {low!r}")
    if kind in _INT_KINDS and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} bounds must be integers, got {args!r}")
    if kind in _INT_KINDS and high - low < 1:
        raise ConfigError(f"tune.search_space[{name!r}]: {kind} excludes high, so high must exceed low")
    if n == 3:
        q = _number(name, kind, args[2])
        if q <= 0:
            raise ConfigError(f"tune.search_space[{name!r}]: {kind} needs q > 0, got {q!r}")
    return Dimension(name, keys, kind, tuple(args))


def _field_type(key: str) -> Any:
    """The annotated type of a dotted config key; ConfigError naming the key when it does not exist."""
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a section: no key {key!r}")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r} ({part!r} is not in {where}; "
                              f"known: {', '.join(sorted(hints))})")
        cls = hints[part]
    return cls


def _scalar_type(tp: Any) -> Any:
    """int/float/bool/str of a (possibly Optional) annotation, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else None
    return tp if tp in (int, float, bool, str) else None


def parse_space(space: Optional[dict]) -> list[Dimension]:
    """``tune.search_space`` -> dimensions; ConfigError naming the entry on any malformed one."""
    if space is None:
        return []
    if not isinstance(space, dict):
        raise ConfigError(f"tune.search_space must be a mapping of config keys to values, got {type(space).__name__}")
    dims = [_dimension(name, spec) for name, spec in _flatten(space)]
    seen: dict[str, str] = {}
    for d in dims:
        for key in d.keys:
            if key in RESERVED_KEYS or key.startswith(RESERVED_PREFIXES):
                raise ConfigError(f"tune.search_space[{d.name!r}]: {key} is set by avi-tune for every trial "
                                  "and cannot be searched")
            if key in seen:
                raise ConfigError(f"tune.search_space: {key} is set by both {seen[key]!r} and {d.name!r}")
            seen[key] = d.name
            try:
                tp = _scalar_type(_field_type(key))
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space[{d.name!r}]: {exc}") from None
            if d.kind in _FLOAT_KINDS and tp is not float:
                raise ConfigError(f"tune.search_space[{d.name!r}]: {d.kind} draws floats but {key} is "
                                  f"{getattr(tp, '__name__', 'not a number')}: use randint/lograndint or a list of values")
            if d.kind in _INT_KINDS and tp not in (int, float):
                raise ConfigError(f"tune.search_space[{d.name!r}]: {d.kind} draws integers but {key} is "
                                  f"{getattr(tp, '__name__', 'not a number')}")
    return dims


def overrides_for(dims: Sequence[Dimension], params: dict) -> dict[str, Any]:
    """A trial's sampled params (Ray config: dimension name -> value) -> {config key: value}."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.name not in params:
            raise ConfigError(f"trial parameters lack the searched entry {d.name!r} (has {sorted(params)})")
        for key in d.keys:
            out[key] = _plain(params[d.name])
    return out


def check_space(dims: Sequence[Dimension], base: dict) -> None:
    """Build the config each probe value gives, so that bad values fail now rather than in a trial."""
    for d in dims:
        for value in d.probe_values():
            try:
                apply_overrides(base, {k: value for k in d.keys})
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space[{d.name!r}]: value {value!r} gives an invalid config: "
                                  f"{exc}") from None


def param_space(dims: Sequence[Dimension]) -> dict[str, Any]:
    return {d.name: d.domain() for d in dims}
