"""Resumable scoring: an interrupted run, started again, ends bit-identical to an uninterrupted one; a partial
run never loads as complete; a folder of another run is refused with the reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_data, fitted, mlp_model
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceResult, TwiceDifferentiable
from lightning_influence import IndexedData, InfluenceArguments, ResultMismatchError, compute_influence

N, QUERIES = 96, 5
OPTIONS = dict(method="direct", hessian_regularization=0.05, batch_size=16, chunk_batches=1, self_influence=True)


class Interrupted(KeyboardInterrupt):
    """Raised from the progress hook to stop a run part way, as Ctrl-C would."""


@pytest.fixture(scope="module")
def trained():
    x, y = classification_data(N)
    return fitted(mlp_model(), x, y, steps=50), x, y


def _run(trained, folder: Path, on_chunk=None, module=None, train_indices=None, **overrides) -> InfluenceResult:
    base, x, y = trained
    model = TwiceDifferentiable(module if module is not None else base, F.cross_entropy)
    options = {**OPTIONS, **overrides}
    return compute_influence(model, IndexedData(TensorDataset(x, y)), IndexedData(TensorDataset(x[:QUERIES], y[:QUERIES])),
                             InfluenceArguments(**options), save_dir=folder, on_chunk=on_chunk,
                             train_indices=train_indices)


def _stop_at(stage: str, chunk: int):
    seen = []

    def hook(current: str, index: int, total: int) -> None:
        seen.append((current, index))
        if (current, index) == (stage, chunk):
            raise Interrupted(f"stopped after {stage} chunk {chunk} of {total}")

    return hook, seen


def _assert_bit_identical(a: InfluenceResult, b: InfluenceResult) -> None:
    for name in ("scores", "train_indices", "query_indices", "factors", "self_influence"):
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype and left.shape == right.shape, name
        assert torch.equal(left, right), f"{name} differs after resuming"


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    return _run(trained, tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize("stage, chunk", [("scores", 2), ("self_influence", 3)])
def test_interrupted_run_resumes_bit_identical(trained, uninterrupted, tmp_path, stage, chunk):
    hook, seen = _stop_at(stage, chunk)
    with pytest.raises(Interrupted):
        _run(trained, tmp_path, on_chunk=hook)
    assert not (tmp_path / "result").exists()
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        InfluenceResult.load(tmp_path / "result")
    assert (tmp_path / "partial" / "factors.npy").is_file()  # the factors were stored as soon as they existed

    resumed_hook, resumed_seen = _stop_at("never", -1)
    resumed = _run(trained, tmp_path, on_chunk=resumed_hook)
    # only the chunks the interrupted run did not finish were computed again
    assert not set(seen) & set(resumed_seen)
    assert len(seen) + len(resumed_seen) == 2 * (N // 16)
    _assert_bit_identical(uninterrupted, resumed)
    assert resumed.metadata["resumed"] is True and uninterrupted.metadata["resumed"] is False
    _assert_bit_identical(uninterrupted, InfluenceResult.load(tmp_path / "result"))
    assert not (tmp_path / "partial").exists()  # cleaned up once the result is in place


def test_killed_process_resumes_bit_identical(trained, uninterrupted, tmp_path):
    module, _, _ = trained
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch, torch.nn.functional as F
        from torch.utils.data import TensorDataset
        from helpers import classification_data, mlp_model
        from lightning_influence import TwiceDifferentiable
        from lightning_influence import IndexedData, InfluenceArguments, compute_influence
        torch.set_num_threads({torch.get_num_threads()})
        module = mlp_model()
        module.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}))
        x, y = classification_data({N})

        def die(stage, chunk, total):
            if (stage, chunk) == ("scores", 3):
                os._exit(3)  # no cleanup at all, as if the process were killed

        compute_influence(TwiceDifferentiable(module, F.cross_entropy), IndexedData(TensorDataset(x, y)),
                          IndexedData(TensorDataset(x[:{QUERIES}], y[:{QUERIES}])), InfluenceArguments(**{OPTIONS!r}),
                          save_dir={str(tmp_path / "run")!r}, on_chunk=die)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 3, process.stderr
    with pytest.raises(FileNotFoundError):
        InfluenceResult.load(tmp_path / "run" / "result")
    finished = sorted(p.name for p in (tmp_path / "run" / "partial" / "rank0-of-1").glob("scores-*.npy"))
    assert finished == [f"scores-{c:06d}.npy" for c in range(4)]
    _assert_bit_identical(uninterrupted, _run(trained, tmp_path / "run"))


def test_a_half_written_chunk_is_not_trusted(trained, uninterrupted, tmp_path):
    hook, _ = _stop_at("scores", 1)
    with pytest.raises(Interrupted):
        _run(trained, tmp_path, on_chunk=hook)
    rank_dir = tmp_path / "partial" / "rank0-of-1"
    # a crash during a write leaves only a temporary file; a chunk file not listed in the progress file is ignored
    (rank_dir / ".scores-000002.npy.tmp-1-deadbeef").write_bytes(b"\x93NUMPY garbage")
    (rank_dir / "scores-000003.npy").write_bytes(b"garbage")
    _assert_bit_identical(uninterrupted, _run(trained, tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hessian_regularization=0.1), "hessian_regularization: stored 0.05, now 0.1"),
        (dict(method="cg"), "method: stored 'direct', now 'cg'"),
        (dict(batch_size=8), "batch_size: stored 16, now 8"),
        (dict(train_indices=list(range(N - 1))), "num_train: stored 96, now 95"),
    ],
)
def test_a_different_run_is_refused(trained, tmp_path, change, message):
    hook, _ = _stop_at("scores", 0)
    with pytest.raises(Interrupted):
        _run(trained, tmp_path, on_chunk=hook)
    with pytest.raises(ResultMismatchError, match="different run") as error:
        _run(trained, tmp_path, **change)
    assert message in str(error.value) and "delete that folder" in str(error.value)


def test_other_weights_are_refused_for_partial_and_complete_runs(trained, tmp_path):
    base, _, _ = trained
    other = mlp_model()
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        other[0].bias[0] += 1e-6
    hook, _ = _stop_at("scores", 0)
    with pytest.raises(Interrupted):
        _run(trained, tmp_path / "partial_run", on_chunk=hook)
    with pytest.raises(ResultMismatchError, match=r"model weights \(parameter hash\)"):
        _run(trained, tmp_path / "partial_run", module=other)
    complete = _run(trained, tmp_path / "complete_run")
    with pytest.raises(ResultMismatchError, match=r"model weights \(parameter hash\)"):
        _run(trained, tmp_path / "complete_run", module=other)
    # the complete result is untouched by the refused run, and the same run reuses it without recomputing
    hook, seen = _stop_at("never", -1)
    again = _run(trained, tmp_path / "complete_run", on_chunk=hook)
    assert seen == []
    _assert_bit_identical(complete, again)
