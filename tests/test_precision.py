"""``--precision bf16`` and the ``--compile`` setting: ``Program.accelerate``, Pyro's numbers kept in float32."""

from __future__ import annotations

import copy
import json
import shutil

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from conftest import pyro_program as _program_file, run_cli
from ppl_genmodels import cli, fit, load_run
from ppl_genmodels.config import COMPILE_MIN_STEPS, compiles
from ppl_genmodels.inference.importance import batched_estimates
from ppl_genmodels.models.vae import VAE
from ppl_genmodels.programs import Program, _Network
from ppl_genmodels.runs import load_checkpoint, save_checkpoint
from ppl_genmodels.traces import log_weights


def _vae(guide: str = "diag", likelihood: str = "bernoulli", seed: int = 0) -> tuple[Program, torch.Tensor]:
    torch.manual_seed(seed)
    program = Program(VAE(64, 4, hidden=(32,), guide=guide, likelihood=likelihood))
    x = torch.rand(6, 64).round()
    program.check(x)
    return program, x


def _log_w(program: Program, x: torch.Tensor, y=None, k: int = 3, seed: int = 1) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return log_weights(program.model, program.guide, x, y, num_particles=k)  # [k, batch]


def _wrapped(program: Program) -> list[str]:
    """The modules of the program whose forward is accelerated now."""
    return [name for name, m in program.module.named_modules() if isinstance(m.__dict__.get("forward"), _Network)]


# --------------------------------------------------------------------------- #
# bf16: the networks run in bfloat16, everything Pyro computes stays float32
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("guide,likelihood", [("diag", "bernoulli"), ("fullrank", "gaussian"), ("iaf:2", "gaussian")])
def test_bf16_runs_the_networks_in_bf16_and_returns_float32(guide, likelihood):
    program, x = _vae(guide, likelihood)
    reference = _log_w(program, x)
    seen = []
    program.module.decoder[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    assert program.accelerate(precision="bf16") is program
    log_w = _log_w(program, x)
    assert log_w.dtype == torch.float32
    assert torch.bfloat16 in seen  # inside the network, activations are bf16
    assert not torch.equal(log_w, reference)
    assert torch.allclose(log_w, reference, rtol=0.02, atol=3.0)
    assert {"encoder", "decoder"} <= set(_wrapped(program))
    if guide == "iaf:2":  # the guide family returns a distribution: its flows' networks are accelerated instead
        assert {"q.flows.0.nn", "q.flows.1.nn"} <= set(_wrapped(program)) and "q" not in _wrapped(program)


def test_a_module_that_returns_a_distribution_or_samples_is_not_run_in_bf16():
    class Head(nn.Module):  # returns a distribution built from its own layer
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return dist.Normal(self.linear(x), 1.0).to_event(1)

    class Sampler(nn.Module):  # makes a sample statement
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, z):
            return pyro.sample("u", dist.Normal(self.linear(z), 1.0).to_event(1))

    class Program_(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.sampler = Head(), Sampler()

        def model(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
                u = self.sampler(self.head(z).mean)
                pyro.sample("x", dist.Normal(u, 1.0).to_event(1), obs=x)

        def guide(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
                pyro.sample("u", dist.Normal(x, 1.0).to_event(1))

    torch.manual_seed(0)
    program = Program(Program_())
    x = torch.randn(4, 2)
    program.check(x)
    program.accelerate(precision="bf16")
    _log_w(program, x)  # the first calls find what each module is
    assert sorted(_wrapped(program)) == ["head.linear", "sampler.linear"]
    trace = pyro.poutine.trace(program.model).get_trace(x)
    assert trace.nodes["u"]["fn"].mean.dtype == torch.float32
    assert _log_w(program, x).dtype == torch.float32


def test_fp32_again_gives_exactly_the_fp32_numbers():
    program, x = _vae()
    reference = _log_w(program, x)
    program.accelerate(precision="bf16")
    assert not torch.equal(_log_w(program, x), reference)
    program.accelerate(precision="fp32")
    assert _wrapped(program) == [] and program.acceleration == {"precision": "fp32", "compile": False}
    assert torch.equal(_log_w(program, x), reference)
    program.accelerate(precision="bf16").accelerate(precision="bf16")  # calls replace each other
    assert sorted(_wrapped(program)) == ["decoder", "encoder"]
    program.accelerate()
    assert torch.equal(_log_w(program, x), reference)


def test_pyro_programs_in_bf16():
    torch.manual_seed(0)
    program = Program(_program_file("tutorial_vae").VAE(z_dim=4, hidden_dim=32))
    x = torch.rand(5, 784).round()
    program.check(x)
    reference = _log_w(program, x)
    program.accelerate(precision="bf16")
    log_w = _log_w(program, x)
    assert log_w.dtype == torch.float32 and not torch.equal(log_w, reference)
    assert torch.allclose(log_w, reference, rtol=0.02, atol=3.0)
    torch.manual_seed(0)
    structured = _program_file("structured_cvae")  # the data is its second argument
    cvae = Program(structured.CVAE(3, 16, 16, structured.Baseline(10, 20, 8)), data_arg="ys")
    x, y = torch.rand(4, 20).round(), torch.rand(4, 10)
    cvae.check(x, y)
    reference = _log_w(cvae, x, y)
    cvae.accelerate(precision="bf16")
    log_w = _log_w(cvae, x, y)
    assert log_w.dtype == torch.float32 and torch.allclose(log_w, reference, rtol=0.02, atol=1.0)
    assert sorted(_wrapped(cvae)) == ["baseline_net", "generation_net", "prior_net", "recognition_net"]
    store = Program(_program_file("param_store_model").LinearGaussian(3, 1))  # pyro.param only: no networks
    data = torch.randn(4, 3)
    store.check(data)
    with pytest.warns(UserWarning, match="has no networks"):
        store.accelerate(precision="bf16")
    assert torch.equal(_log_w(store, data), _log_w(store.accelerate(), data))


def test_an_unknown_precision_is_refused():
    program, _ = _vae()
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        program.accelerate(precision="fp8")


# --------------------------------------------------------------------------- #
# the estimators agree with float32 within their standard errors
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "run"
    fit("vae", "digits", out, epochs=3, max_examples=400, hidden=[64], z_dim=4, batch_size=50, eval_k=5,
        device="cpu", precision="bf16", progress=False, evaluate=False, plots=False)
    return out


def _estimates(program: Program, x: torch.Tensor, k: int = 20):
    pyro.set_rng_seed(3)
    with torch.no_grad():
        return batched_estimates(program.model, program.guide, x, k=k)  # (elbo, iwae-k), each [batch]


def test_estimates_in_bf16_agree_with_fp32_within_their_standard_errors(bf16_run):
    run = load_run(bf16_run)
    x = run.data.split("test").x
    assert run.program.acceleration["precision"] == "bf16"
    bf16 = _estimates(run.program, x)
    fp32 = _estimates(run.program.accelerate(precision="fp32"), x)
    for low, full in zip(bf16, fp32):
        assert low.value.dtype == torch.float32 and low.estimator == full.estimator
        difference = low.value - full.value  # [batch]
        assert difference.abs().max() > 0  # bf16 did something
        combined_se = torch.sqrt((low.stderr**2 + full.stderr**2).sum()) / x.shape[0]  # of the mean difference
        assert difference.mean().abs() < 4 * combined_se, (low.estimator, difference.mean(), combined_se)
    again = _estimates(run.program.accelerate(precision="fp32"), x)
    assert all(torch.equal(a.value, b.value) for a, b in zip(again, fp32))


def test_fit_records_the_precision_and_load_run_applies_it(bf16_run, tmp_path):
    config = json.loads((bf16_run / "config.json").read_text())
    assert config["precision"] == "bf16" and config["compile"] == "auto"  # auto: not on the CPU
    run = load_run(bf16_run)
    assert run.config.precision == "bf16"
    assert run.program.acceleration == {"precision": "bf16", "compile": False}
    assert sorted(_wrapped(run.program)) == ["decoder", "encoder"]
    older = tmp_path / "older"  # a run written before the two options existed loads in float32
    shutil.copytree(bf16_run, older)
    for name in ("precision", "compile"):
        del config[name]
    (older / "config.json").write_text(json.dumps(config))
    run = load_run(older)
    assert run.config.precision == "fp32" and run.program.acceleration["precision"] == "fp32"
    assert _wrapped(run.program) == []


def test_a_bad_precision_is_a_cli_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--precision", "fp8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and "--precision" in last and "fp8" in last


def test_the_fit_options_offer_precision_and_compile():
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    parser = cli.build_parser()
    args = parser.parse_args(["fit", "--precision", "bf16", "--compile", "on"])
    assert args.precision == "bf16" and args.compile == "on"
    assert parser.parse_args(["fit", "--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "--compile", "maybe"])


@pytest.mark.parametrize("setting, device, steps, expected", [
    ("on", "cpu", 1, True), ("off", "cuda", 10**6, False),
    ("auto", "cpu", COMPILE_MIN_STEPS, True), ("auto", "cpu", COMPILE_MIN_STEPS - 1, False),
    ("auto", "cuda", COMPILE_MIN_STEPS, True), ("auto", "cuda", 10, False),  # compiling pays on long runs only
    (True, "cpu", 1, True), (False, "cuda", 10**6, False),  # configurations from when --compile was a switch
])
def test_compile_auto_compiles_only_long_runs(setting, device, steps, expected):
    assert compiles(setting, torch.device(device), steps) is expected


def test_a_configuration_from_when_compile_was_a_switch_loads(bf16_run, tmp_path):
    older = tmp_path / "switch"
    shutil.copytree(bf16_run, older)
    config = json.loads((older / "config.json").read_text())
    config["compile"] = False
    (older / "config.json").write_text(json.dumps(config))
    run = load_run(older)
    assert run.config.compile == "off" and run.program.acceleration["compile"] is False


# --------------------------------------------------------------------------- #
# the state and checkpoints of an accelerated program (compile: tests/test_compiled.py)
# --------------------------------------------------------------------------- #


def test_accelerated_state_and_checkpoints_are_unchanged(tmp_path):
    program, x = _vae()
    keys, parameters = list(program.state()["model"]), list(program.parameters())
    reference = _log_w(program, x)
    program.accelerate(precision="bf16", compile=True)
    accelerated = _log_w(program, x)
    assert list(program.state()["model"]) == keys and not any("_orig_mod" in k for k in keys)
    assert len(list(program.parameters())) == len(parameters)
    assert all(a is b for a, b in zip(program.parameters(), parameters))
    save_checkpoint(tmp_path / "checkpoint.pt", {**program.state(), "epoch": 1})
    fresh, _ = _vae(seed=1)
    fresh.load_state(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert torch.equal(_log_w(fresh, x), reference)
    copied = copy.deepcopy(program)  # a copy runs its own networks, accelerated as the original
    assert torch.equal(_log_w(copied, x), accelerated)
    with torch.no_grad():
        copied.module.decoder[-1].bias.add_(1.0)
    assert not torch.equal(_log_w(copied, x), accelerated)
    assert torch.equal(_log_w(program, x), accelerated)
