"""Sparse autoencoders for interpretability: the sparsity rules, the training recipe
and the models built from them (the registry-driven tests check every SAE plugin's
contract, saving, ONNX export and scikit-learn conformance too)."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aecore
from aecore import ops
from aecore.data.superposition import superposition_from_source
from aecore.errors import ConfigError, DataError, ShapeError
from aecore.sae import rules
from aecore.sae.recipe import (
    FiringTracker,
    aux_loss,
    geometric_median,
    remove_parallel_gradient,
    set_row_norms,
)

SAES = aecore.list_models(filter="sae-*")
D, N = 16, 64


def make(name="sae-topk", seed=0, **hp):
    torch.manual_seed(seed)
    return aecore.create(name, input_shape=(D,), latent_dim=N, **hp)


def sparse_data(rows=2048, seed=0, d=D, features=32):
    """A small superposition: a few of ``features`` random directions per row."""
    from aecore.data.superposition import Superposition

    x, _ = Superposition(d=d, n_features=features, p=0.1, seed=seed).sample(rows)
    return torch.from_numpy(x)


def test_every_architecture_is_registered():
    assert set(SAES) == {"sae-topk", "sae-batchtopk", "sae-matryoshka", "sae-relu", "sae-jumprelu"}


# -- the rules ----------------------------------------------------------------------------
def test_topk_keeps_the_k_largest_of_each_row_relud():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, -1.0, -3.0, 0.1]])
    code = rules.TopK(2).code(pre)
    torch.testing.assert_close(code, torch.tensor([[3.0, 0, 2.0, 0], [0, 0, 0, 0.1]]))


def test_batchtopk_keeps_k_per_row_on_average_and_learns_its_threshold():
    rule = rules.BatchTopK(2).train()
    pre = torch.tensor([[5.0, 4.0, 3.0, 0.1], [0.2, 0.3, 0.1, 0.0]])
    code = rule.code(pre)  # the 4 largest over the batch: all in the first row
    torch.testing.assert_close(code, torch.tensor([[5.0, 4.0, 3.0, 0], [0, 0.3, 0, 0]]))
    assert float(rule.threshold) == pytest.approx(0.3)  # the smallest kept
    rule.code(torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.6, 0.5, 0.4, 0.3]]))
    assert float(rule.threshold) == pytest.approx((0.3 + 0.7) / 2)  # a running mean
    rule.eval()
    torch.testing.assert_close(
        rule.code(torch.tensor([[0.6, 0.4, -1.0, 2.0]])), torch.tensor([[0.6, 0, 0, 2.0]])
    )
    with torch.no_grad():  # evaluation never moves the threshold
        rule.train().code(torch.tensor([[9.0, 9.0, 9.0, 9.0]]))
    assert float(rule.threshold) == pytest.approx(0.5)
    # a batch that keeps nothing (all pre-activations <= 0) leaves the estimate and its
    # count alone; an empty batch too
    rule.code(torch.full((2, 4), -1.0))
    rule.code(torch.zeros(0, 4))
    assert float(rule.threshold) == pytest.approx(0.5) and int(rule.threshold_batches) == 2
    rule.code(torch.tensor([[2.0, 1.1, 0.0, 0.0]]))  # kept 2.0 and 1.1: a third batch
    assert float(rule.threshold) == pytest.approx((0.3 + 0.7 + 1.1) / 3)


def test_relu_l1_is_weighted_by_the_decoder_rows_norms():
    code = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    terms = rules.ReLUL1(0.5).penalty(code, code, torch.tensor([2.0, 1.0]))
    assert float(terms["l1"]) == pytest.approx(0.5 * ((2 + 2) + 4) / 2)


def test_jumprelu_gates_at_its_threshold_and_its_gradient_reaches_the_threshold():
    rule = rules.JumpReLU(3, l0_coefficient=1.0, bandwidth=0.1, threshold=0.5)
    pre = torch.tensor([[0.52, 0.4, 2.0], [0.47, 0.9, 0.0]], requires_grad=True)
    code = rule.code(pre)
    torch.testing.assert_close(code.detach(), torch.tensor([[0.52, 0, 2.0], [0, 0.9, 0]]))
    code.sum().backward()
    # d/d threshold of pre * H(pre - t): -(t / bw) per pre within bw/2 of t; the chain
    # rule through log t multiplies by t
    near = torch.tensor([2.0, 0.0, 0.0])  # latent 0: 0.52 and 0.47 are near 0.5
    torch.testing.assert_close(rule.log_threshold.grad, -(0.5 / 0.1) * near * 0.5)
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 0, 1.0], [0, 1.0, 0]]))
    rule.log_threshold.grad = None
    rule.penalty(code, pre, torch.ones(3))["l0_penalty"].backward()
    torch.testing.assert_close(rule.log_threshold.grad, -(1 / 0.1) * near / 2 * 0.5)


# -- the recipe ---------------------------------------------------------------------------
@given(st.integers(2, 6), st.integers(2, 6), st.integers(0, 100))
def test_a_step_without_the_parallel_gradient_keeps_decoder_rows_on_the_sphere(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64))
    set_row_norms(w, 1.0)
    w.grad = torch.randn(n, d, generator=g, dtype=torch.float64)
    remove_parallel_gradient(w)
    torch.testing.assert_close((w.grad * w).sum(1), torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(w.norm(dim=1), torch.ones(n, dtype=torch.float64))


def test_the_geometric_median_resists_outliers():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(200, 3)))
    x[:20] += 1000.0  # 10% far away
    median = geometric_median(x)
    assert float(median.norm()) < 1.0 < float(x.mean(0).norm())
    # on symmetric points it is the centre
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]) + 3
    torch.testing.assert_close(geometric_median(square), torch.full((2,), 3.0, dtype=torch.float64))


def test_auxk_trains_only_dead_latents_to_explain_the_residual():
    torch.manual_seed(0)
    decoder = torch.nn.Parameter(torch.randn(6, 4))
    pre = torch.randn(5, 6, requires_grad=True)
    residual = torch.randn(5, 4)
    dead = torch.tensor([True, False, True, False, False, False])
    loss = aux_loss(residual, pre, dead, decoder, aux_k=2, total_variance=torch.tensor(10.0))
    # the two dead latents' ReLU'd pre-activations reconstruct the residual
    with torch.no_grad():
        want = (pre[:, dead].relu() @ decoder[dead] - residual).pow(2).sum() / 10.0
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert torch.all(decoder.grad[~dead] == 0) and torch.all(pre.grad[:, ~dead] == 0)
    assert decoder.grad[dead].abs().sum() > 0
    none_dead = torch.zeros(6, dtype=torch.bool)
    assert float(aux_loss(residual, pre, none_dead, decoder, 2, torch.tensor(1.0))) == 0.0


def test_latents_count_rows_since_they_last_fired():
    since = torch.zeros(3, dtype=torch.long)
    tracker = FiringTracker()
    tracker.record(torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    tracker.record(torch.tensor([[0.0, 0, 2.0]]))
    tracker.commit(since)
    assert since.tolist() == [0, 3, 0]
    tracker.record(torch.tensor([[0.0, 0, 1.0]]))
    tracker.commit(since)
    assert since.tolist() == [1, 4, 0]


# -- the models ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAES)
def test_the_start_scales_inputs_to_unit_mean_square_and_centres_on_the_median(name):
    x = sparse_data() * 7.0
    model = make(name)
    model.init_from_data(x)
    scaled = x * model.input_scale
    assert float(scaled.pow(2).mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(model.b_dec.detach(), geometric_median(scaled).float())
    # tied: each latent reads along its own decoder row
    torch.testing.assert_close(model.W_enc.detach(), model.W_dec.detach())


@pytest.mark.parametrize("name", SAES)
def test_training_holds_decoder_rows_at_unit_norm_and_explains_the_data(name):
    x = sparse_data(4096)
    model = make(name)
    history = aecore.Trainer(epochs=3, batch_size=256, progress=False).fit(model, x)
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(N), rtol=0, atol=1e-5)
    first, last = history.epochs[0], history.epochs[-1]
    assert last["train_fvu"] < 0.5 * first["train_fvu"] + 1e-9 or last["train_fvu"] < 0.2
    assert {"train_fvu", "train_l0", "train_dead_fraction", "val_fvu"} <= set(last)


@pytest.mark.parametrize("name", SAES)
def test_the_saved_form_folds_the_input_scale_and_load_takes_it_back_out(name, tmp_path):
    import copy

    from safetensors.torch import load_file

    x = sparse_data(2048) * 5.0
    model = make(name)
    aecore.Trainer(epochs=1, batch_size=256, progress=False).fit(model, x)
    c = float(model.input_scale)
    assert c != pytest.approx(1.0)
    aecore.save(model, tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))  # raw-unit weights
    assert float(saved["input_scale"]) == 1.0
    assert float(saved["decoder_row_norm"]) == pytest.approx(1 / c)
    loaded = aecore.load(tmp_path / "m")
    assert float(loaded.input_scale) == pytest.approx(c) and float(loaded.decoder_row_norm) == 1
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode(x[:100]), model.encode(x[:100]), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(loaded(x[:100]), model(x[:100]), atol=1e-4, rtol=1e-4)
    # training on from the folder goes as it would have in memory: Adam's steps suit the
    # weights' scale (on the folded weights, residual-stream-sized inputs took the loss
    # up 80-fold, and the trainer went back to the start)
    runs = []
    for start in (copy.deepcopy(model), loaded):
        trainer = aecore.Trainer(epochs=1, batch_size=256, seed=1, progress=False)
        runs.append(trainer.fit(start, x).epochs[-1]["train_loss"])
    assert runs[1] == pytest.approx(runs[0], rel=1e-3)
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("name", SAES)
def test_the_sparse_code_round_trips(name):
    x = sparse_data(512)
    model = make(name)
    aecore.Trainer(epochs=1, batch_size=128, progress=False).fit(model, x)
    with torch.no_grad():
        values, indices = model.encode_sparse(x[:50])
        dense = model.encode(x[:50])
        rebuilt = torch.zeros_like(dense).scatter(1, indices, values)
        torch.testing.assert_close(rebuilt, dense)
        torch.testing.assert_close(model.decode_sparse(values, indices), model.decode(dense))
        # int32 indices, as numpy and other libraries often hold them
        narrow = model.decode_sparse(values, indices.int())
        torch.testing.assert_close(narrow, model.decode(dense))
    with pytest.raises(ShapeError, match="one shape"):
        model.decode_sparse(values, indices[:, :1])


def test_topk_codes_have_at_most_k_latents():
    model = make(k=3)
    with torch.no_grad():
        z = model.encode(sparse_data(100))
    assert int((z != 0).sum(1).max()) <= 3


def test_auxk_revives_latents_that_never_fire():
    x = sparse_data(4096)

    def trained(aux_coefficient):
        model = make(k=4, dead_window=256, aux_coefficient=aux_coefficient)
        with torch.no_grad():  # these latents respond weakly: they never make the top k
            model.W_enc[:16] *= 0.01
        before = model.W_enc[:16].detach().clone()
        aecore.Trainer(epochs=2, batch_size=256, progress=False, val_fraction=0).fit(model, x)
        return before, model.W_enc[:16].detach()

    before, after = trained(1 / 32)
    assert float(after.norm(dim=1).min()) > 2 * float(before.norm(dim=1).max())
    before, after = trained(0.0)  # without AuxK nothing ever reaches them
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_auxk_reaches_dead_latents_whose_pre_activations_are_all_negative(path):
    from aecore.sae.recipe import aux_error, aux_loss

    x = sparse_data(64)
    model = make(k=4)
    with torch.no_grad():
        model.b_enc[:8] = -100.0  # below zero on every input
        model.since_fired[:8] = model.dead_window + 1
    pre = model._pre(model._scaled(x))
    assert bool((pre[:, :8] < 0).all())
    residual = torch.randn(64, D).abs()
    if path == "dense":
        aux = aux_loss(residual, pre, model.dead_latents(), model.W_dec, 4, torch.tensor(1.0))
    else:  # AuxK's code from the streaming encoder's pass, straight through its ReLU
        dead = model.dead_latents()
        code = ops.topk_encode(
            model._scaled(x), model.W_enc, model.b_enc, model.b_dec, 4, aux_k=4, dead=dead
        )
        aux = aux_error(residual, *code[2:], model.W_dec, 8, 4, torch.tensor(1.0))
    aux.backward()
    grads = model.W_enc.grad.norm(dim=1)
    assert bool((grads[:8] > 0).all()) and float(grads[8:].abs().max()) == 0.0


def test_the_dead_window_follows_the_firing_rate_by_default():
    assert make(k=8).dead_window == max(10_000, 200 * N // 8)
    assert make("sae-relu").dead_window == 1_000_000
    assert make(dead_window=77).dead_window == 77


def test_the_dead_fraction_is_logged_for_training_rows_only():
    # the firing tracker follows the training rows: under a val_ name it passed the
    # training count off as the validation rows'
    torch.manual_seed(0)
    model = make(k=8)
    history = aecore.Trainer(epochs=1, batch_size=128, progress=False, val_fraction=0.25).fit(
        model, torch.randn(512, model.input_size)
    )
    assert "train_dead_fraction" in history.epochs[-1]
    assert "val_dead_fraction" not in history.epochs[-1] and "val_l0" in history.epochs[-1]


def test_the_learning_rate_scales_with_the_dictionary_and_decays_at_the_end():
    model = make(lr_decay=0.25)
    assert model.lr_scale == pytest.approx(1.5 * math.sqrt(16384 / N))
    assert model.lr_factor(0.0) == model.lr_factor(0.75) == model.lr_scale
    assert model.lr_factor(0.875) == pytest.approx(model.lr_scale / 2)
    assert model.lr_factor(1.0) == 0.0
    assert make(lr_scale=2.0, lr_decay=0).lr_factor(0.99) == 2.0
    opt = torch.optim.Adam(make().parameters())  # what the trainer sets each step
    from aecore.training.optim import make_optimizer

    opt = make_optimizer(model, aecore.TrainConfig(lr=1e-3))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * model.lr_scale)


def test_matryoshka_prefixes_reconstruct_on_their_own():
    x = sparse_data(4096)
    model = make("sae-matryoshka")
    assert model.prefixes == [4, 8, 16, 32, 64]
    aecore.Trainer(epochs=2, batch_size=256, progress=False).fit(model, x)
    with torch.no_grad():
        terms = model.loss(x[:1024])
    # the first 4 latents alone explain some of the variance, the whole more
    assert float(terms["fvu"]) < float(terms["prefix_fvu"]) < 1.0


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("sae-topk", {"k": 0}, r"k must be an int in \[1, 64\], or 'auto'; got 0 \(k counts"),
        ("sae-topk", {"k": N + 1}, "at most latent_dim"),
        ("sae-matryoshka", {"prefixes": [8, 4, 64]}, "increasing sizes ending at"),
        ("sae-matryoshka", {"prefixes": [8, 32]}, "ending at latent_dim=64"),
        ("sae-relu", {"l1_coefficient": -1}, r"l1_coefficient must be .*, or 'auto'; got -1"),
        ("sae-jumprelu", {"bandwidth": 0}, r"bandwidth must be a number in \(0, inf\), or 'auto'"),
        ("sae-topk", {"b_dec_init": "median"}, "b_dec_init must be one of"),
        ("sae-topk", {"lr_decay": 2}, "lr_decay must be a number in"),
    ],
)
def test_bad_settings_say_what_was_expected(name, hparams, message):
    with pytest.raises(ConfigError, match=message):
        make(name, **hparams)


def test_lbfgs_is_refused_for_a_constrained_decoder():
    with pytest.raises(ConfigError, match="use adam"):
        aecore.Trainer(optimizer="lbfgs", epochs=1, progress=False).fit(make(), sparse_data(64))


def test_aecore_train_keeps_activations_unscaled_per_feature(tmp_path):
    from aecore.pipeline import train

    result = train("sae-topk", "superposition:2000,d=16,n=32", tmp_path / "m", latent_dim=64,
                   epochs=1, progress=False)  # fmt: skip
    assert result.prepared.normalization.kind == "none"


def test_evaluation_scores_a_superposition_run_against_its_true_features(tmp_path):
    from aecore.pipeline import evaluate, train
    from aecore.sae.metrics import sae_metrics

    source = "superposition:6000,d=16,n=24,p=0.08,seed=3"
    config = aecore.TrainConfig(epochs=3, batch_size=128)
    result = train("sae-topk", source, tmp_path / "sae", latent_dim=48, hparams={"k": 3},
                   config=config, progress=False)  # fmt: skip
    assert result.prepared.normalization.kind == "none"  # SAEs see raw activations
    metrics = evaluate(aecore.load(tmp_path / "sae"), result.prepared)
    for name in ("explained_variance", "l0", "dead", "shrinkage", "mmcs", "mcc"):
        assert math.isfinite(metrics[name]), name
    assert 0 < metrics["l0"] <= 3 and metrics["mmcs"] > 0.5
    # the same numbers as the metrics on the test rows directly
    truth = superposition_from_source(source)
    rows = result.prepared.split.test
    direct = sae_metrics(result.model, torch.as_tensor(result.prepared.dataset.x[rows]),
                         truth=truth, rows=rows)  # fmt: skip
    assert metrics["mmcs"] == pytest.approx(direct["mmcs"], rel=1e-5)
    assert metrics["mcc"] == pytest.approx(direct["mcc"], rel=1e-5)
    # normalised inputs are not the generator's units: no truth metrics then
    minmax = train("sae-topk", source, tmp_path / "mm", latent_dim=48, hparams={"k": 3},
                   config=config, normalize="minmax", progress=False)  # fmt: skip
    assert "mmcs" not in evaluate(minmax.model, minmax.prepared)


def test_batchtopk_selects_per_row_during_its_warmup_then_over_the_batch():
    model = make("sae-batchtopk", k=2, topk_warmup=0.5).train()
    x = sparse_data(64)
    model.set_progress(0.25)
    z = model.encode(x)
    assert bool(((z != 0).sum(1) <= 2).all())
    # the batch rule's cut trains the inference threshold in the warm-up too
    assert float(model.rule.threshold) > 0
    model.set_progress(0.75)
    z = model.encode(x)
    assert int((z != 0).sum()) <= 2 * 64 and int((z != 0).sum(1).max()) > 2
    with pytest.raises(ConfigError, match="topk_warmup"):
        make("sae-batchtopk", topk_warmup=1.5)


@pytest.mark.parametrize("name", ["sae-batchtopk", "sae-matryoshka"])
def test_a_run_that_ends_in_the_warmup_keeps_about_k_latents(name):
    # the threshold was trained only after the warm-up: a run ending in it served a
    # plain ReLU (eval L0 30 with k=4)
    hp = {"prefixes": [8, N]} if name == "sae-matryoshka" else {}
    model = make(name, k=4, topk_warmup=1.0, **hp)
    x = sparse_data(512)
    aecore.Trainer(epochs=1, batch_size=128, val_fraction=0, progress=False).fit(model, x)
    with torch.no_grad():
        l0 = float((model.eval().encode(x) != 0).sum(1).float().mean())
    assert 1 <= l0 <= 8


@pytest.mark.parametrize(
    "name, progress, skew",
    [
        ("sae-topk", 0.0, False),
        ("sae-batchtopk", 0.0, False),  # per-row selection before topk_warmup
        ("sae-batchtopk", 1.0, False),  # batch selection from each row's candidates
        ("sae-batchtopk", 1.0, True),  # a row keeps all its candidates: dense fallback
    ],
)
def test_the_sparse_training_path_matches_the_dense_one(name, progress, skew):
    # top-k rules train through aecore.ops.topk_encode / sparse_decode; the dense path
    # (every pre-activation formed) must give the same loss, terms and gradients
    from aecore.sae import loss as sae_loss_module

    torch.manual_seed(0)
    model = aecore.create(name, input_shape=(12,), latent_dim=40, k=2, aux_k=6, dead_window=5)
    model.train()
    model.set_progress(progress)
    model.since_fired[::3] = 100  # some dead latents, so AuxK takes part
    x = torch.randn(32, 12)
    x = 3 * x / x.norm(dim=1, keepdim=True)  # rows of one norm share the top entries
    if skew:  # one row far larger than the rest holds most of the batch's top entries
        x[0] *= 50
    code = model.rule.sparse_training_code(model._scaled(x), model.W_enc, model.b_enc, model.b_dec)
    assert (code is None) == skew

    def run(fn):
        model.zero_grad()
        out = fn()
        out["loss"].backward()
        return {k: v.detach().clone() for k, v in out.items()}, [
            p.grad.clone() for p in model.parameters()
        ]

    sparse, sparse_grads = run(lambda: model.loss(x))
    xs = model._scaled(x)
    dense, dense_grads = run(lambda: sae_loss_module._dense_loss(model, xs, True))
    assert sparse.keys() == dense.keys() and "auxk" in sparse
    for key in sparse:
        torch.testing.assert_close(sparse[key], dense[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_batchtopk_takes_no_more_candidates_a_row_than_the_fused_encoder_keeps(monkeypatch):
    # on CUDA the fused encoder keeps at most 256 a row: BatchTopK with 4k past that
    # would have run the reference over the whole (B, n) matrix
    from aecore import ops
    from aecore.sae import loss as sae_loss_module

    torch.manual_seed(2)
    model = aecore.create("sae-batchtopk", input_shape=(12,), latent_dim=80, k=4)
    model.train()
    model.set_progress(1.0)
    x = torch.randn(32, 12)
    x = 3 * x / x.norm(dim=1, keepdim=True)
    asked, encode = [], ops.topk_encode
    monkeypatch.setattr(ops, "topk_encode_max_k", lambda t: 12)
    monkeypatch.setattr(ops, "topk_encode", lambda *a, **kw: asked.append(a[4]) or encode(*a, **kw))
    code = model.rule.sparse_training_code(model._scaled(x), model.W_enc, model.b_enc, model.b_dec)
    assert asked == [12] and code is not None  # 4k = 16 candidates capped at 12, none short
    sparse = model.loss(x)["loss"]
    dense = sae_loss_module._dense_loss(model, model._scaled(x), True)["loss"]
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sae-topk", "sae-batchtopk"])
def test_auxk_of_a_small_dictionary_trains_once_latents_die(name):
    # aux_k's default is d / 2 (here 8), at most the latents: a dictionary of 4 latents
    # once failed the step as soon as one died; a larger aux_k is refused, as k is
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"aux_k must be an int in \[1, 4\]; got 7"):
        aecore.create(name, input_shape=(D,), latent_dim=4, k=1, aux_k=7)
    # a saved config holds "auto" resolved: before the cap, d / 2 even past the latents
    old = aecore.create(name, input_shape=(D,), latent_dim=4, k=1, aux_k=D // 2)
    assert old.aux_k == 4
    model = aecore.create(name, input_shape=(D,), latent_dim=4, k=1, dead_window=1)
    assert model.aux_k == model.latent_dim
    trainer = aecore.Trainer(epochs=2, batch_size=64, val_fraction=0, progress=False)
    assert "train_auxk" in trainer.fit(model, sparse_data(512)).epochs[-1]


def test_matryoshka_with_one_prefix_trains_and_evaluates():
    # one prefix, the whole dictionary (what "auto" gives a 1-latent model): the loss
    # once indexed the nested prefixes' first error, of which there is none
    x = sparse_data(512)
    model = make("sae-matryoshka", prefixes=[N], k=4)
    aecore.Trainer(epochs=1, batch_size=64, val_fraction=0, progress=False).fit(model, x)
    with torch.no_grad():
        assert torch.isfinite(model.eval().loss(x)["loss"])


def test_shrinkage_centered_measures_about_b_dec_in_the_inputs_units():
    # b_dec lives in the units the SAE scales inputs to (c x); centring raw rows on it
    # gave 0.995 where the centred ratio is 0.911
    from aecore.sae.metrics import sae_metrics, shrinkage

    x = sparse_data(1024) * 30 + 5
    model = make()
    aecore.Trainer(epochs=1, batch_size=128, progress=False).fit(model, x)
    assert float(model.input_scale) != pytest.approx(1.0)
    with torch.no_grad():
        center = model.b_dec / model.input_scale
        want = shrinkage(x, model(x), center=center)
    assert sae_metrics(model, x)["shrinkage_centered"] == pytest.approx(want, rel=1e-5)


def test_a_16_bit_sae_saves_and_loads_as_the_same_function(tmp_path):
    # folded in bfloat16, the scale came back as another (0.9375 as 0.9336), and the
    # loaded model's outputs moved by 0.2% of their range
    import copy

    x = sparse_data(256) * 3
    model = make("sae-relu")
    model.init_from_data(x)
    model.to(torch.bfloat16).eval()
    aecore.save(model, tmp_path / "m")
    loaded = aecore.load(tmp_path / "m")
    assert loaded.W_enc.dtype == torch.float32  # 16-bit weights load in float32
    assert float(loaded.input_scale) == float(model.input_scale)
    with torch.no_grad():
        want = copy.deepcopy(model).float()(x)
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["sae-topk", "sae-batchtopk", "sae-matryoshka"])
def test_a_16_bit_sae_trains_and_encodes(name):
    # the training loss took bfloat16; encode's top-k once refused it
    x = sparse_data(64)
    model = make(name, k=4)
    model.init_from_data(x)
    model.to(torch.bfloat16).train()
    model.set_progress(0.1)  # inside matryoshka's top-k warm-up
    model.loss(x)["loss"].backward()
    with torch.no_grad():
        z = model.eval().encode(x)
        assert z.dtype == torch.bfloat16 and bool(torch.isfinite(z).all())
        if name == "sae-topk":  # the others' inference thresholds need training
            assert bool(((z != 0).sum(1) <= 4).all())
        assert torch.isfinite(model.loss(x)["loss"])


@pytest.mark.parametrize("name", ["sae-topk", "sae-batchtopk"])
def test_a_diverging_top_k_run_stops_with_the_trainers_advice(name):
    # NaN pre-activations make the fused encoder's code NaN (it does not raise mid-step
    # in training); the run once ended in its bare RuntimeError, where a ReLU SAE got the
    # trainer's non-finite step message. The weights stay those of the last good step
    from aecore.errors import TrainingError

    model = make(name, normalize_inputs=False, unit_decoder=False)
    trainer = aecore.Trainer(epochs=3, batch_size=16, lr=1e35, val_fraction=0, progress=False)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1.*grad_clip"):
        trainer.fit(model, sparse_data(256) * 100)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_empty_batches_and_bad_sparse_indices_say_what_they_are():
    for name in ("sae-batchtopk", "sae-matryoshka"):
        model = make(name, k=2).train()
        assert model.encode(torch.zeros(0, D)).shape == (0, N)
    model = make("sae-topk", k=2).eval()
    values, indices = model.encode_sparse(sparse_data(4))
    with pytest.raises(ConfigError, match=r"indices must lie in \[0, 64\)"):
        model.decode_sparse(values, indices + N)


def test_training_a_dictionary_no_wider_than_its_input_warns(tmp_path):
    # `aecore train sae-topk` without --latent-dim made 8 latents for 64-dimensional
    # activations without a word (worse than PCA, which the run's summary showed last)
    from aecore.pipeline import train

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(200, 16)).astype("f4"))
    settings = dict(epochs=1, progress=False, hparams={"k": 2})
    with pytest.warns(UserWarning, match="dictionary of 8 latents for 16-dimensional rows"):
        train("sae-topk", f"npy:{tmp_path / 'x.npy'}", None, latent_dim=8, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train("sae-topk", f"npy:{tmp_path / 'x.npy'}", None, latent_dim=64, **settings)


def _trained(name, d, **hp):
    """FVU and L0 of ``name`` after three epochs on 20,000 rows of a superposition of
    ``4 d`` features, about five a row."""
    from aecore.data.superposition import Superposition
    from aecore.sae.metrics import fvu, l0

    x, _ = Superposition(d=d, n_features=4 * d, p=5 / (4 * d), seed=0).sample(20_000)
    x = torch.from_numpy(x)
    torch.manual_seed(0)
    model = aecore.create(name, input_shape=(d,), latent_dim=8 * d, **hp)
    aecore.Trainer(epochs=3, batch_size=256, val_fraction=0.0, progress=False).fit(model, x)
    with torch.no_grad():
        z = model.encode(x)
        return fvu(x, model.decode(z)), l0(z)


def test_the_default_l1_penalty_keeps_a_code_at_any_width():
    # a fixed l1_coefficient=0.05 explained 13% of the variance at d = 64 and nothing at
    # d = 128 (FVU 1.03, L0 0.5): codes shrink as sqrt(d) grows against the penalty
    for d in (32, 128):
        error, active = _trained("sae-relu", d)
        assert error < 0.5 and active >= 5, (d, error, active)


def test_the_l0_coefficient_sets_a_jumprelu_dictionarys_sparsity():
    # thresholds that started at 0.001 hardly moved in a short run: L0 was the same
    # (about 150 of 512) for coefficients 0.003 and 0.03
    weak, strong = (_trained("sae-jumprelu", 64, l0_coefficient=c) for c in (0.003, 0.03))
    assert strong[1] < weak[1] / 3, (weak, strong)
    assert weak[0] < 0.25 and strong[1] >= 2, (weak, strong)


@pytest.mark.parametrize("name", SAES)
@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_a_training_loss_compiles_in_one_graph_with_dead_latents(name, progress):
    # reading the dead latents' count (and BatchTopK's exactness flag) back to the host
    # split the compiled step in two and waited for the device every step
    torch.manual_seed(0)
    model = make(name, dead_window=10)
    x = sparse_data(64)
    model.init_from_data(x)
    model.since_fired[::3] = 100  # a third of the latents dead
    model.set_progress(progress)
    model.train()
    want = model.loss(x)["loss"]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model.loss(x)["loss"], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)


def test_auto_k_keeps_a_code_sparser_than_its_input():
    # at d = 16 with 128 latents "auto" chose k = 32, twice the input's dimensions
    assert aecore.create("sae-topk", input_shape=(16,), latent_dim=128).k == 8
    assert aecore.create("sae-topk", input_shape=(768,), latent_dim=16384).k == 32
    assert aecore.create("sae-batchtopk", input_shape=(64,), latent_dim=40).k == 10


def test_encode_sparse_refuses_rows_it_cannot_code():
    # a NaN counted as a nonzero: every latent of the dictionary came back, all NaN
    model = make("sae-relu")
    model.init_from_data(sparse_data(64))
    x = sparse_data(4)
    x[2, 3] = float("nan")
    with pytest.raises(
        DataError, match=r"encode_sparse: x holds NaN or infinite values \(rows 2\)"
    ):
        model.encode_sparse(x)


def test_unscaled_inputs_far_from_unit_scale_are_named():
    # normalize_inputs=False with the recipe's unit-scale defaults trained to FVU 65
    # without a word
    x = sparse_data(256) * 1e-4
    with pytest.warns(UserWarning, match=r"normalize_inputs=False, and these inputs have a mean"):
        make(normalize_inputs=False).init_from_data(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(normalize_inputs=False).init_from_data(x * 1e4)
        make().init_from_data(x)
