"""Transformers, embeddings, attention and any model output, against hand-written models and float64 references.

The references here use plain autograd (double backward, per-example loops): torch.func.hessian
(jacfwd of jacrev) itself is wrong for nn.LayerNorm in torch 2.13.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from helpers import reference_ggn
from lightning_influence import (
    CurvatureOperator,
    InfluenceCallback,
    TwiceDifferentiable,
    compute_influence_factors,
    compute_influences,
    fit_solver,
)
from lightning_influence.model.attention import multi_head_attention, second_order_attention
from lightning_influence.model.layers import LayerStructure

VOCABULARY, WIDTH, CLASSES, LAMBDA = 7, 4, 3, 0.1
DAMPED = 10.0  # above the untrained transformer's most negative Hessian eigenvalue: H + λI is positive definite


@dataclasses.dataclass
class ModelOutput:
    """What a Hugging Face model returns: a dataclass with `logits` (and other values the loss ignores)."""

    logits: Tensor
    hidden_states: Tensor | None = None
    loss: Tensor | None = None


def wrap(logits: Tensor, hidden: Tensor, kind: str):
    return {"tensor": logits, "dict": {"logits": logits, "hidden_states": hidden}, "tuple": (logits, hidden),
            "dataclass": ModelOutput(logits, hidden)}[kind]


LOSSES = {
    "tensor": F.cross_entropy,
    "dict": lambda out, y: F.cross_entropy(out["logits"], y),
    "tuple": lambda out, y: F.cross_entropy(out[0], y),
    "dataclass": lambda out, y: F.cross_entropy(out.logits, y),
}
TRANSFORMS = {"tensor": None, "dict": "logits", "tuple": "0", "dataclass": lambda out: out.logits}


class TextClassifier(nn.Module):
    """Embedding, one stock nn.TransformerEncoderLayer (padding masked), mean pool, head; Hugging Face-style output.
    With `decoder`, an nn.TransformerDecoderLayer attending to the embeddings as its memory follows."""

    def __init__(self, kind: str = "tensor", decoder: bool = False) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=8, dropout=0.1, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(WIDTH, 2, dim_feedforward=8, batch_first=True) if decoder else None
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: Tensor):
        embedded, padding = self.emb(tokens), tokens == 0
        hidden = self.enc(embedded, src_key_padding_mask=padding)
        if self.dec is not None:
            hidden = self.dec(hidden, embedded, tgt_key_padding_mask=padding, memory_key_padding_mask=padding)
        return wrap(self.head(hidden.mean(1)), hidden, self.kind)


class HandWrittenEncoder(nn.Module):
    """nn.TransformerEncoderLayer (post-norm, ReLU) written out, with the stock layer's parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * WIDTH, WIDTH))
        self.self_attn.in_proj_bias = nn.Parameter(torch.empty(3 * WIDTH))
        self.self_attn.out_proj = nn.Linear(WIDTH, WIDTH)
        self.linear1, self.linear2 = nn.Linear(WIDTH, 8), nn.Linear(8, WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (2, WIDTH // 2)).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, d]
        scores = q @ k.transpose(-2, -1) / (WIDTH // 2) ** 0.5
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = self.norm1(x + self.self_attn.out_proj(attended))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class HandWrittenClassifier(TextClassifier):
    def __init__(self) -> None:
        super().__init__("tensor")
        self.enc = HandWrittenEncoder()

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(tokens), tokens == 0).mean(1))


def token_data(n: int, length: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences (0 is padding, at the end, a different amount per sequence) and labels from a rule."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCABULARY, (n, length), generator=generator)
    for i in range(n):
        tokens[i, length - i % 3 :] = 0
    return tokens, (tokens.sum(1) % CLASSES)


def loader(x: Tensor, y: Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture(scope="module")
def text_problem():
    torch.manual_seed(0)
    stock = TextClassifier().double()
    x, y = token_data(16)
    x_test, y_test = token_data(3, seed=1)
    return stock, loader(x, y), loader(x_test, y_test)


@pytest.fixture(scope="module")
def hand_written_scores(text_problem):
    stock, train, test = text_problem
    hand = HandWrittenClassifier().double()
    hand.load_state_dict(stock.state_dict())
    model = TwiceDifferentiable(hand, F.cross_entropy)
    return {method: compute_influences(model, train, test_data=test, inversion_method=method,
                                       hessian_regularization=DAMPED) for method in ("direct", "cg")}


@pytest.mark.parametrize("kind, method", list(itertools.product(LOSSES, ["direct", "cg"])))
def test_stock_transformer_with_any_output_scores_like_a_hand_written_equivalent(
    text_problem, hand_written_scores, kind, method
):
    stock, train, test = text_problem
    module = TextClassifier(kind).double()
    module.load_state_dict(stock.state_dict())
    model = TwiceDifferentiable(module, LOSSES[kind], output_transform=TRANSFORMS[kind])
    scores = compute_influences(model, train, test_data=test, inversion_method=method, hessian_regularization=DAMPED)
    torch.testing.assert_close(scores, hand_written_scores[method], rtol=1e-6, atol=1e-8)
    assert module.training  # dropout back on after the computation


@pytest.mark.parametrize("method, options", [
    ("lissa", {"scale": 20.0, "maxiter": 30}), ("arnoldi", {"rank": 8}), ("nystroem", {"rank": 8}),
])
def test_every_method_runs_on_the_stock_transformer(text_problem, method, options):
    stock, train, test = text_problem
    module = TextClassifier("dict").double()
    module.load_state_dict(stock.state_dict())
    model = TwiceDifferentiable(module, LOSSES["dict"], output_transform="logits")
    scores = compute_influences(model, train, test_data=test, inversion_method=method,
                                hessian_regularization=DAMPED, **options)
    assert scores.shape == (3, 16) and bool(torch.isfinite(scores).all())


def test_ekfac_names_the_layers_it_would_leave_out_and_runs_on_the_rest(text_problem):
    stock, train, test = text_problem
    model = TwiceDifferentiable(stock, F.cross_entropy)
    with pytest.raises(ValueError, match=r"enc\.norm1\.weight \(LayerNorm\).*enc\.norm2\.bias \(LayerNorm\)'\]\. Select "
                                         r"only the covered layers with params=\['emb\.weight', 'enc\.self_attn"):
        fit_solver(model, train, "ekfac", hessian_regularization=LAMBDA)
    covered = TwiceDifferentiable(stock, F.cross_entropy, params=["emb.*", "enc.self_attn.*", "enc.linear*", "head.*"])
    solver = fit_solver(covered, train, "ekfac", hessian_regularization=LAMBDA)
    assert solver.fit_info["layers"] == ["emb", "enc.self_attn.q_proj", "enc.self_attn.k_proj", "enc.self_attn.v_proj",
                                         "enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "head"]


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCABULARY, WIDTH)
        self.out = nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(self.emb(tokens).mean(1))


def test_tied_weights_and_renormalised_embeddings_are_outside_the_per_layer_form():
    model = TwiceDifferentiable(TiedWeights().double(), F.cross_entropy)
    assert not model.uses_layer_gradients
    with pytest.raises(ValueError, match=r"emb\.weight \(Embedding, shared with \['out\.weight'\]\)"):
        LayerStructure(model)
    renormalised = nn.Sequential(nn.Embedding(VOCABULARY, WIDTH, max_norm=1.0), nn.Flatten(), nn.Linear(2 * WIDTH, 3))
    with pytest.raises(ValueError, match=r"0\.weight \(Embedding, max_norm\)'\]\. Select only the covered layers "
                                         r"with params=\['2\.weight', '2\.bias'\]"):
        LayerStructure(TwiceDifferentiable(renormalised, F.cross_entropy))


# -- EK-FAC on embeddings and attention projections ---------------------------------------------------------
class AttentionClassifier(nn.Module):
    """Embedding, self-attention (packed in_proj) with padding masked, cross-attention with kdim ≠ embed_dim
    (separate q, k, v weights) onto a [B, T, 3] memory from a Linear, and a head: only layers EK-FAC covers."""

    def __init__(self, kind: str = "tensor", padding_idx: int | None = 0) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.memory = nn.Linear(WIDTH, 3)
        self.cross = nn.MultiheadAttention(WIDTH, 2, kdim=3, vdim=3, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: Tensor):
        hidden = self.emb(tokens)
        hidden = hidden + self.attn(hidden, hidden, hidden, key_padding_mask=tokens == 0, need_weights=False)[0]
        memory = torch.tanh(self.memory(hidden))
        hidden = torch.tanh(hidden + self.cross(hidden, memory, memory)[0])
        return wrap(self.head(hidden.mean(1)), hidden, self.kind)


def padding_entries(module: nn.Module, name: str = "emb.weight") -> Tensor:
    """A mask over θ of the embedding's padding row, which influence holds fixed."""
    parts = []
    for parameter_name, parameter in module.named_parameters():
        part = torch.zeros(parameter.shape, dtype=torch.bool)
        part[0] = parameter_name == name
        parts.append(part.reshape(-1))
    return torch.cat(parts)


def test_ekfac_with_embedding_and_attention_projections_is_its_dense_definition():
    torch.manual_seed(0)
    module = AttentionClassifier("dict").double()
    x, y = token_data(24)
    model = TwiceDifferentiable(module, LOSSES["dict"], output_transform="logits")
    solver = fit_solver(model, loader(x, y), "ekfac", hessian_regularization=LAMBDA, refine=0)  # EK-FAC alone
    structure = solver.structure
    assert [b.name for b in structure.blocks] == ["emb", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                  "attn.out_proj", "memory", "cross.q_proj", "cross.k_proj",
                                                  "cross.v_proj", "cross.out_proj", "head"]
    assert solver._basis[0][1] is None  # the embedding's diagonal activation factor is never formed
    plain = AttentionClassifier("tensor").double()
    plain.load_state_dict(module.state_dict())
    with second_order_attention():
        ggn = reference_ggn(plain.eval(), x, y)
    fixed = padding_entries(plain)
    ggn[fixed], ggn[:, fixed] = 0, 0  # the padding row is held fixed
    p = model.num_params
    identity = torch.eye(p, dtype=torch.float64)
    rotated = []
    for matrix, (q_s, q_a) in zip(structure.to_matrices(identity), solver._basis):
        rotated.append(q_s.T @ matrix if q_a is None else q_s.T @ matrix @ q_a)
    basis = structure.from_matrices(rotated)  # columns: the Kronecker eigenvectors in θ
    assert torch.allclose(basis.T @ basis, identity, atol=1e-10)
    layer_of = structure.from_matrices([torch.full((1, b.out_features, b.columns), float(i), dtype=torch.float64)
                                        for i, b in enumerate(structure.blocks)])[0]
    same_layer = layer_of[:, None] == layer_of[None, :]
    corrected = torch.diag(basis.T @ (ggn * same_layer) @ basis)
    expected = basis @ torch.diag(corrected) @ basis.T
    assert torch.allclose(solver.curvature_matrix(), expected, atol=1e-10 * float(ggn.abs().max()))
    assert float(solver.curvature_matrix()[fixed].abs().max()) == 0
    rhs = torch.randn(3, p, dtype=torch.float64)
    direct = torch.linalg.solve(expected + LAMBDA * identity, rhs.T).T
    torch.testing.assert_close(solver.solve(rhs).x, direct, rtol=1e-8, atol=1e-10)


def example_loop(module: nn.Module, loss_fn, x: Tensor, y: Tensor, fixed: Tensor) -> Tensor:
    """Per-example gradients by plain autograd, one example at a time (the padding row's entries zero)."""
    rows = []
    for i in range(len(x)):
        loss = loss_fn(module(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(module.parameters()))]))
    return torch.stack(rows).masked_fill(fixed, 0)


def test_per_layer_gradients_of_embeddings_attention_and_sequences_match_autograd():
    module = AttentionClassifier("dataclass").double().eval()
    x, y = token_data(10)
    model = TwiceDifferentiable(module, LOSSES["dataclass"], output_transform="logits")
    assert model.uses_layer_gradients
    with model.evaluating():
        expected = example_loop(module, LOSSES["dataclass"], x, y, padding_entries(module))
        torch.testing.assert_close(model.example_gradients(x, y), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.grad(x, y), expected, rtol=1e-10, atol=1e-12)
    assert model.uses_layer_gradients  # the per-layer form held: no fall-back to vmap
    unpicked = TwiceDifferentiable(module, LOSSES["dataclass"])  # no logits: the vmap path, same values
    with unpicked.evaluating():
        torch.testing.assert_close(unpicked.example_gradients(x, y), expected, rtol=1e-10, atol=1e-12)
    assert not unpicked.uses_layer_gradients


def hessian_products(loss: Callable[[Tensor], Tensor], theta: Tensor, vectors: Tensor) -> Tensor:
    """∇²loss(θ) v for each row v, by plain autograd (double backward), on kernels with second derivatives."""
    with second_order_attention():
        theta = theta.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        return torch.stack([torch.autograd.grad(gradient @ v, theta, retain_graph=True)[0] for v in vectors])


def mean_example_loss(module: nn.Module, loss_fn, x: Tensor, y: Tensor, fixed: Tensor) -> Callable[[Tensor], Tensor]:
    """θ ↦ (1/N) Σᵢ ℓ(zᵢ), each example's loss on its own, with the entries in `fixed` (a padding row) constant."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]

    def mean_loss(flat: Tensor) -> Tensor:
        pieces = torch.where(fixed, flat.detach(), flat).split([shape.numel() for shape in shapes])
        state = {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}
        losses = [loss_fn(functional_call(module, state, (x[i : i + 1],)), y[i : i + 1]) for i in range(len(x))]
        return torch.stack(losses).mean()

    return mean_loss


@pytest.mark.parametrize("decoder", [False, True])
def test_embedding_and_layer_norm_parameters_give_per_example_gradients_and_hvps_of_the_reference(decoder):
    stock = TextClassifier(decoder=decoder).double()
    x, y = token_data(6)
    model = TwiceDifferentiable(stock, F.cross_entropy)
    assert not model.uses_layer_gradients  # LayerNorm: the vmap path
    vectors = torch.randn(3, model.num_params, dtype=torch.float64)
    with model.evaluating():
        fixed = padding_entries(stock)
        torch.testing.assert_close(model.grad(x, y), example_loop(stock, F.cross_entropy, x, y, fixed),
                                   rtol=1e-10, atol=1e-12)
        expected = hessian_products(mean_example_loss(stock, F.cross_entropy, x, y, fixed), model.flat_params(),
                                    vectors)
        torch.testing.assert_close(model.batch_hvp(x, y, vectors), expected, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(vectors @ model.batch_hessian(x, y), expected, rtol=1e-9, atol=1e-11)


# -- sequence losses ------------------------------------------------------------------------------------------
class TokenTagger(nn.Module):
    """A per-token head: logits [B, T, V] in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCABULARY, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCABULARY)

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        hidden = self.emb(tokens)
        return {"logits": self.head(torch.tanh(hidden + self.attn(hidden, hidden, hidden)[0]))}


def token_mean_loss(out: dict[str, Tensor], targets: Tensor) -> Tensor:
    """Cross-entropy averaged over the batch's tokens, padding (-100) left out: a sequence model's usual loss."""
    return F.cross_entropy(out["logits"].flatten(0, 1), targets.flatten(), ignore_index=-100)


def test_sequence_losses_with_ignore_index_are_averaged_per_sequence():
    module = TokenTagger().double().eval()
    x, _ = token_data(6)
    targets = x.roll(1, dims=1).masked_fill(x == 0, -100)  # 0, 1 or 2 padded positions per sequence
    model = TwiceDifferentiable(module, token_mean_loss, output_transform="logits")
    no_fixed_rows = torch.zeros(model.num_params, dtype=torch.bool)
    expected = example_loop(module, token_mean_loss, x, targets, no_fixed_rows)  # each sequence's own loss
    vectors = torch.randn(2, model.num_params, dtype=torch.float64)
    with model.evaluating():
        assert model.uses_layer_gradients
        torch.testing.assert_close(model.example_gradients(x, targets), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.grad(x, targets), expected, rtol=1e-10, atol=1e-12)
        products = hessian_products(mean_example_loss(module, token_mean_loss, x, targets, no_fixed_rows),
                                    model.flat_params(), vectors)
        torch.testing.assert_close(model.batch_hvp(x, targets, vectors), products, rtol=1e-9, atol=1e-11)
        # The same curvature whatever the loader's batch size, though batches hold different numbers of tokens.
        passes = [CurvatureOperator(model, loader(x, targets, size)).matmat(vectors) for size in (2, 6)]
        torch.testing.assert_close(passes[0], passes[1], rtol=1e-9, atol=1e-11)
        token_weighted = hessian_products(
            lambda t: token_mean_loss(functional_call(module, model.unflatten(t), (x,)), targets),
            model.flat_params(), vectors)
    assert float((token_weighted - products).abs().max()) > 1e-3  # the check above tells the two apart


# -- attention settings -----------------------------------------------------------------------------------------
def attention_settings() -> tuple[bool, ...]:
    return (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


@pytest.mark.parametrize("fastpath", [True, False])
def test_attention_settings_are_restored_after_a_computation_also_when_it_raised(text_problem, fastpath):
    stock, train, test = text_problem
    model = TwiceDifferentiable(stock, F.cross_entropy)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # the user's choice
            users = attention_settings()
            with model.evaluating():
                assert attention_settings() == (False, False, False, True)
            assert attention_settings() == users
            with pytest.raises(RuntimeError, match="stop"), model.evaluating():
                raise RuntimeError("stop")
            assert attention_settings() == users
            compute_influence_factors(model, train, test, "cg", hessian_perturbation=LAMBDA, maxiter=2)
            assert attention_settings() == users
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@pytest.mark.parametrize("batch_first, kdim, extra_keys", list(itertools.product([True, False], [None, 3], [False, True])))
def test_explicit_multi_head_attention_equals_the_module(batch_first, kdim, extra_keys):
    module = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                   add_bias_kv=extra_keys, add_zero_attn=extra_keys).double().eval()
    query = torch.randn(3, 4, WIDTH, dtype=torch.float64)
    key = torch.randn(3, 5, kdim or WIDTH, dtype=torch.float64)
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(4, 5, dtype=torch.bool), 1)
    recorded = []
    for options in [{}, {"key_padding_mask": padding, "attn_mask": causal, "need_weights": False},
                    {"attn_mask": torch.randn(6, 4, 5, dtype=torch.float64), "average_attn_weights": False}]:
        with second_order_attention():
            expected = module(query, key, key, **options)
        found = multi_head_attention(module, lambda *record: recorded.append(record), query, key, key, **options)
        torch.testing.assert_close(found[0], expected[0], rtol=1e-12, atol=1e-12)
        assert (found[1] is None) == (expected[1] is None)
        if found[1] is not None:
            torch.testing.assert_close(found[1], expected[1], rtol=1e-12, atol=1e-12)
    assert [role for role, *_ in recorded] == [0, 1, 2] * 3


# -- output_transform: through the callback, the grammar and its errors -------------------------------------------
def test_the_callback_passes_output_transform_to_the_model(tmp_path):
    from lit_helpers import Classifier, blobs, loaders, make_trainer

    class DictClassifier(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.loss_fn = LOSSES["dict"]

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.net(x), "features": x}

    callback = InfluenceCallback(output_transform="logits", curvature="ggn", method="cg", num_queries=2,
                                 hessian_regularization=LAMBDA, top_k=2)
    module = DictClassifier()
    make_trainer(tmp_path, logger=False, callbacks=[callback], epochs=1).fit(module, *loaders(*blobs(24), *blobs(4)))
    x_val, y_val = blobs(4)
    train, test = DataLoader(TensorDataset(*blobs(24)), batch_size=8), loader(x_val[:2], y_val[:2])
    model = TwiceDifferentiable(module, LOSSES["dict"], output_transform="logits")
    expected = compute_influences(model, train, test_data=test, inversion_method="cg", curvature="ggn",
                                  hessian_regularization=LAMBDA)
    torch.testing.assert_close(callback.result.scores, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="output_transform='logits!' is not a key or attribute name"):
        InfluenceCallback(output_transform="logits!")


@pytest.mark.parametrize("value, error, message", [
    (3, TypeError, "output_transform must be None, a string or a callable, got 3"),
    ("", ValueError, "output_transform='' is not a key or attribute name such as 'logits', an index such as '0'"),
    ("1.5", ValueError, "output_transform='1.5' is not a key"),
    ("no_such_package_xyz.pick", ValueError, "output_transform='no_such_package_xyz.pick' cannot be imported"),
    ("math.pi", TypeError, "output_transform='math.pi' names a float, which is not callable"),
])
def test_bad_output_transforms_are_refused_where_they_enter(value, error, message):
    with pytest.raises(error, match=message):
        TwiceDifferentiable(TextClassifier().double(), F.cross_entropy, output_transform=value)


@pytest.mark.parametrize("kind, transform, error, message", [
    ("dict", "scores", ValueError, r"output_transform='scores' finds nothing in the model's output, a dict with keys "
                                   r"\['logits', 'hidden_states'\]"),
    ("tuple", "2", ValueError, "output_transform='2' finds nothing in the model's output, a tuple of 2 items"),
    ("dataclass", "loss", TypeError, "output_transform='loss' picks a NoneType .* not a tensor of logits"),
    ("dict", lambda out: out["logits"] * 1, TypeError, "must return a tensor that the model's output holds"),
    ("dict", None, TypeError, "curvature='ggn' needs the loss as a function of one tensor of logits, but the model "
                              "returns dict; pass output_transform="),
])
def test_output_transforms_that_pick_no_logits_say_what_to_pass(text_problem, kind, transform, error, message):
    stock, train, test = text_problem
    module = TextClassifier(kind).double()
    module.load_state_dict(stock.state_dict())
    model = TwiceDifferentiable(module, LOSSES[kind], output_transform=transform)
    with pytest.raises(error, match=message):
        compute_influence_factors(model, train, test, "cg", hessian_perturbation=LAMBDA, curvature="ggn")


def test_ekfac_without_logits_says_what_to_pass(text_problem):
    stock, train, _ = text_problem
    module = TextClassifier("tuple").double()
    module.load_state_dict(stock.state_dict())
    model = TwiceDifferentiable(module, LOSSES["tuple"], params="head.*")
    with pytest.raises(TypeError, match="EK-FAC needs the loss as a function of one tensor .* returns tuple"):
        fit_solver(model, train, "ekfac", hessian_regularization=LAMBDA)
