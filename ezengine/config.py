"""Typed run configuration loaded from YAML.

A config is six sections (``env``, ``model``, ``search``, ``replay``, ``learner``, ``run``),
each a frozen dataclass whose defaults are EfficientZero's Atari 100k settings;
a changed copy comes from :meth:`Config.replace`.
YAML files may ``extends:`` another file; ``section.key=value`` overrides apply last.
Every value is checked for its key, type and range, and a bad one raises
:class:`ConfigError` naming the file (or override), the dotted key, the value and what was
expected.

(About 600 lines in one module on purpose: most of it is the field declarations with their
help and checks, and the loader beside them reads those same declarations.)
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ezengine.atomic import atomic_write

__all__ = [
    "SECTIONS",
    "Config",
    "ConfigError",
    "EnvConfig",
    "FieldInfo",
    "LearnerConfig",
    "ModelConfig",
    "ReplayConfig",
    "RunConfig",
    "SearchConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "explain_config",
    "field_help",
    "load_config",
    "parse_override",
    "resolve_config",
    "save_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A config file, override or dict holds an unknown key or a bad value."""


# ---------------------------------------------------------------------------------------
# Field helpers. A check is (predicate, description); the description completes
# "expected <type> <description>" in error messages and is applied per element for lists.

_Check = tuple[Callable[[Any], bool], str]

_POSITIVE: _Check = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: _Check = (lambda v: v >= 0, ">= 0")
_UNIT: _Check = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_OPEN_UNIT: _Check = (lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def _choices(*options: str) -> _Check:
    return (lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


def _meta(help: str, check: _Check | None = None) -> dict[str, Any]:
    """Field metadata: the help text and an optional value check."""
    return {"help": help, "check": check}


def _f(default: Any, help: str, check: _Check | None = None) -> Any:
    """A dataclass field with an immutable default, its help text and optional check."""
    return field(default=default, metadata=_meta(help, check))


# ---------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class EnvConfig:
    """Environment and preprocessing."""

    id: str = _f("ALE/MsPacman-v5", "gymnasium environment id")
    kind: str = _f(
        "atari",
        "'atari' (ALE with the paper's wrappers) or 'gym' (Discrete actions; vector or "
        "image Box observations)",
        _choices("atari", "gym"),
    )
    image_layout: str = _f("auto", "axis order of a 'gym' env's image observations: 'hwc', "
                           "'chw', or 'auto' (HWC unless the first axis is the smallest)",
                           _choices("auto", "hwc", "chw"))
    num_envs: int = _f(8, "environments stepped together by one collector", _POSITIVE)
    frame_stack: int = _f(4, "observations stacked as model input (1 for vector envs)", _POSITIVE)
    frame_skip: int = _f(4, "raw frames per agent step (Atari)", _POSITIVE)
    noop_max: int = _f(30, "at most this many random no-ops after a true reset (Atari)",
                       _NON_NEGATIVE)
    frame_size: int = _f(96, "frames are resized to frame_size x frame_size RGB (Atari)",
                         _POSITIVE)
    episodic_life: bool = _f(True, "life loss ends a training episode (never an evaluation one)")
    clip_rewards: bool = _f(True, "sign-clip rewards for training targets (eval reports raw)")
    max_episode_steps: int = _f(
        3000, "training game cap in agent steps (truncated); 0 = environment default",
        _NON_NEGATIVE)
    eval_max_episode_steps: int = _f(
        27000, "evaluation game cap in agent steps (truncated); 0 = environment default",
        _NON_NEGATIVE)


@dataclass(frozen=True)
class ModelConfig:
    """Network sizes."""

    kind: str = _f("auto", "'conv' (image observations), 'mlp' (vector observations), or "
                   "'auto' (the one the observations need)", _choices("auto", "conv", "mlp"))
    conv_body: str = _f("auto", "conv representation: 'atari' (downsamples 16x: 96x96 -> "
                        "6x6), 'small' (full resolution, for frames like MinAtar's 10x10), "
                        "or 'auto' ('small' up to 32x32)", _choices("auto", "atari", "small"))
    blocks: int = _f(2, "residual blocks of the 'small' conv representation (the 'atari' "
                     "body is fixed)", _POSITIVE)
    channels: int = _f(64, "channels of the conv hidden state", _POSITIVE)
    reduced_channels: int = _f(16, "channels after the 1x1 conv of the heads", _POSITIVE)
    latent_dim: int = _f(64, "hidden state size (mlp only)", _POSITIVE)
    hidden_dim: int = _f(128, "hidden layer width of the mlp bodies (mlp only)", _POSITIVE)
    lstm_hidden: int = _f(512, "hidden size of the value-prefix LSTM", _POSITIVE)
    head_hidden: tuple[int, ...] = field(
        default=(32,),
        metadata=_meta("hidden layer widths of the value/policy/prefix MLPs", _POSITIVE))
    support_size: int = _f(300, "value and value-prefix support is -support_size..support_size",
                           _POSITIVE)
    projection_hidden: int = _f(1024, "hidden width of the SimSiam projector", _POSITIVE)
    projection_dim: int = _f(1024, "output size of the SimSiam projector", _POSITIVE)
    projection_head_hidden: int = _f(512, "hidden width of the SimSiam prediction head",
                                     _POSITIVE)
    norm: str = _f("batch", "normalisation of the fully connected layers: 'batch' (the "
                   "paper's BatchNorm1d) or 'layer' (LayerNorm: no train/eval mismatch; "
                   "conv layers keep BatchNorm2d)", _choices("batch", "layer"))


@dataclass(frozen=True)
class SearchConfig:
    """MCTS (MuZero's pUCT rule and root Dirichlet noise)."""

    num_simulations: int = _f(50, "simulations per search", _POSITIVE)
    c_init: float = _f(1.25, "pUCT c_init", _POSITIVE)
    c_base: float = _f(19652.0, "pUCT c_base", _POSITIVE)
    dirichlet_alpha: float = _f(0.3, "root Dirichlet noise concentration", _POSITIVE)
    exploration_fraction: float = _f(0.25, "weight of the Dirichlet noise in the root prior",
                                     _UNIT)
    value_delta_floor: float = _f(0.01, "smallest max-min range used to normalise Q",
                                  _POSITIVE)


@dataclass(frozen=True)
class ReplayConfig:
    """Prioritised replay."""

    capacity: int = _f(0, "positions kept (transitions plus one final observation per "
                       "trajectory): 0 keeps every one (the paper's budget fits in memory), a "
                       "positive value only the newest that many (>= 2), overwriting the "
                       "oldest", _NON_NEGATIVE)
    alpha: float = _f(0.6, "priority exponent", _NON_NEGATIVE)
    beta_start: float = _f(0.4, "importance-weight exponent at the start of training", _UNIT)
    beta_end: float = _f(1.0, "importance-weight exponent at the end of training", _UNIT)
    priority_eps: float = _f(1e-6, "added to |value error| to form a priority", _POSITIVE)


@dataclass(frozen=True)
class LearnerConfig:
    """Optimisation, targets and losses."""

    batch_size: int = _f(256, "samples per training step", _POSITIVE)
    unroll_steps: int = _f(5, "dynamics unroll length K", _POSITIVE)
    td_steps: int = _f(5, "TD horizon for value targets (before off-policy shortening)",
                       _POSITIVE)
    discount: float = _f(0.988053892, "discount per agent step (0.997**4)", _OPEN_UNIT)
    value_prefix_horizon: int = _f(5, "value-prefix LSTM resets every this many model steps",
                                   _POSITIVE)
    optimizer: str = _f("sgd", "sgd (the paper's, with momentum and weight decay) or adam "
                        "(steadier for small MLP models)", _choices("sgd", "adam"))
    lr: float = _f(0.2, "peak learning rate", _POSITIVE)
    lr_warmup_steps: int = _f(1000, "linear learning-rate warm-up length in training steps",
                              _NON_NEGATIVE)
    lr_decay_steps: tuple[int, ...] = field(
        default=(101000,),
        metadata=_meta("training steps where lr is multiplied by lr_decay_factor (ascending)",
                       _NON_NEGATIVE))
    lr_decay_factor: float = _f(0.1, "learning-rate multiplier at each decay step", _POSITIVE)
    momentum: float = _f(0.9, "SGD momentum (sgd only)", (lambda v: 0.0 <= v < 1.0, "in [0, 1)"))
    weight_decay: float = _f(1e-4, "L2 weight decay", _NON_NEGATIVE)
    grad_clip: float = _f(5.0, "global gradient-norm clip", _POSITIVE)
    value_prefix_loss_weight: float = _f(1.0, "weight of the value-prefix loss", _NON_NEGATIVE)
    value_loss_weight: float = _f(0.25, "weight of the value loss", _NON_NEGATIVE)
    policy_loss_weight: float = _f(1.0, "weight of the policy loss", _NON_NEGATIVE)
    consistency_loss_weight: float = _f(2.0, "weight of the consistency loss", _NON_NEGATIVE)
    target_update_interval: int = _f(200, "training steps between target-model refreshes; "
                                     "each takes the weights of the previous refresh (the "
                                     "reference's lag of 1-2 intervals)", _POSITIVE)
    reanalyse_fraction: float = _f(0.99, "fraction of a batch whose policy targets are "
                                   "re-searched", _UNIT)
    off_policy_fraction: float = _f(0.3, "TD horizon shrinks by one per this fraction of the "
                                    "env-step budget of sample age", _OPEN_UNIT)
    augmentation: bool = _f(True, "random shift + intensity augmentation (image inputs only)")
    mixed_precision: bool = _f(True, "autocast + GradScaler (CUDA only)")
    bootstrap_from_root_value: bool = _f(False, "bootstrap value targets from the target "
                                         "model's MCTS root value instead of its prediction")


@dataclass(frozen=True)
class RunConfig:
    """Budget, schedules, evaluation and bookkeeping."""

    env_steps: int = _f(100_000, "environment-step budget, counted at the environment",
                        _POSITIVE)
    extra_training_steps: int = _f(20_000, "training steps after collection ends",
                                   _NON_NEGATIVE)
    replay_ratio: float = _f(1.0, "training steps per environment step", _POSITIVE)
    start_transitions: int = _f(2000, "uniformly random transitions before training starts",
                                _NON_NEGATIVE)
    selfplay_update_interval: int = _f(100, "training steps between self-play weight refreshes",
                                       _POSITIVE)
    visit_temperatures: tuple[float, ...] = field(
        default=(1.0, 0.5, 0.25),
        metadata=_meta("self-play visit-count temperatures, one per training phase", _POSITIVE))
    temperature_milestones: tuple[float, ...] = field(
        default=(0.5, 0.75),
        metadata=_meta("fractions of the env-step budget where the temperature steps down "
                       "(ascending)", _UNIT))
    greedy_env_fraction: float = _f(0.0, "fraction of each collector's environments that "
                                    "take the most visited action (evaluation's choice; "
                                    "with root noise unless run.greedy_env_noise is off), so "
                                    "the replay holds the states the "
                                    "evaluated policy reaches", _UNIT)
    greedy_env_noise: bool = _f(True, "root noise in the greedy environments' searches; "
                                "false: they act exactly as evaluation does, so a small "
                                "preference of the policy is not drowned by the noise")
    repeat_explore_prob: float = _f(0.0, "per step, the chance that a sampling environment "
                                    "(one not acting greedily) that is not repeating starts "
                                    "to repeat a uniformly random action for a zeta-distributed "
                                    "number of steps (temporally extended exploration, "
                                    "Dabney et al. 2021); 0: off", _UNIT)
    repeat_explore_mu: float = _f(2.0, "exponent of the repeat lengths' distribution, "
                                  "P(n) ~ n^-mu for n = 1 .. 10,000: smaller means longer "
                                  "repeats", (lambda v: v > 1, "> 1"))
    eval_interval: int = _f(10_000, "training steps between evaluations", _POSITIVE)
    eval_episodes: int = _f(32, "episodes per evaluation", _POSITIVE)
    stop_evaluations: int = _f(0, "end the run early at the evaluation that makes this many "
                               "in a row with a mean return of at least run.stop_return; "
                               "that evaluation's weights are the run's final ones. 0: "
                               "train the whole budget", _NON_NEGATIVE)
    stop_return: float = _f(0.0, "the mean return run.stop_evaluations evaluations in a row "
                            "must reach to end the run early")
    stop_eval_episodes: int = _f(0, "episodes of an evaluation that can end the run early "
                                 "(the run.stop_evaluations - 1 before it reached "
                                 "run.stop_return): more than run.eval_episodes, so the "
                                 "final weights are judged on more games; 0: "
                                 "run.eval_episodes", _NON_NEGATIVE)
    checkpoint_interval: int = _f(1000, "training steps between checkpoints", _POSITIVE)
    seed: int = _f(0, "random seed for everything", _NON_NEGATIVE)
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'",
                     _choices("auto", "cpu", "cuda"))
    log_interval_s: float = _f(10.0, "seconds between progress log lines", _POSITIVE)
    reanalyse_placement: str = _f(
        "auto", "where the pipeline reanalyses: 'worker' (own process, CPU copy of the target "
        "model), 'learner' (in the learner process, on the training device), or 'auto' "
        "(learner on CUDA, worker otherwise)", _choices("auto", "worker", "learner"))
    collector_inference: str = _f(
        "local", "where the pipeline's collectors search: 'local' (each collector's CPU copy "
        "of the published self-play weights) or 'learner' (the model owner runs their "
        "searches on the training device)", _choices("local", "learner"))
    collectors: int = _f(
        1, "collector processes (Ray actors with backend 'ray'), each stepping env.num_envs "
        "environments; their records enter the replay in turn", _POSITIVE)
    reanalysers: int = _f(
        1, "processes that share each batch's reanalysis searches: the replay's owner and "
        "reanalysers - 1 helpers (Ray actors anywhere in the cluster with backend 'ray'); "
        "each part of a batch always goes to the same one, so a run's result depends on "
        "this number, not on timing", _POSITIVE)
    backend: str = _f(
        "local", "how the pipeline's roles run: 'local' (processes on this machine, shared "
        "memory) or 'ray' (Ray actors on a cluster; pip install -e '.[ray]' in the "
        "ezengine checkout)",
        _choices("local", "ray"))
    ray_address: str = _f(
        "", "with backend 'ray': the cluster to join ('auto': the one `ray start` made on "
        "this machine); empty starts a local Ray instance sized to the machine")
    ray_actor_cpus: float = _f(
        0.5, "with backend 'ray': CPUs Ray reserves for each role's actor (collectors, "
        "reanalyse, learner, evaluator)", _NON_NEGATIVE)
    ray_remote_resource: str = _f(
        "", "with backend 'ray': a custom resource (`ray start --resources "
        "'{\"NAME\": N}'`) that each collector and reanalyse helper takes one unit of, so "
        "they run only on the nodes that offer it, N to a node; empty: any node")


@dataclass(frozen=True)
class Config:
    """A whole run configuration: one dataclass per section."""

    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """A copy with some fields changed, e.g. ``cfg.replace(learner={"lr": 0.1})``;
        unchecked, like ``dataclasses.replace`` (`validate_config` checks)."""
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in sections.items()})


SECTIONS: dict[str, type] = {
    "env": EnvConfig,
    "model": ModelConfig,
    "search": SearchConfig,
    "replay": ReplayConfig,
    "learner": LearnerConfig,
    "run": RunConfig,
}

# Resolved annotations per section (the module uses postponed annotations, so the
# dataclass field types are strings until resolved here).
_TYPES: dict[str, dict[str, Any]] = {s: get_type_hints(c) for s, c in SECTIONS.items()}
_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    s: {f.name: f for f in dataclasses.fields(c)} for s, c in SECTIONS.items()
}


# ---------------------------------------------------------------------------------------
# Help


@dataclass(frozen=True)
class FieldInfo:
    """Description of one config field, for CLI help."""

    key: str  # dotted, e.g. "learner.lr"
    type_name: str  # e.g. "float", "list of int"
    default: Any
    help: str


def _type_name(tp: Any) -> str:
    if get_origin(tp) is tuple:
        return f"list of {get_args(tp)[0].__name__}"
    return tp.__name__


def describe_fields(section: str | None = None) -> list[FieldInfo]:
    """Every field (of one section, or of all in order) with its type, default and help."""
    sections = [section] if section is not None else list(SECTIONS)
    out = []
    for s in sections:
        if s not in SECTIONS:
            raise ConfigError(f"unknown section {s!r}; expected one of {', '.join(SECTIONS)}")
        defaults = SECTIONS[s]()
        for name, f in _FIELDS[s].items():
            out.append(FieldInfo(f"{s}.{name}", _type_name(_TYPES[s][name]),
                                 getattr(defaults, name), f.metadata["help"]))
    return out


def field_help(section: str | None = None) -> dict[str, str]:
    """Help text per field: ``{name: help}`` for one section, ``{"section.name": help}`` for
    all sections when ``section`` is None."""
    infos = describe_fields(section)
    if section is None:
        return {i.key: i.help for i in infos}
    return {i.key.split(".", 1)[1]: i.help for i in infos}


# ---------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string. Users write such
# floats all the time (weight_decay: 1e-4), so also resolve YAML 1.2 style exponent floats.


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with short lists kept inline: ``head_hidden: [32]``."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no object tags


# ---------------------------------------------------------------------------------------
# Checking


class _Bad(Exception):
    """Internal: a value failed; carries what was expected."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _coerce_scalar(tp: type, value: Any) -> Any:
    # bool is a subclass of int in Python; a YAML "true" for an int field is a typo, not 1.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Bad("a finite float")
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise _Bad(tp.__name__)


def _coerce(section: str, name: str, value: Any) -> Any:
    """Type- and range-check one value; returns it normalised (int->float, list->tuple)."""
    tp = _TYPES[section][name]
    check: _Check | None = _FIELDS[section][name].metadata["check"]
    if get_origin(tp) is tuple:
        elem = get_args(tp)[0]
        expected = f"a list of {elem.__name__}" + (f" each {check[1]}" if check else "")
        if not isinstance(value, (list, tuple)):
            raise _Bad(expected)
        try:
            items = [_coerce_scalar(elem, v) for v in value]
        except _Bad:
            raise _Bad(expected) from None
        if check and not all(check[0](v) for v in items):
            raise _Bad(expected)
        return tuple(items)
    # "one of 'a', 'b'" already implies the type; "> 0" needs it ("int > 0").
    expected = tp.__name__ if check is None else (
        check[1] if check[1].startswith("one of") else f"{tp.__name__} {check[1]}")
    try:
        out = _coerce_scalar(tp, value)
    except _Bad as e:
        raise _Bad(e.expected if e.expected.startswith("a finite") else expected) from None
    if check and not check[0](out):
        raise _Bad(expected)
    return out


def _bad_value(source: str, key: str, value: Any, expected: str) -> ConfigError:
    value = list(value) if isinstance(value, tuple) else value  # shown as it was written
    return ConfigError(f"{source}: bad value for '{key}': {value!r}; expected {expected}")


def _unknown(source: str, what: str, name: str, options: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown {what} '{name}'{hint}; "
                       f"expected one of: {', '.join(options)}")


# Values being assembled: {section: {key: value}} plus where each (section, key) came from.
_Values = dict[str, dict[str, Any]]
_Origins = dict[tuple[str, str], str]


def _take_mapping(data: Any, source: str, values: _Values, origins: _Origins,
                  *, allow_extends: bool = False) -> None:
    """Check a {section: {key: value}} mapping and merge it into ``values`` key by key."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, "
                          f"got {type(data).__name__}")
    for section, body in data.items():
        if allow_extends and section == "extends":
            continue
        if section not in SECTIONS:
            raise _unknown(source, "section", str(section), list(SECTIONS))
        if body is None:  # "learner:" with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, "
                              f"got {body!r}")
        for name, value in body.items():
            if name not in _FIELDS[section]:
                raise _unknown(source, "key", f"{section}.{name}", list(_FIELDS[section]))
            key = f"{section}.{name}"
            try:
                values.setdefault(section, {})[name] = _coerce(section, name, value)
            except _Bad as e:
                raise _bad_value(source, key, value, e.expected) from None
            origins[(section, name)] = source


def _read_file(path: Path, values: _Values, origins: _Origins, chain: list[Path]) -> None:
    """Merge ``path`` (after the files it extends) into ``values``."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise ConfigError(f"{chain[-1]}: 'extends' cycle: {cycle}")
    if not path.is_file():
        where = f"{chain[-1]}: extends " if chain else ""
        raise ConfigError(f"{where}config file not found: {path}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if isinstance(data, Mapping) and "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str) or not parent:
            raise _bad_value(str(path), "extends", parent, "a path to another YAML file")
        # Parents are read first so the child's keys win, key by key.
        _read_file(path.parent / parent, values, origins, [*chain, path])
    _take_mapping(data, str(path), values, origins, allow_extends=True)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``"section.key=value"`` into (section, key, value), the value parsed as YAML."""
    source = f"override {text!r}"
    lhs, sep, rhs = text.partition("=")
    lhs = lhs.strip()
    section, dot, name = lhs.partition(".")
    if not sep or not dot or not section or not name or "." in name:
        raise ConfigError(f"{source}: expected 'section.key=value'")
    try:
        value = _yaml_load(rhs) if rhs.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: value is not valid YAML: {e}") from None
    return section, name, value


def _apply_overrides(overrides: Sequence[str], values: _Values, origins: _Origins) -> None:
    for text in overrides:
        section, name, value = parse_override(text)
        _take_mapping({section: {name: value}}, f"override {text!r}", values, origins)


def _build(values: _Values, origins: _Origins, source: str) -> Config:
    cfg = Config(**{s: SECTIONS[s](**values.get(s, {})) for s in SECTIONS})
    _check_cross(cfg, origins, source)
    return cfg


def _check_cross(cfg: Config, origins: _Origins, source: str) -> None:
    """Constraints that involve more than one field."""

    def where(*keys: str) -> str:
        # Blame whichever of the keys was set explicitly; fall back to the main source.
        for k in keys:
            s, n = k.split(".")
            if (s, n) in origins:
                return origins[(s, n)]
        return source

    r, learner = cfg.run, cfg.learner
    if len(r.visit_temperatures) != len(r.temperature_milestones) + 1:
        raise _bad_value(
            where("run.visit_temperatures", "run.temperature_milestones"),
            "run.visit_temperatures", r.visit_temperatures,
            f"{len(r.temperature_milestones) + 1} temperatures (one more than the "
            f"{len(r.temperature_milestones)} of run.temperature_milestones)")
    if any(b <= a for a, b in itertools.pairwise(r.temperature_milestones)):
        raise _bad_value(where("run.temperature_milestones"), "run.temperature_milestones",
                         r.temperature_milestones, "strictly ascending fractions")
    decay = learner.lr_decay_steps
    if any(b <= a for a, b in itertools.pairwise(decay)):
        raise _bad_value(where("learner.lr_decay_steps"), "learner.lr_decay_steps",
                         learner.lr_decay_steps, "strictly ascending training steps")
    if r.backend == "ray" and r.collector_inference == "learner":
        raise _bad_value(where("run.collector_inference"), "run.collector_inference",
                         r.collector_inference, "'local' with run.backend 'ray'")
    # Atari frames are images; a 'gym' env's observations are checked once it is made.
    if cfg.env.kind == "atari" and cfg.model.kind == "mlp":
        raise _bad_value(where("model.kind"), "model.kind", cfg.model.kind,
                         f"'conv' or 'auto' for env.kind 'atari' "
                         f"(env.kind from {where('env.kind')})")


# ---------------------------------------------------------------------------------------
# Public API


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``extends:`` chains), apply ``section.key=value``
    overrides, and validate. Raises :class:`ConfigError` on any problem."""
    return resolve_config(path, overrides)[0]


def resolve_config(path: str | Path, overrides: Sequence[str] = ()
                   ) -> tuple[Config, dict[str, str]]:
    """`load_config`, plus where each value came from: ``{"section.key": origin}`` with
    origin "default", "file PATH", "extends PATH" (a file the config extends) or
    "--set KEY=VALUE"."""
    values: _Values = {}
    origins: _Origins = {}
    main = Path(path).resolve()
    _read_file(Path(path), values, origins, [])
    _apply_overrides(overrides, values, origins)
    cfg = _build(values, origins, str(main))

    def origin(section: str, name: str) -> str:
        source = origins.get((section, name))
        if source is None:
            return "default"
        if source.startswith("override "):
            return "--set " + source.removeprefix("override ").strip("'")
        return ("file " if source == str(main) else "extends ") + source

    return cfg, {f"{s}.{n}": origin(s, n) for s in SECTIONS for n in _FIELDS[s]}


def config_from_dict(d: Mapping[str, Any], source: str,
                     overrides: Sequence[str] = ()) -> Config:
    """Build and validate a config from a ``{section: {key: value}}`` dict, e.g. one read
    back from a run directory. ``source`` names it in error messages. Missing keys take
    their defaults."""
    values: _Values = {}
    origins: _Origins = {}
    _take_mapping(d, source, values, origins)
    _apply_overrides(overrides, values, origins)
    return _build(values, origins, source)


def validate_config(cfg: Config, source: str = "config") -> Config:
    """Re-check a config built or modified in code (e.g. with ``dataclasses.replace``);
    returns a validated copy."""
    return config_from_dict(config_to_dict(cfg), source)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts and lists (YAML- and JSON-serialisable)."""
    return {s: {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def _yaml_scalar(value: Any) -> str:
    """One value as it would be written in a YAML file."""
    return yaml.dump(value, Dumper=_Dumper, width=1000).strip().removesuffix("...").strip()


def explain_config(cfg: Config, origins: Mapping[str, str]) -> str:
    """The config as YAML that loads back, each field with its help above it and, beside
    it, where its value came from and the default when the value differs from it."""
    lines = []
    values = config_to_dict(cfg)
    for info in describe_fields():
        section, name = info.key.split(".")
        if name == next(iter(_FIELDS[section])):
            lines.append(f"{section}:")
        value = values[section][name]
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        text = yaml.dump({name: value}, Dumper=_Dumper, width=1000).strip()
        note = origins.get(info.key, "default")
        if value != default:
            note += f"; default {_yaml_scalar(default)}"
        lines.append(f"  # {info.help}")
        lines.append(f"  {text:<40} # {note}")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temp file in the same directory, then
    ``os.replace``) so a reader never sees a half-written file."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))
