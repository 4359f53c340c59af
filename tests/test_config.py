"""Config loading: paper defaults, extends chains, overrides, error messages, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ezengine.config import (
    SECTIONS,
    Config,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe_fields,
    field_help,
    load_config,
    save_config,
    validate_config,
)
from ezengine.model import conv_body, model_kind

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------


def test_defaults_are_the_papers_atari_settings() -> None:
    c = Config()
    assert (c.env.id, c.env.kind, c.env.num_envs) == ("ALE/MsPacman-v5", "atari", 8)
    assert (c.env.frame_stack, c.env.frame_skip, c.env.noop_max, c.env.frame_size) == (
        4, 4, 30, 96)
    assert c.env.episodic_life and c.env.clip_rewards
    assert (c.env.max_episode_steps, c.env.eval_max_episode_steps) == (3000, 27000)

    assert (c.model.kind, c.model.channels, c.model.reduced_channels) == ("auto", 64, 16)
    assert (c.model.latent_dim, c.model.hidden_dim, c.model.lstm_hidden) == (64, 128, 512)
    assert c.model.head_hidden == (32,) and c.model.support_size == 300
    assert (c.model.projection_hidden, c.model.projection_dim,
            c.model.projection_head_hidden) == (1024, 1024, 512)

    assert c.search.num_simulations == 50
    assert (c.search.c_init, c.search.c_base) == (1.25, 19652.0)
    assert (c.search.dirichlet_alpha, c.search.exploration_fraction) == (0.3, 0.25)
    assert c.search.value_delta_floor == 0.01

    assert c.replay.capacity == 0  # keep every position
    assert (c.replay.alpha, c.replay.beta_start, c.replay.beta_end) == (0.6, 0.4, 1.0)
    assert c.replay.priority_eps == 1e-6

    lr = c.learner
    assert (lr.batch_size, lr.unroll_steps, lr.td_steps, lr.value_prefix_horizon) == (
        256, 5, 5, 5)
    assert lr.discount == pytest.approx(0.997**4, abs=1e-9)
    assert (lr.lr, lr.lr_warmup_steps, lr.lr_decay_steps, lr.lr_decay_factor) == (
        0.2, 1000, (101000,), 0.1)
    assert (lr.momentum, lr.weight_decay, lr.grad_clip) == (0.9, 1e-4, 5.0)
    assert (lr.value_prefix_loss_weight, lr.value_loss_weight, lr.policy_loss_weight,
            lr.consistency_loss_weight) == (1.0, 0.25, 1.0, 2.0)
    assert lr.target_update_interval == 200
    assert (lr.reanalyse_fraction, lr.off_policy_fraction) == (0.99, 0.3)
    assert lr.augmentation and lr.mixed_precision and not lr.bootstrap_from_root_value

    r = c.run
    assert (r.env_steps, r.extra_training_steps, r.replay_ratio) == (100_000, 20_000, 1.0)
    assert (r.start_transitions, r.selfplay_update_interval) == (2000, 100)
    assert r.visit_temperatures == (1.0, 0.5, 0.25)
    assert r.temperature_milestones == (0.5, 0.75)
    assert (r.eval_interval, r.eval_episodes, r.checkpoint_interval) == (10_000, 32, 1000)
    assert (r.seed, r.device, r.log_interval_s) == (0, "auto", 10.0)


def test_a_config_cannot_change_after_validation() -> None:
    cfg = load_config(REPO / "configs" / "cartpole.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learner.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = RunConfig()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.run.visit_temperatures.append(0.1)  # type: ignore[attr-defined]
    # A changed copy is a new object; the original stays as it was.
    other = cfg.replace(learner={"lr": 1.0})
    assert other.learner.lr == 1.0 and cfg.learner.lr == 0.003
    assert other.run is cfg.run


def test_every_field_has_help() -> None:
    for section, cls in SECTIONS.items():
        helps = field_help(section)
        assert list(helps) == [f.name for f in dataclasses.fields(cls)]
        assert all(h.strip() for h in helps.values())
    everything = field_help()
    assert everything["learner.lr"] == field_help("learner")["lr"]
    info = {i.key: i for i in describe_fields("run")}
    assert info["run.visit_temperatures"].type_name == "list of float"
    assert info["run.seed"].default == 0
    with pytest.raises(ConfigError, match="unknown section 'nope'"):
        field_help("nope")


def test_repo_configs_load() -> None:
    base = load_config(REPO / "configs" / "atari100k.yaml")
    assert base == Config().replace(model={"kind": "conv"})  # the file pins the kind
    pac = load_config(REPO / "configs" / "ms_pacman.yaml")
    assert pac.env.id == "ALE/MsPacman-v5" and pac.env.kind == "atari"
    assert model_kind(pac.model.kind, (3, 96, 96)) == "conv"
    assert conv_body(pac.model.conv_body, (3, 96, 96)) == "atari"


# --- extends and overrides ----------------------------------------------------------------


def test_extends_chain_merges_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", "learner:\n  lr: 0.1\n  batch_size: 64\nrun:\n  seed: 3\n")
    # Paths are relative to the file that holds the "extends".
    _write(tmp_path / "sub" / "mid.yaml",
           "extends: ../base.yaml\nlearner:\n  batch_size: 32\nsearch:\n  num_simulations: 8\n")
    top = _write(tmp_path / "sub" / "top.yaml",
                 "extends: mid.yaml\nrun:\n  env_steps: 500\nlearner:\n  td_steps: 3\n")
    c = load_config(top)
    assert c.learner.lr == 0.1  # from base, untouched by mid and top
    assert c.learner.batch_size == 32  # mid over base
    assert c.learner.td_steps == 3  # top
    assert c.search.num_simulations == 8
    assert (c.run.seed, c.run.env_steps) == (3, 500)  # sections merge, not replace
    assert c.learner.momentum == 0.9  # default


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    msg = _error(a)
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_extends_missing_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "extends: nowhere.yaml\n")
    msg = _error(a)
    assert str(a) in msg and "nowhere.yaml" in msg and "not found" in msg


def test_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "learner:\n  lr: 0.05\n")
    c = load_config(path, [
        "learner.lr=0.1",
        "run.visit_temperatures=[1.0,0.5]",
        "run.temperature_milestones=[0.6]",
        "learner.augmentation=false",
        "env.id=ALE/Pong-v5",
        "learner.weight_decay=1e-5",  # YAML 1.1 would read this as a string
        "search.c_base=20000",  # an int is accepted for a float
    ])
    assert c.learner.lr == 0.1
    assert c.run.visit_temperatures == (1.0, 0.5) and c.run.temperature_milestones == (0.6,)
    assert c.learner.augmentation is False
    assert c.env.id == "ALE/Pong-v5"
    assert c.learner.weight_decay == 1e-5
    assert c.search.c_base == 20000.0 and isinstance(c.search.c_base, float)


def test_exponent_floats_in_files(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "replay:\n  priority_eps: 1e-8\nlearner:\n  lr: 2E-1\n")
    c = load_config(path)
    assert c.replay.priority_eps == 1e-8 and c.learner.lr == 0.2


def test_gym_config(tmp_path: Path) -> None:
    path = _write(tmp_path / "cp.yaml",
                  "env:\n  kind: gym\n  id: CartPole-v1\n  frame_stack: 1\nmodel:\n  kind: mlp\n")
    c = load_config(path)
    assert (c.env.kind, c.model.kind, c.env.frame_stack) == ("gym", "mlp", 1)


# --- errors name the file, the key, the value and what was expected -----------------------


@pytest.mark.parametrize(
    ("yaml_text", "key", "shown", "expected"),
    [
        ("learner:\n  batch_size: true\n", "learner.batch_size", "True", "int > 0"),
        ("learner:\n  batch_size: 0\n", "learner.batch_size", "0", "int > 0"),
        ("learner:\n  batch_size: 12.0\n", "learner.batch_size", "12.0", "int > 0"),
        ("learner:\n  lr: fast\n", "learner.lr", "'fast'", "float > 0"),
        ("learner:\n  lr: .nan\n", "learner.lr", "nan", "finite"),
        ("learner:\n  discount: 0\n", "learner.discount", "0", "(0, 1]"),
        ("learner:\n  discount: 1.5\n", "learner.discount", "1.5", "(0, 1]"),
        ("learner:\n  reanalyse_fraction: 1.2\n", "learner.reanalyse_fraction", "1.2",
         "[0, 1]"),
        ("learner:\n  augmentation: 1\n", "learner.augmentation", "1", "bool"),
        ("search:\n  num_simulations: -5\n", "search.num_simulations", "-5", "int > 0"),
        ("replay:\n  capacity: -1\n", "replay.capacity", "-1", "int >= 0"),
        ("search:\n  exploration_fraction: -0.1\n", "search.exploration_fraction", "-0.1",
         "[0, 1]"),
        ("env:\n  kind: mujoco\n", "env.kind", "'mujoco'", "'atari', 'gym'"),
        ("env:\n  id: 5\n", "env.id", "5", "str"),
        ("model:\n  kind: transformer\n", "model.kind", "'transformer'", "'auto', 'conv', 'mlp'"),
        ("model:\n  head_hidden: [32, x]\n", "model.head_hidden", "[32, 'x']",
         "list of int"),
        ("model:\n  head_hidden: 32\n", "model.head_hidden", "32", "list of int"),
        ("run:\n  device: tpu\n", "run.device", "'tpu'", "'auto', 'cpu', 'cuda'"),
        ("run:\n  visit_temperatures: [1.0, 0.5]\n", "run.visit_temperatures", "[1.0, 0.5]",
         "3 temperatures"),
        ("run:\n  temperature_milestones: [0.75, 0.5]\n", "run.temperature_milestones",
         "[0.75, 0.5]", "ascending"),
        ("run:\n  temperature_milestones: [0.5, 1.5]\n", "run.temperature_milestones",
         "[0.5, 1.5]", "[0, 1]"),
        ("learner:\n  lr_decay_steps: [200, 100]\n", "learner.lr_decay_steps", "[200, 100]",
         "ascending"),
        ("model:\n  kind: mlp\n", "model.kind", "'mlp'", "'conv' or 'auto' for env.kind 'atari'"),
    ],
)
def test_bad_values_name_file_key_value_and_expectation(
        tmp_path: Path, yaml_text: str, key: str, shown: str, expected: str) -> None:
    path = _write(tmp_path / "bad.yaml", yaml_text)
    msg = _error(path)
    assert str(path) in msg
    assert f"'{key}'" in msg
    assert shown in msg
    assert expected in msg


def test_unknown_section_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "typo.yaml", "lerner:\n  lr: 0.1\n")
    msg = _error(path)
    assert str(path) in msg and "unknown section 'lerner'" in msg and "'learner'" in msg
    path = _write(tmp_path / "typo2.yaml", "learner:\n  lrr: 0.1\n")
    msg = _error(path)
    assert str(path) in msg and "unknown key 'learner.lrr'" in msg and "'lr'" in msg


def test_error_in_parent_names_the_parent(tmp_path: Path) -> None:
    parent = _write(tmp_path / "parent.yaml", "replay:\n  alpha: -1\n")
    child = _write(tmp_path / "child.yaml", "extends: parent.yaml\n")
    msg = _error(child)
    assert str(parent) in msg and "'replay.alpha'" in msg


def test_structural_errors(tmp_path: Path) -> None:
    assert "mapping" in _error(_write(tmp_path / "a.yaml", "- 1\n- 2\n"))
    assert "'learner' must be a mapping" in _error(_write(tmp_path / "b.yaml", "learner: 3\n"))
    assert "invalid YAML" in _error(_write(tmp_path / "c.yaml", "learner: [1,\n"))
    assert "'extends'" in _error(_write(tmp_path / "d.yaml", "extends: [a.yaml]\n"))
    assert "not found" in _error(tmp_path / "missing.yaml")


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.yaml", "")
    msg = _error(path, ("learner.lr=-1",))
    assert "override 'learner.lr=-1'" in msg and "'learner.lr'" in msg and "-1" in msg
    assert str(path) not in msg
    msg = _error(path, ("learner.lrr=1",))
    assert "override 'learner.lrr=1'" in msg and "unknown key 'learner.lrr'" in msg
    msg = _error(path, ("learner.lr",))
    assert "override 'learner.lr'" in msg and "section.key=value" in msg
    msg = _error(path, ("lr=0.1",))
    assert "section.key=value" in msg
    # A cross-field error caused by an override blames the override.
    msg = _error(path, ("run.visit_temperatures=[1.0]",))
    assert "override 'run.visit_temperatures=[1.0]'" in msg and "3 temperatures" in msg


def test_config_from_dict_names_its_source() -> None:
    c = config_from_dict({"learner": {"lr": 0.3}}, "runs/x/config.yaml")
    assert c.learner.lr == 0.3 and c.learner.batch_size == 256
    with pytest.raises(ConfigError, match=r"runs/x/config.yaml: unknown key 'learner.foo'"):
        config_from_dict({"learner": {"foo": 1}}, "runs/x/config.yaml")


def test_validate_config_checks_code_built_configs() -> None:
    cfg = Config().replace(learner={"batch_size": -1})
    with pytest.raises(ConfigError, match=r"in code: bad value for 'learner.batch_size'"):
        validate_config(cfg, "in code")


# --- save / load --------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "learner:\n  lr: 0.05\n  weight_decay: 3e-5\n")
    cfg = load_config(path, ["run.visit_temperatures=[2.0,1.0,0.5]", "run.seed=7"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert config_from_dict(config_to_dict(cfg), "dict") == cfg
    # Atomic write: only the target is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "resolved.yaml"]
    # Overwriting works too.
    cfg = cfg.replace(learner={"lr": 0.01})
    save_config(cfg, out)
    assert load_config(out).learner.lr == 0.01


def test_config_command_shows_every_field_with_its_origin_and_loads_back(tmp_path: Path
                                                                         ) -> None:
    from click.testing import CliRunner

    from ezengine.cli import main

    base = _write(tmp_path / "base.yaml", "learner:\n  lr: 0.05\n  batch_size: 64\n")
    child = _write(tmp_path / "child.yaml", "extends: base.yaml\nlearner:\n  batch_size: 32\n")
    result = CliRunner().invoke(main, ["config", str(child), "--set", "run.seed=7"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"  lr: 0.05{' ' * 32} # extends {base}; default 0.2" in lines
    assert f"  batch_size: 32{' ' * 26} # file {child}; default 256" in lines
    assert f"  seed: 7{' ' * 33} # --set run.seed=7; default 0" in lines
    assert f"  alpha: 0.6{' ' * 30} # default" in lines
    assert "  # peak learning rate" in lines  # each field's help above it
    shown = sum(line.startswith("  ") and not line.startswith("  #") for line in lines)
    assert shown == len(describe_fields())
    # The output is a config that loads back as the same one.
    again = _write(tmp_path / "shown.yaml", result.output)
    assert load_config(again) == load_config(child, ["run.seed=7"])
