"""What defines a run (ppl_genmodels.config): options declared once, the fit command line generated from them,
config.json flat and round-tripping, and the model built from the options."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from ppl_genmodels import cli
from ppl_genmodels.config import OPTIMIZERS, ConfigError, RunConfig, build_model, option, resolve_model_class
from ppl_genmodels.data import BINARIZE_MODES, CONDITIONS, LIKELIHOODS, DataOptions
from ppl_genmodels.inference.objectives import OBJECTIVES
from ppl_genmodels.models import CVAE, VAE


def _fit_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["fit"]


def _fit_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in _fit_parser()._actions}


def test_every_option_has_one_fit_flag_with_help():
    actions = _fit_actions()
    api_only = {"model_instance", "model_sha256", "processes", "global_batch_size"}  # recorded by fit
    for name in set(RunConfig.names()) - api_only:
        assert name in actions, name
        action = actions[name]
        assert action.help and action.default is argparse.SUPPRESS, name
        flag = "--model-arg" if name == "model_args" else "--" + name.replace("_", "-")
        switch = [flag, "--no-" + flag[2:]] if name == "standardize" else [flag]
        assert action.option_strings == switch
    assert not api_only & set(actions)
    assert set(actions) - set(RunConfig.names()) == {"help", "out", "resume", "no_plots", "quiet", "trust_model_file",
                                                        "launch_processes"}


def test_choices_come_from_the_registries():
    actions = _fit_actions()
    assert tuple(actions["elbo"].choices) == tuple(OBJECTIVES)
    assert tuple(actions["optimizer"].choices) == tuple(OPTIMIZERS)
    assert tuple(actions["likelihood"].choices) == LIKELIHOODS
    assert tuple(actions["binarize"].choices) == BINARIZE_MODES
    assert tuple(actions["condition"].choices) == CONDITIONS


def test_only_the_options_given_reach_fit():
    args = _fit_parser().parse_args(["--z-dim", "3", "--val-fraction", "0.25", "--lr", "0.01"])
    given = {name: getattr(args, name) for name in RunConfig.names() if hasattr(args, name)}
    assert given == {"z_dim": 3, "val_fraction": 0.25, "lr": 0.01}
    config = RunConfig.from_dict(given)
    assert (config.z_dim, config.data_options.val_fraction, config.lr, config.epochs) == (3, 0.25, 0.01, 50)


def test_only_epochs_patience_device_and_how_the_networks_run_are_resumable():
    # precision and compile change how the networks run, not what they compute; processes and
    # global_batch_size record who resumed the run
    assert RunConfig.resumable() == {"epochs", "patience", "device", "precision", "compile", "processes",
                                     "global_batch_size"}


def test_a_new_option_needs_only_its_declaration():
    @dataclasses.dataclass
    class Extended:
        warmup_epochs: int = option(0, "epochs of KL warm-up")
        schedule: str = option("linear", "warm-up shape", choices=("linear", "cosine"))
        widths: list[int] | None = option(None, "layer widths", parse=lambda text: [int(v) for v in text.split(",")])

    parser = argparse.ArgumentParser()
    cli._add_field_options(parser, Extended)
    args = parser.parse_args(["--warmup-epochs", "5", "--schedule", "cosine", "--widths", "8,4"])
    assert (args.warmup_epochs, args.schedule, args.widths) == (5, "cosine", [8, 4])
    assert "(default linear)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "exponential"])


def test_config_json_is_flat_and_round_trips():
    config = RunConfig(model="ppca", data="moons", z_dim=1, hidden=[8], model_args={"a": 1},
                       data_options=DataOptions(noise=0.1, max_examples=50))
    flat = config.to_dict()
    assert list(flat) == RunConfig.names()
    assert flat["noise"] == 0.1 and flat["max_examples"] == 50 and "data_options" not in flat
    again = RunConfig.from_dict(json.loads(json.dumps(flat)))
    assert again == config
    flat["hidden"].append(4)  # to_dict copies: the config is not changed through it
    assert config.hidden == [8]
    with pytest.raises(ConfigError, match="unknown option.*warmup"):
        RunConfig.from_dict({**flat, "warmup": 3})


def test_build_model_passes_accepted_arguments():
    config = RunConfig(model="vae", hidden=[8, 4], z_dim=3, model_args={"likelihood": "gaussian"})

    class Data:  # the attributes build_model reads
        x_dim, y_dim, likelihood, n_levels, condition = 5, 0, "bernoulli", None, None

    model = build_model(config, Data()).module
    assert isinstance(model, VAE)
    assert (model.x_dim, model.z_dim) == (5, 3)
    assert [layer.out_features for layer in model.encoder if isinstance(layer, torch.nn.Linear)] == [8, 4, 6]
    assert model.head.likelihood == "gaussian"  # model_args override the offered value


def test_resolve_model_class():
    assert resolve_model_class("vae") is VAE
    assert resolve_model_class(CVAE) is CVAE
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model_class("models/vae.py")  # a path without :ClassName is no model spec

    class Incomplete:
        def model(self, x, y=None):
            pass

    with pytest.raises(ConfigError, match="no guide"):
        resolve_model_class(Incomplete)
