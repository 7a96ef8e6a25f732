"""The compiled hot paths (``ppl_genmodels.compiled.Static``): the same values and gradients as the
general path, a guard that captures anew or falls back, and clear warnings where a program is not static."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from conftest import pyro_program as _program_file
from ppl_genmodels.compiled import Static, Traced, static_path, traced_path, while_loop
from ppl_genmodels.inference.objectives import make_objective
from ppl_genmodels.models.vae import VAE
from ppl_genmodels.programs import Program
from ppl_genmodels.streams import Streams
from ppl_genmodels.train import Trainer

OBJECTIVES = ["trace", "stl", "iwae", "dreg", "rws", "renyi:0.5"]


def _vae(seed: int = 0, **kwargs) -> Program:
    torch.manual_seed(seed)
    return Program(VAE(64, 4, hidden=(32,), **kwargs))


def _x(n: int = 8, dim: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, dim), 0.4), generator=torch.Generator().manual_seed(seed))


def _loss_fn(program: Program, objective):
    def loss(x, y=None, *, streams=None, **_):
        with streams.draws():
            return objective.loss(program.model, program.guide, x, y)

    return loss


def _grads(program: Program, value: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, list(program.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(program.parameters(), grads)]


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5):
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * (1 + b.abs().max().item())), (a - b).abs().max()


@pytest.fixture(autouse=True)
def _no_validation():
    with pyro.validation_enabled(False):
        yield


# --------------------------------------------------------------------------- #
# the same numbers as the general path
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", OBJECTIVES)
def test_each_objective_captured_gives_the_general_paths_value_and_gradients(name):
    program = _vae()
    particles = 1 if name in ("trace", "stl") else 3
    objective = make_objective(name, particles, 1, detached=program.parameters_detached)
    fn = _loss_fn(program, objective)
    static = Static(fn, program, label=name, compile=False, min_calls=1)
    x = _x()
    for batch in range(3):  # a new batch's streams and new parameter values: the same graph
        streams = lambda: Streams(0, torch.arange(8) + 8 * batch, f"t/{batch}")  # noqa: E731
        reference = fn(x, streams=streams())
        captured = static(x, streams=streams())
        assert static.fallback is None and len(static.entries) == 1
        _assert_close(captured, reference)
        for a, b in zip(_grads(program, captured), _grads(program, reference)):
            _assert_close(a, b)
        with torch.no_grad():
            for p in program.parameters():
                p.add_(0.01 * torch.randn_like(p))


def test_the_inductor_compiled_step_trains_like_the_general_one():
    """Three Adam steps of the training step, compiled with Inductor and not: the same losses and weights."""
    x = _x(16)
    runs = {}
    for compiled in (False, True):
        program = _vae().accelerate(compile=compiled)
        trainer = Trainer(program, make_objective("trace"), torch.optim.Adam(program.parameters(), lr=1e-2))
        trainer.validate_next = False
        losses = [float(trainer.step(x, streams=Streams(0, torch.arange(16), f"e{i}"))) for i in range(3)]
        runs[compiled] = losses, [p.detach().clone() for p in program.parameters()]
        assert (trainer.compile_seconds > 0) is compiled
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        _assert_close(a, b, rtol=1e-4)
    static = Trainer(_vae().accelerate(compile=True), make_objective("trace"), None).loss_module.static
    assert static is not None and static.compile


def test_a_compiled_graph_runs_without_dynamo_and_a_second_compile_of_it_comes_from_inductors_cache(monkeypatch):
    """The graph goes to Inductor directly (TorchDynamo's guards would repeat the signature check on every call),
    with example inputs that let Inductor's caches key it: the same graph compiled again (a later process, or
    here a second program) is a cache hit, not a bypass."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    if not inductor_config.fx_graph_cache:
        pytest.skip("Inductor's FX graph cache is off in this environment")
    x = _x(16)
    hits = []
    for _ in range(2):
        counters.clear()
        program = _vae().accelerate(compile=True)
        trainer = Trainer(program, make_objective("trace"), torch.optim.Adam(program.parameters(), lr=1e-2))
        trainer.validate_next = False
        monkeypatch.setattr(torch, "compile", None)  # TorchDynamo is not used
        for i in range(3):
            trainer.step(x, streams=Streams(0, torch.arange(16), f"e{i}"))
        monkeypatch.undo()
        assert [(len(static.entries), static.fallback) for static in trainer.statics] == [(0, None), (1, None)]
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
    assert hits[1] >= 1  # the step with its Adam update: one graph


def test_a_program_from_pyros_tutorial_and_its_param_store_parameters_are_captured():
    """``pyro.module`` networks and ``pyro.param`` values (constrained too) are inputs of the graph."""
    for name, build, dim in (("tutorial_vae", lambda m: m.VAE(z_dim=3, hidden_dim=16), 784),
                             ("param_store_model", lambda m: m.LinearGaussian(5, 2), 5)):
        torch.manual_seed(0)
        program = Program(build(_program_file(name)))
        x = _x(6, dim) if dim == 784 else torch.randn(6, dim)
        program.check(x)
        fn = _loss_fn(program, make_objective("trace"))
        static = Static(fn, program, label=name, compile=False, min_calls=1)
        reference = fn(x, streams=Streams(3, torch.arange(6), "t"))
        captured = static(x, streams=Streams(3, torch.arange(6), "t"))
        assert static.fallback is None, static.fallback
        _assert_close(captured, reference)
        grads = _grads(program, captured)
        for a, b in zip(grads, _grads(program, reference)):
            _assert_close(a, b)
        assert all(g.abs().sum() > 0 for g in grads)  # every parameter, pyro.param ones included, is reached


def test_draws_from_torchs_generator_are_fresh_on_every_call():
    program = _vae()
    objective = make_objective("trace")

    def fn(x, *, streams=None, **_):
        return objective.loss(program.model, program.guide, x, None)

    static = Static(fn, program, label="global generator", compile=False, min_calls=1)
    x = _x()
    with torch.no_grad():
        values = [float(static(x)) for _ in range(3)]
    assert static.fallback is None and len(set(values)) == 3
    with torch.no_grad():
        torch.manual_seed(5)
        first = float(static(x))
        torch.manual_seed(5)
        assert float(static(x)) == first  # drawn from torch's generator, so seeded by it


# --------------------------------------------------------------------------- #
# the guard: new signatures, fallbacks, warnings
# --------------------------------------------------------------------------- #


def test_a_new_shape_or_option_is_captured_anew_and_each_graph_stays_right():
    program = _vae()
    objective = make_objective("trace")
    fn = _loss_fn(program, objective)
    static = Static(fn, program, label="shapes", compile=False, min_calls=1)
    for n, weight in ((8, 1.0), (5, 1.0), (8, 0.5), (8, 1.0)):
        objective.kl_weight = weight
        x = _x(n)
        captured = static(x, streams=Streams(0, torch.arange(n), "t"), kl_weight=weight)
        _assert_close(captured, fn(x, streams=Streams(0, torch.arange(n), "t")))
    assert len(static.entries) == 3 and static.fallback is None


def test_a_replaced_parameter_or_submodule_is_read_by_the_next_call():
    """The program's tensors are found afresh when a parameter object or a submodule is swapped for another."""
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="replaced", compile=False, min_calls=1)
    x = _x(8)

    def agree():
        captured = static(x, streams=Streams(0, torch.arange(8), "t"))
        _assert_close(captured, fn(x, streams=Streams(0, torch.arange(8), "t")))
        return captured

    before = agree()
    layer = next(m for m in program.modules() if isinstance(m, torch.nn.Linear))
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 3.0)  # a new object, the same shape and name
    after = agree()
    assert not torch.allclose(before, after)
    owner = next(m for m in program.modules() if any(c is layer for c in m.children()))
    name = next(n for n, c in owner.named_children() if c is layer)
    fresh = torch.nn.Linear(layer.in_features, layer.out_features)
    setattr(owner, name, fresh)  # a new submodule
    assert not torch.allclose(after, agree())
    assert len(static.entries) == 1 and static.fallback is None


def test_a_shape_seen_once_or_rarely_runs_as_written_and_is_never_compiled():
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="the training step", compile=False)
    static(_x(8), streams=Streams(0, torch.arange(8)))
    assert static.entries == {}  # a first call runs as written
    for _ in range(3):  # epochs of 9 full batches and one smaller last batch
        for _ in range(9):
            static(_x(8), streams=Streams(0, torch.arange(8)))
        value = static(_x(3), streams=Streams(0, torch.arange(3)))
        _assert_close(value, fn(_x(3), streams=Streams(0, torch.arange(3))))
    assert len(static.entries) == 1 and static.fallback is None  # the full batches' graph only
    assert sorted(static.calls.values()) == [3, 28]  # the last batch: 3 calls against 28, rare


def test_a_callers_cpu_autocast_is_part_of_the_signature():
    program = _vae()
    static = Static(_loss_fn(program, make_objective("trace")), program, label="a", compile=False, min_calls=1)
    with torch.no_grad():
        static(_x(), streams=Streams(0, torch.arange(8)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            static(_x(), streams=Streams(0, torch.arange(8)))
    assert len(static.entries) == 2


def test_too_many_signatures_fall_back_to_the_general_path_with_one_warning():
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="the training step", compile=False, max_signatures=2, min_calls=1)
    static(_x(3), streams=Streams(0, torch.arange(3)))
    static(_x(4), streams=Streams(0, torch.arange(4)))
    with pytest.warns(UserWarning, match="the training step: the compiled path is off .*more than 2 different"):
        value = static(_x(5), streams=Streams(0, torch.arange(5)))
    _assert_close(value, fn(_x(5), streams=Streams(0, torch.arange(5))))
    assert static.entries == {}


class _Branching(nn.Module):
    """A model whose Python branches on the data's values: not static."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(3, 2)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            shift = 1.0 if float(x.sum()) > 0 else -1.0
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) + shift, 1.0).to_event(1), obs=x[:, :1])

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc(x), 1.0).to_event(1))


def test_a_program_that_branches_on_values_runs_as_written_with_one_warning():
    program = Program(_Branching())
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="the training step", compile=False, min_calls=1)
    x = torch.randn(4, 3).abs()
    with pytest.warns(UserWarning, match="the training step: the compiled path is off for this program "
                                         r"\(.*data-dependent"):
        value = static(x, streams=Streams(0, torch.arange(4)))
    assert torch.equal(value, fn(x, streams=Streams(0, torch.arange(4))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        again = static(-x, streams=Streams(0, torch.arange(4)))
        assert torch.equal(again, fn(-x, streams=Streams(0, torch.arange(4))))


def test_a_parameter_outside_the_program_is_refused_not_frozen():
    hidden = torch.zeros(2, requires_grad=True)  # a tensor the program reads that is not its parameter

    class Leaky(_Branching):
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(hidden.expand(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[:, :1])

    program = Program(Leaky())
    static = Static(_loss_fn(program, make_objective("trace")), program, label="leak", compile=False, min_calls=1)
    with pytest.warns(UserWarning, match="it reads a tensor held outside the program"):
        static(torch.randn(4, 3), streams=Streams(0, torch.arange(4)))
    assert static.fallback is not None


def test_a_failing_compiler_leaves_the_captured_graph_running_eagerly(monkeypatch):
    import torch._inductor

    def failing(graph, example_inputs, *args, **kwargs):
        def compiled(*a, **kw):
            raise RuntimeError("backend compiler failed\nwith a long story")
        return compiled

    monkeypatch.setattr(torch._inductor, "compile", failing)
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="the training step", min_calls=1)
    x = _x()
    with pytest.warns(UserWarning, match=r"the training step: compiling failed \(RuntimeError: backend compiler "
                                         r"failed\); the captured graph runs eagerly"):
        value = static(x, streams=Streams(0, torch.arange(8)))
    _assert_close(value, fn(x, streams=Streams(0, torch.arange(8))))
    assert static.fallback is None and len(static.entries) == 1


def test_with_pyros_validation_on_the_first_call_of_a_signature_runs_as_written_and_checks():
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="v", compile=False)
    with pyro.validation_enabled(True):
        reference = static(_x(), streams=Streams(0, torch.arange(8)))  # as written, with Pyro's checks
        assert static.entries == {}
        first = static(_x(), streams=Streams(0, torch.arange(8)))  # the same signature: now captured
        _assert_close(first, reference)
        assert len(static.entries) == 1 and static.fallback is None
        _assert_close(static(_x(), streams=Streams(0, torch.arange(8))), first)


def test_a_draw_the_streams_cannot_route_still_marks_them_inexact():
    class Discrete(_Branching):
        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                c = pyro.sample("c", dist.Categorical(logits=torch.zeros(x.shape[0], 3)))
                pyro.sample("x", dist.Normal(c.float().unsqueeze(-1), 1.0).to_event(1), obs=x[:, :1])

        def guide(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Categorical(logits=self.loc(x).sum(-1, keepdim=True).expand(-1, 3)))

    program = Program(Discrete())
    static = Static(_loss_fn(program, make_objective("rws", 2, 1, detached=program.parameters_detached)), program,
                    label="d", compile=False)
    for _ in range(3):  # as written, then captured, then from the graph
        streams = Streams(0, torch.arange(4))
        static(torch.randn(4, 3), streams=streams)
        assert streams.exact is False
    assert static.fallback is None and static.entries


def test_static_path_is_shared_per_program_and_only_for_compiled_programs():
    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    assert static_path(fn, program.model, "x") is None  # not marked for compiling
    assert static_path(fn, lambda x: x, "x") is None  # not a Program's method
    program.accelerate(compile=True)
    first = static_path(fn, program.model, "x")
    assert isinstance(first, Static) and static_path(fn, program.guide, "x") is first
    assert static_path(fn, program.model, "y") is not first


@pytest.mark.parametrize("options", [dict(guide="fullrank"), dict(guide="iaf:2"), dict(likelihood="gaussian"),
                                     dict(likelihood="categorical", n_levels=3)])
def test_the_built_in_guide_families_and_likelihoods_are_captured(options):
    program = _vae(**options)
    x = _x() if options.get("likelihood") != "categorical" else torch.randint(0, 3, (8, 64)).float()
    program.check(x)
    fn = _loss_fn(program, make_objective("iwae", 3, 1))
    static = Static(fn, program, label="families", compile=False, min_calls=1)
    captured = static(x, streams=Streams(0, torch.arange(8)))
    reference = fn(x, streams=Streams(0, torch.arange(8)))
    assert static.fallback is None, static.fallback
    _assert_close(captured, reference)
    for a, b in zip(_grads(program, captured), _grads(program, reference)):
        _assert_close(a, b)


# --------------------------------------------------------------------------- #
# the evaluation hot paths: IWAE chunks, the HMC and AIS log-joint
# --------------------------------------------------------------------------- #


@pytest.fixture
def graph_only(monkeypatch):
    """Inductor as the identity and ATen's products: the captured graphs run the general path's kernels, so
    they must match it to the last bit (HMC's chains would magnify any rounding difference)."""
    import ppl_genmodels.compiled as compiled

    monkeypatch.setattr(compiled, "_inductor", lambda graph, args: graph)
    monkeypatch.setattr(compiled, "_LINEAR", None)


def _trained_like_vae() -> tuple[Program, torch.Tensor]:
    program = _vae(3)
    x = _x(8)
    program.check(x)
    return program, x


def test_iwae_chunks_run_one_graph_and_give_the_general_estimates(graph_only):
    from ppl_genmodels.inference.importance import streaming_estimates

    program, x = _trained_like_vae()
    results = {}
    for compiled in (False, True):
        program.accelerate(compile=compiled)
        with torch.no_grad():
            results[compiled] = streaming_estimates(program.model, program.guide, x, k=50, chunk_size=16,
                                                    generator=Streams(0, torch.arange(8), "iwae"))
    for a, b in zip(results[True], results[False]):
        _assert_close(a.value, b.value)
        _assert_close(a.stderr, b.stderr)
    static = static_path(None, program.model, "log-weights of a particle chunk")
    assert static.fallback is None and len(static.entries) == 1  # chunks of 16; the last one, of 2, is rare


def test_hmc_and_ais_on_a_compiled_program_give_the_general_draws(graph_only):
    from ppl_genmodels.inference.ais import ais
    from ppl_genmodels.inference.mcmc import hmc_posterior

    program, x = _trained_like_vae()
    draws, estimates = {}, {}
    for compiled in (False, True):
        program.accelerate(compile=compiled)
        result = hmc_posterior(program.model, program.guide, x, num_chains=2, num_samples=6, warmup=6,
                               num_leapfrog=3, generator=Streams(0, torch.arange(8), "hmc"), warn=False)
        draws[compiled] = result.samples
        estimates[compiled] = ais(program.model, program.guide, x, num_steps=5, num_chains=2,
                                  generator=Streams(0, torch.arange(8), "ais"))
    for name in draws[False]:
        _assert_close(draws[True][name], draws[False][name])
    _assert_close(estimates[True].log_z, estimates[False].log_z)
    for label in ("HMC log-joint and gradient", "AIS log-joint and gradients"):
        static = static_path(None, program.model, label)
        assert static.fallback is None and static.entries, label
    # every HMC transition (jittered lengths 1 .. 5, warm-up and sampling) and every AIS transition (each at its
    # own temperature, an input) ran as one traced graph
    for label in ("HMC transition", "AIS transition"):
        transition = traced_path(None, program.model, label)
        assert transition.fallback is None and len(transition.entries) == 1, label


def test_hmc_of_a_conditional_program_and_of_pyros_structured_cvae_gives_the_general_draws(graph_only):
    """The conditioning y enters the transition's graph as an input (built-in CVAE, and a Pyro user's CVAE)."""
    from ppl_genmodels.inference.mcmc import hmc_posterior
    from ppl_genmodels.models.cvae import CVAE

    torch.manual_seed(2)
    structured = _program_file("structured_cvae")  # the data is its second argument
    cases = [(Program(CVAE(64, 3, y_dim=5, hidden=(16,))), _x(6),
              torch.nn.functional.one_hot(torch.arange(6) % 5, 5).float()),
             (Program(structured.CVAE(3, 16, 16, structured.Baseline(10, 20, 8)), data_arg="ys"), _x(6, 20),
              torch.rand(6, 10))]
    for program, x, y in cases:
        program.check(x, y)
        draws = {}
        for compiled in (False, True):
            program.accelerate(compile=compiled)
            draws[compiled] = hmc_posterior(program.model, program.guide, x, y, num_chains=2, num_samples=5,
                                            warmup=5, num_leapfrog=3, generator=Streams(0, torch.arange(6), "h"),
                                            warn=False).samples
        for name in draws[False]:
            _assert_close(draws[True][name], draws[False][name])
        transition = traced_path(None, program.model, "HMC transition")
        assert transition.fallback is None and len(transition.entries) == 1


def _power(params, a, n):
    """a * w^n for the parameter w, by a loop whose body gets w as an argument."""
    (w,) = params

    def cond(i, value, n, w):
        return i < n

    def body(i, value, n, w):
        return i + 1, value * w

    return while_loop(cond, body, (torch.zeros((), dtype=torch.int64), a), (n, w))[1]


def _power_by_closure(params, a, n):
    """The same loop, its body reaching w from outside its arguments (a graph would hold w's traced value)."""
    (w,) = params

    def cond(i, value, n):
        return i < n

    def body(i, value, n):
        return i + 1, value * w

    return while_loop(cond, body, (torch.zeros((), dtype=torch.int64), a), (n,))[1]


@pytest.mark.parametrize("inductor", [False, True])
def test_a_traced_loop_runs_any_number_of_iterations_in_one_graph(monkeypatch, inductor):
    import ppl_genmodels.compiled as compiled

    if not inductor:
        monkeypatch.setattr(compiled, "_inductor", lambda graph, args: graph)
    traced = Traced(_power, label="power")
    for w, n in ((2.0, 3), (3.0, 2), (0.5, 5), (2.0, 0)):
        out = traced([torch.full((3,), w)], torch.ones(3), torch.tensor(n))
        torch.testing.assert_close(out, torch.full((3,), w**n))
    assert traced.fallback is None and len(traced.entries) == 1


def test_a_loop_body_that_reaches_a_tensor_by_closure_is_refused_and_the_caller_runs_its_general_path():
    traced = Traced(_power_by_closure, label="power")
    with pytest.warns(UserWarning, match="power: the compiled path is off.*reads a tensor it was not given"):
        assert traced([torch.full((3,), 2.0)], torch.ones(3), torch.tensor(3)) is None
    assert traced.fallback is not None and not traced.entries
    assert traced([torch.full((3,), 2.0)], torch.ones(3), torch.tensor(3)) is None  # and stays off, quietly


def test_a_graph_with_a_loop_comes_from_inductors_cache_the_second_time():
    """torch does not mark its while_loop operator cacheable; the loop's subgraphs are part of the cache key, so
    the toolkit does, and a second compile of the same loop (a later process) is a cache hit."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    if not inductor_config.fx_graph_cache:
        pytest.skip("Inductor's FX graph cache is off in this environment")
    hits = []
    for _ in range(2):
        counters.clear()
        traced = Traced(_power, label="power")
        torch.testing.assert_close(traced([torch.full((2, 5), 1.5)], torch.ones(2, 5), torch.tensor(4)),
                                   torch.full((2, 5), 1.5**4))
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
    assert hits[1] == 1
    # a loop that differs only inside its body is another key, not a stale hit
    other = Traced(_sum_of_powers, label="sum")
    torch.testing.assert_close(other([torch.full((2, 5), 1.5)], torch.ones(2, 5), torch.tensor(4)),
                               torch.full((2, 5), 1.0 + 4 * 1.5))


def _sum_of_powers(params, a, n):
    """_power's loop with ``+`` for ``*`` in its body."""
    (w,) = params

    def cond(i, value, n, w):
        return i < n

    def body(i, value, n, w):
        return i + 1, value + w

    return while_loop(cond, body, (torch.zeros((), dtype=torch.int64), a), (n, w))[1]


@pytest.mark.slow
def test_inductor_compiled_evaluation_paths_agree_with_the_general_ones():
    """IWAE, HMC and AIS of a compiled program with Inductor's kernels: the general path's numbers to rounding,
    bfloat16 networks included (within the bfloat16 tolerance)."""
    from ppl_genmodels.inference.ais import ais
    from ppl_genmodels.inference.importance import streaming_estimates
    from ppl_genmodels.inference.mcmc import hmc_posterior

    program, x = _trained_like_vae()

    def estimates():
        with torch.no_grad():
            _, iwae = streaming_estimates(program.model, program.guide, x, k=40, chunk_size=20,
                                          generator=Streams(0, torch.arange(8), "iwae"))
        hmc = hmc_posterior(program.model, program.guide, x, num_chains=2, num_samples=3, warmup=0, num_leapfrog=2,
                            generator=Streams(0, torch.arange(8), "hmc"), warn=False)
        annealed = ais(program.model, program.guide, x, num_steps=3, num_chains=2,
                       generator=Streams(0, torch.arange(8), "ais"))
        return iwae.value, hmc.samples["z"], annealed.log_z

    reference = estimates()
    program.accelerate(compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Inductor works here: no fallback anywhere
        compiled = estimates()
    for a, b in zip(compiled, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3), (a - b).abs().max()
    program.accelerate(precision="bf16", compile=True)
    low = estimates()
    assert torch.allclose(low[0], reference[0], rtol=0.02, atol=3.0)


# --------------------------------------------------------------------------- #
# the CPU matrix products of a captured graph (oneDNN)
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
def test_the_onednn_products_give_atens_values_and_gradients():
    from ppl_genmodels.compiled import onednn_linear, onednn_mm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen, requires_grad=True)
    weight = torch.randn(4, 7, generator=gen, requires_grad=True)
    bias = torch.randn(4, generator=gen, requires_grad=True)
    for ours, theirs in ((onednn_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)),
                         (onednn_linear(x, weight), torch.nn.functional.linear(x, weight)),
                         (onednn_mm(x[0], weight.t()), x[0] @ weight.t())):
        _assert_close(ours, theirs)
        grad_out = torch.randn(theirs.shape, generator=gen)
        inputs = [t for t in (x, weight, bias) if t.grad_fn is None]
        mine = torch.autograd.grad(ours, inputs, grad_out, allow_unused=True)
        reference = torch.autograd.grad(theirs, inputs, grad_out, allow_unused=True)
        for a, b in zip(mine, reference):
            assert (a is None) == (b is None)
            if a is not None:
                _assert_close(a, b)
    with torch.no_grad():  # a product whose operand needs no gradient skips it
        assert onednn_linear(x.detach(), weight.detach()).grad_fn is None


def test_a_captured_graph_runs_its_cpu_products_through_onednn(monkeypatch):
    from ppl_genmodels.compiled import _use_onednn

    program = _vae()
    fn = _loss_fn(program, make_objective("trace"))
    static = Static(fn, program, label="products", compile=False, min_calls=1)
    static(_x(), streams=Streams(0, torch.arange(8)))
    graph = next(iter(static.entries.values())).graph
    replaced = _use_onednn(graph) if torch.backends.mkldnn.is_available() else 0
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    if torch.backends.mkldnn.is_available():
        assert replaced == 4 and "ppl_genmodels.linear.default" in targets and "aten.linear.default" not in targets
    value = graph([p for _, p in static._tensors()], [_x(), None], list(Streams(0, torch.arange(8)).state()))
    _assert_close(value, fn(_x(), streams=Streams(0, torch.arange(8))))


def test_bfloat16_networks_are_captured_for_evaluation_and_train_as_written(graph_only):
    """Autocast enters an evaluation graph as casts (the same numbers as eager bf16); a training graph cannot
    record it, so bf16 training runs the general path, with one warning, rather than silently in float32."""
    from ppl_genmodels.inference.importance import streaming_estimates

    program, x = _trained_like_vae()
    values = {}
    for compiled in (False, True):
        program.accelerate(precision="bf16", compile=compiled)
        with torch.no_grad():
            for _ in range(2):  # a network's first call runs in float32 (it finds the networks)
                _, iwae = streaming_estimates(program.model, program.guide, x, k=20, chunk_size=20,
                                              generator=Streams(0, torch.arange(8), "iwae"))
        values[compiled] = iwae.value
    assert torch.equal(values[True], values[False])
    graph = next(iter(static_path(None, program.model, "log-weights of a particle chunk").entries.values())).graph
    assert any(getattr(n.meta.get("val"), "dtype", None) == torch.bfloat16 for n in graph.graph.nodes)
    trainer = Trainer(program, make_objective("trace"), torch.optim.Adam(program.parameters(), lr=1e-3))
    trainer.validate_next = False
    with pytest.warns(UserWarning, match="bf16 networks run under autocast"):
        for _ in range(2):  # the second call of the step's signature would capture it
            trainer.step(x, streams=Streams(0, torch.arange(8)))


def test_a_programs_compiled_paths_go_with_it():
    import gc
    import weakref

    from ppl_genmodels.inference.importance import streaming_estimates

    program = _vae().accelerate(compile=True)
    x = _x()
    with torch.no_grad():
        for _ in range(2):
            streaming_estimates(program.model, program.guide, x, k=20, chunk_size=10,
                                generator=Streams(0, torch.arange(8)))
    assert static_path(None, program.model, "log-weights of a particle chunk").entries
    gone = weakref.ref(program)
    del program
    gc.collect()
    assert gone() is None


def test_fit_with_compile_on_trains_compiled_and_says_what_it_cost(tmp_path, capsys):
    from ppl_genmodels import fit

    runs = {}
    for setting in ("off", "on"):
        runs[setting] = fit("vae", "digits", tmp_path / setting, epochs=2, hidden=[32], z_dim=4, compile=setting,
                            eval_k=5, plots=False, evaluate=False, progress=setting == "on")
    out = capsys.readouterr().out
    assert "compiled training step (with its Adam update): 1 graph(s), captured and compiled in" in out  # the last batch is rare
    assert runs["on"].config.compile == "on"
    np_on, np_off = runs["on"].metrics["val_elbo"].to_numpy(), runs["off"].metrics["val_elbo"].to_numpy()
    assert abs(np_on - np_off).max() < 1e-3 * abs(np_off).max()


def test_the_command_line_fit_with_compile_on_records_it_and_reports_the_compile(tmp_path):
    import json

    from conftest import run_cli

    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["fit", "--model", "vae", "--data", "digits", "--out", str(out), "--epochs", "2",
                                    "--hidden", "32", "--z-dim", "4", "--compile", "on", "--no-plots",
                                    "--eval-k", "5"])
    assert code == 0, stderr
    assert "compiled training step (with its Adam update): 1 graph(s), captured and compiled in" in stdout + stderr
    assert "compiled path is off" not in stdout + stderr
    assert json.loads((out / "config.json").read_text())["compile"] == "on"


# --------------------------------------------------------------------------- #
# the training step with its Adam update in the graph
# --------------------------------------------------------------------------- #


def _adam_runs(optimizer_for, steps: int = 4, objective: str = "trace", data=None):
    """``steps`` training steps with the update in the graph and with the general path (optimizer.step)."""
    out = {}
    for in_graph in (True, False):
        program = _vae().accelerate(compile=True)
        trainer = Trainer(program, make_objective(objective), optimizer_for(program))
        if not in_graph:
            trainer.in_graph = None
        losses = []
        for i, x in enumerate(data or [_x(16, seed=s) for s in range(steps)]):
            losses.append(trainer.step(x, streams=Streams(0, torch.arange(len(x)), f"e{i}")))
            losses[-1] = (losses[-1], float(trainer.skipped))
        state = trainer.optimizer.state_dict()["state"]
        out[in_graph] = losses, [p.detach().clone() for p in program.parameters()], state, trainer
    return out


def _groups(program: Program) -> list[dict]:
    params = list(program.parameters())
    return [{"params": params[:2], "lr": 3e-3}, {"params": params[2:], "weight_decay": 0.05}]


@pytest.mark.parametrize("optimizer_for", [
    lambda program: torch.optim.Adam(program.parameters(), lr=1e-2),
    lambda program: torch.optim.Adam(program.parameters(), lr=1e-2, fused=True, betas=(0.8, 0.99), eps=1e-6),
    lambda program: torch.optim.Adam(_groups(program), lr=1e-2, foreach=True),
    lambda program: torch.optim.Adam(program.parameters(), lr=1e-2, maximize=True),
], ids=["plain", "fused-betas-eps", "groups-decay", "maximize"])
@pytest.mark.parametrize("objective", ["trace", "iwae"])
def test_the_update_in_the_graph_is_torchs_adam(graph_only, optimizer_for, objective):
    """With the graph run as recorded (ATen's kernels), the step with its Adam update in the graph gives
    torch.optim.Adam's parameters and state (step, exp_avg, exp_avg_sq) to float32 rounding, step by step."""
    runs = _adam_runs(optimizer_for, objective=objective)
    assert runs[True][3].in_graph.static.entries and runs[True][3].in_graph.static.fallback is None
    assert not runs[True][3].loss_module.static.entries  # the loss alone was never compiled
    for (a, skip_a), (b, skip_b) in zip(runs[True][0], runs[False][0]):
        assert float(a) == pytest.approx(float(b), rel=1e-5) and skip_a == skip_b == 0.0
    for a, b in zip(runs[True][1], runs[False][1]):
        _assert_close(a, b, rtol=1e-5)
    for key, state in runs[False][2].items():
        for name, value in state.items():
            _assert_close(runs[True][2][key][name], value, rtol=1e-5)


def test_a_non_finite_loss_moves_nothing_in_the_graph_either(graph_only):
    x = _x(16)
    poisoned = x.clone()
    poisoned[3, 5] = float("nan")  # a NaN pixel: a NaN loss (validation is off)
    runs = _adam_runs(lambda program: torch.optim.Adam(program.parameters(), lr=1e-2), data=[x, x, poisoned, x])
    losses, params, state, trainer = runs[True]
    assert [skip for _, skip in losses] == [0.0, 0.0, 1.0, 0.0] and losses[2][0].isnan()
    assert all(int(s["step"]) == 3 for s in state.values())  # the poisoned step did not count
    for a, b in zip(params, runs[False][1]):
        _assert_close(a, b, rtol=1e-5)
    assert trainer.in_graph.static.entries


@pytest.mark.parametrize("change", ["amsgrad", "hook", "sgd", "tensor-lr"])
def test_the_general_path_takes_steps_the_graph_would_not_give_as_the_optimizer_does(change):
    program = _vae().accelerate(compile=True)
    if change == "sgd":
        optimizer = torch.optim.SGD(program.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.Adam(program.parameters(), lr=torch.tensor(1e-2) if change == "tensor-lr" else 1e-2,
                                     amsgrad=change == "amsgrad")
    calls = []
    if change == "hook":
        optimizer.register_step_post_hook(lambda *args: calls.append(1))
    trainer = Trainer(program, make_objective("trace"), optimizer)
    for i in range(3):
        trainer.step(_x(16), streams=Streams(0, torch.arange(16), f"e{i}"))
    assert not trainer.in_graph.static.entries and trainer.in_graph.static.fallback is None
    assert len(trainer.loss_module.static.entries) == 1  # the loss alone, compiled; the optimizer steps as it is
    assert calls == ([1, 1, 1] if change == "hook" else [])


# --------------------------------------------------------------------------- #
# the streams' normals in a compiled graph
# --------------------------------------------------------------------------- #


def test_the_compiled_inverse_normal_cdf_is_ndtri_to_one_float32_unit():
    """Acklam's approximation, as compiled graphs compute the streams' normals: within 1.15e-9 of ndtri in
    float64 (his bound), so in float32 the same value or a neighbour, from the 53-bit grid's ends to its middle."""
    from ppl_genmodels.compiled import fast_ndtri

    bits = torch.randint(0, 2**53, (200_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    ends = torch.tensor([0, 1, 2, 2**20, 2**53 - 2**20, 2**53 - 2, 2**53 - 1], dtype=torch.int64)
    p = (torch.cat([bits, ends]).double() + 0.5) * 2.0**-53  # the streams' uniforms
    p = torch.cat([p, torch.tensor([0.02425, 0.02425 + 1e-12, 0.5, 1 - 0.02425])])
    exact, fast = torch.special.ndtri(p), fast_ndtri(p)
    top = p == 1  # the largest, (2^53 - 1/2) / 2^53, rounds to 1 in float64: infinite on both paths
    assert top.sum() == 1 and fast[top].item() == exact[top].item() == float("inf")
    fast, exact = fast[~top], exact[~top]
    assert ((fast - exact).abs() <= 1.15e-9 * exact.abs() + 1e-15).all()
    a, b = fast.float().view(torch.int32).long(), exact.float().view(torch.int32).long()
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.02


def test_a_graph_sent_to_inductor_draws_its_normals_with_the_vectorizable_quantile():
    from torch.fx.experimental.proxy_tensor import make_fx

    from ppl_genmodels.compiled import _vectorize_ndtri, fast_ndtri

    u = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    graph = make_fx(lambda p: torch.special.ndtri(p).float() + torch.special.ndtri(p.float()))(u)
    assert _vectorize_ndtri(graph) == 1  # the float64 call only: a float32 ndtri has no float64 grid to keep
    assert not any(n.target is torch.ops.aten.special_ndtri.default and n.meta["val"].dtype == torch.float64
                   for n in graph.graph.nodes)
    assert torch.equal(graph(u), fast_ndtri(u).float() + torch.special.ndtri(u.float()))


def test_a_compiled_run_resumed_matches_the_straight_one_to_rounding(tmp_path, capsys):
    """The Adam state the graph writes is the optimizer's own: a checkpoint taken after compiled steps resumes
    (the first step of the new process on the general path, then the graph again) where the straight run went."""
    from ppl_genmodels import fit
    from ppl_genmodels.runs import load_checkpoint

    options = dict(hidden=[32], z_dim=4, compile="on", eval_k=5, plots=False, evaluate=False,
                   max_examples=640, batch_size=32)
    straight = fit("vae", "digits", tmp_path / "straight", epochs=3, progress=True, **options)
    fit("vae", "digits", tmp_path / "split", epochs=2, progress=False, **options)
    resumed = fit(out=tmp_path / "split", resume=True, epochs=3, progress=True, plots=False, evaluate=False)
    out = capsys.readouterr().out
    assert out.count("compiled training step (with its Adam update): 1 graph(s)") == 2  # straight and resumed
    a, b = straight.metrics["val_elbo"].to_numpy(), resumed.metrics["val_elbo"].to_numpy()
    assert len(a) == len(b) == 3 and abs(a - b).max() < 1e-4 * abs(a).max()
    last_a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    last_b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for sa, sb in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values()):
        assert int(sa["step"]) == int(sb["step"]) == 60  # 3 epochs of 20 batches, every step counted once
        _assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-3)


@pytest.mark.parametrize("name", ["tutorial_vae", "param_store_model"])
def test_the_update_in_the_graph_reaches_pyro_param_parameters_of_a_tutorial_program(graph_only, name):
    """``pyro.module`` networks and ``pyro.param`` values (a constrained one too) are updated in the graph as
    torch.optim.Adam updates them."""
    build, dim = {"tutorial_vae": (lambda m: m.VAE(z_dim=3, hidden_dim=16), 784),
                  "param_store_model": (lambda m: m.LinearGaussian(5, 2), 5)}[name]
    data = [_x(6, dim, seed=s) if dim == 784 else torch.randn(6, dim, generator=torch.Generator().manual_seed(s))
            for s in range(4)]
    out = {}
    for in_graph in (True, False):
        torch.manual_seed(0)
        program = Program(build(_program_file(name))).accelerate(compile=True)
        program.check(data[0])
        trainer = Trainer(program, make_objective("trace"), torch.optim.Adam(program.parameters(), lr=1e-2))
        if not in_graph:
            trainer.in_graph = None
        start = {k: v.detach().clone() for k, v in program.named_parameters()}
        for i, x in enumerate(data):
            trainer.step(x, streams=Streams(0, torch.arange(6), f"e{i}"))
        out[in_graph] = dict(program.named_parameters()), trainer
        assert all(not torch.equal(start[k], v) for k, v in program.named_parameters())  # every parameter moved
    assert out[True][1].in_graph.static.entries and out[True][1].in_graph.static.fallback is None
    assert out[True][0].keys() == out[False][0].keys()
    assert (name == "param_store_model") == any(k.startswith("pyro_params") for k in out[True][0])
    for key, value in out[False][0].items():
        _assert_close(out[True][0][key].detach(), value.detach(), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_kl_warm_up_runs_one_compiled_graph_with_the_weight_as_an_input(graph_only, optimizer):
    """Each epoch of a warm-up has its own KL weight: an input of the graph, not a new signature, so one graph
    serves every weight below 1 (and one more the weight 1), with the general path's numbers."""
    weights = [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    runs = {}
    for compiled in (True, False):
        program = _vae().accelerate(compile=compiled)
        make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        objective = make_objective("trace")
        trainer = Trainer(program, objective, make(program.parameters(), lr=1e-2))
        losses = []
        for i, weight in enumerate(weights):
            objective.kl_weight = weight
            losses.append(float(trainer.step(_x(16, seed=i), streams=Streams(0, torch.arange(16), f"e{i}"))))
            assert objective.kl_weight == weight  # the graph's input was swapped in only during the call
        runs[compiled] = losses, [p.detach().clone() for p in program.parameters()], trainer
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        _assert_close(a, b, rtol=1e-5)
    static = runs[True][2].statics[1 if optimizer == "adam" else 0]
    assert static.fallback is None and len(static.entries) == 2  # weighted (any weight) and unweighted


def test_when_inductor_fails_on_a_traced_transition_hmc_goes_on_with_its_per_step_graphs(monkeypatch):
    """A traced loop that Inductor cannot compile gives its one eager result, with a warning, and then
    returns None: the sampler's per-leapfrog-step path (with its own compiled graph) takes over, and the
    draws are those of the program as written."""
    import ppl_genmodels.compiled as compiled
    from ppl_genmodels.inference.mcmc import hmc_posterior

    program, x = _trained_like_vae()
    options = dict(num_chains=2, num_samples=4, warmup=4, num_leapfrog=3, warn=False)
    reference = hmc_posterior(program.model, program.guide, x, generator=Streams(0, torch.arange(8), "hmc"),
                              **options).samples
    real = compiled._inductor

    def failing(graph, args):
        if any(isinstance(m, torch.fx.GraphModule) and m is not graph for m in graph.modules()):  # the loop
            raise RuntimeError("no lowering for this loop")
        return lambda *a: graph(*a)  # the per-step graph: as recorded (the general path's kernels)

    monkeypatch.setattr(compiled, "_inductor", failing)
    monkeypatch.setattr(compiled, "_LINEAR", None)
    program.accelerate(compile=True)
    with pytest.warns(UserWarning, match="HMC transition: compiling failed .*no lowering for this loop"):
        result = hmc_posterior(program.model, program.guide, x, generator=Streams(0, torch.arange(8), "hmc"),
                               **options)
    for name in reference:
        _assert_close(result.samples[name], reference[name])
    transition = traced_path(None, program.model, "HMC transition")
    assert transition.fallback == "compiling failed" and not transition.entries
    assert static_path(None, program.model, "HMC log-joint and gradient").entries  # the per-step graph ran
