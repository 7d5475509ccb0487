"""The one config loader and the one override applier, for every CLI (avi-train, avi-eval, avi-tune).

A config is built from three layers, later ones winning key by key:

1. the schema's defaults (:mod:`avi_scale.config.schema`);
2. a YAML file, on top of the chain of files its ``base:`` names (each path relative to the file that
   names it), as openai/vdvae's hyperparameter sets inherit from a parent: an experiment YAML says only
   what differs from its base;
3. dotlist overrides from the command line (``model.num_layers=8``) or a mapping (a Tune trial's values).

Sections merge key by key down the chain, except ``tune.search_space``: a file that has one replaces its
base's (a search is what its file says), ``tune.search_space={...}`` on the command line replaces the whole
space and ``tune.search_space.<key>=...`` adds or replaces one entry.  Unknown keys (with the keys the
section allows), values of the wrong type and required values left at ``???`` are rejected with the key
named; then :meth:`ExperimentConfig.check` rejects impossible values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from avi_scale.config.schema import ConfigError, ExperimentConfig

Overrides = Union[Sequence[str], Mapping[str, Any]]

# keys that configs saved by earlier versions carry and nothing reads any more: dropped when such a saved
# config is read back (from_dict), rejected as unknown in files a user writes
RETIRED_KEYS = ("deepspeed.fp16_initial_scale_power", "deepspeed.fp16_loss_scale_window")
_SPACE = "tune.search_space"
# the configs shipped inside the package (the repository's configs/ links here): addressable by name
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> dict[str, Path]:
    """Packaged config names (``cifar10_attentive``, ``search/cifar10_depth_study``, ...) -> their files."""
    return {str(f.relative_to(PACKAGED_DIR).with_suffix("")): f for f in sorted(PACKAGED_DIR.rglob("*.yaml"))}


def resolve_config(name_or_path: str | Path, kind: str = "config") -> Path:
    """A config file path as given, else a packaged config by name: ``cifar10_attentive`` (or
    ``search/tiny_mnist5k_depth_lr``; a name unique among the sub-folders may omit the folder)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    shipped = packaged_configs()
    matches = [shipped[name]] if name in shipped else [f for n, f in shipped.items() if n.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{kind} name {name!r} is ambiguous: {', '.join(map(str, matches))}; give its folder")
    raise ConfigError(f"{kind} file not found: {name_or_path} (nor a packaged config; those are: "
                      f"{', '.join(shipped)})")


def _config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    section = getattr(exc, "object_type", None)
    if isinstance(exc, ConfigKeyError) and dataclasses.is_dataclass(section):
        # an unknown key: say what the section allows (OmegaConf only suggests close matches)
        allowed = ", ".join(f.name for f in dataclasses.fields(section))
        parent = key.rpartition(".")[0] if key else ""
        first += f" (allowed keys{f' of {parent}' if parent else ''}: {allowed})"
    return ConfigError(f"invalid config{f' at key {key!r}' if key else ''}: {first}")


def _check_required(merged: DictConfig, sources: Sequence[str]) -> None:
    """Reject values left at OmegaConf's ``???`` (a required value) by every layer.

    OmegaConf's merge keeps the default where a YAML says ``???``, so without this check a template
    value that was never filled in would silently train with the schema's default.
    """
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        where = " or ".join(sources) or "the config"
        raise ConfigError(f"{missing[0]}: required value ('???' in {where}) was not given; set it in the YAML "
                          f"or on the command line ({missing[0]}=...)"
                          + (f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""))


def _has_space(conf: DictConfig) -> bool:
    tune = conf.get("tune")
    return isinstance(tune, DictConfig) and "search_space" in tune


def yaml_layers(path: Path, kind: str = "config", chain: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML layers of ``path``: its ``base:`` chain first (each relative to its own file), then itself."""
    if not chain:
        path = resolve_config(path, kind)
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: the base: chain comes back to this file ({' -> '.join(map(str, chain))})")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a {kind} file is a mapping (base:, config sections), got a {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return [(path, raw)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another config file, got {base!r}")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config {base!r} not found (looked at {base_path})")
    return yaml_layers(base_path, kind, chain + (resolved,)) + [(path, raw)]


def _merge_layer(merged: DictConfig, layer: DictConfig) -> DictConfig:
    if _has_space(layer) and _has_space(merged):
        del merged.tune["search_space"]  # a file's search space replaces its base's
    return OmegaConf.merge(merged, layer)  # type: ignore[return-value]


def _apply_dotlist(conf: DictConfig, items: Sequence[str]) -> DictConfig:
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key == _SPACE and _has_space(conf):
            del conf.tune["search_space"]  # the whole space given on the command line replaces the file's
        elif key.startswith(_SPACE + ".") and _has_space(conf):
            entry = key[len(_SPACE) + 1:]
            if entry in conf.tune.search_space:  # a flat 'optim.lr' entry; the override comes nested
                del conf.tune.search_space[entry]
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))  # type: ignore[assignment]
    return conf


def _check_overrides(overrides: Overrides, fixed: Mapping[str, str]) -> list[tuple[str, Any]]:
    """Overrides as (key, item) pairs: ``key=value`` strings checked for form, mappings taken as they are."""
    if isinstance(overrides, Mapping):
        pairs = [(str(k), (k, v)) for k, v in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            pairs.append((item.split("=", 1)[0].strip(), item))
    for key, item in pairs:
        for section, why in fixed.items():
            if key == section or key.startswith(section + "."):
                shown = item if isinstance(item, str) else f"{key}={item[1]!r}"
                raise ConfigError(f"override {shown!r}: {why}; {section}.* cannot be changed")
    return pairs


def _overridden(conf: DictConfig, overrides: Overrides, fixed: Mapping[str, str]) -> DictConfig:
    pairs = _check_overrides(overrides, fixed)
    if isinstance(overrides, Mapping):
        for key, (_, value) in pairs:
            OmegaConf.update(conf, key, value, merge=False)
        return conf
    return _apply_dotlist(conf, [item for _, item in pairs])


def _build(conf: DictConfig, sources: Sequence[str]) -> ExperimentConfig:
    """An untyped merged config -> a typed, checked :class:`ExperimentConfig`."""
    _check_required(conf, sources)
    try:
        cfg: ExperimentConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), conf))
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    cfg.check()
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                kind: str = "config") -> ExperimentConfig:
    """Defaults <- YAML (after its ``base:`` chain) <- dotlist overrides, checked.  ``path`` is a file or
    a packaged config's name (:func:`resolve_config`); ``kind`` names the file in messages ("config", "search").  Raises :class:`ConfigError` naming the key or the file."""
    conf: DictConfig = OmegaConf.create({})
    sources: list[str] = []
    try:
        if path is not None:
            for source, layer in yaml_layers(Path(path), kind):
                conf = _merge_layer(conf, layer)
                sources.append(str(source))
        conf = _overridden(conf, overrides, {})
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    return _build(conf, sources)


def apply_overrides(cfg: ExperimentConfig | Mapping[str, Any], overrides: Overrides, *,
                    fixed: Optional[Mapping[str, str]] = None) -> ExperimentConfig:
    """``cfg`` (a config or its plain dict) with ``overrides`` (``key=value`` strings or ``{key: value}``),
    checked.  ``fixed`` maps sections that may not change to the reason, e.g.
    ``{"model": "the model is fixed by the checkpoint"}``."""
    plain = to_dict(cfg) if isinstance(cfg, ExperimentConfig) else dict(cfg)
    try:
        conf = _overridden(OmegaConf.create(plain), overrides, fixed or {})
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    return _build(conf, [])


def from_dict(d: Mapping[str, Any]) -> ExperimentConfig:
    """A checked config from a plain (possibly partial) nested dict, e.g. a saved run config."""
    try:
        conf = OmegaConf.create(dict(d))
        for key in RETIRED_KEYS:
            section, _, name = key.rpartition(".")
            node = OmegaConf.select(conf, section)
            if isinstance(node, DictConfig) and name in node:
                del node[name]
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    return _build(conf, [])


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
