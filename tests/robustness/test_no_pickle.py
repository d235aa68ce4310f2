"""Loading never executes code from a checkpoint: no pickle on any path.

A static scan of src/deepmoe (no pickle-family imports, no torch.save, torch.load only with
weights_only=True, no np.load(allow_pickle=True)); a trainer checkpoint holds only safetensors and
JSON; loading and resuming run with every unpickler disabled; a pickle payload planted next to the
weights is never run.
"""

from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path

import pytest
import torch

import deepmoe
from configs import tiny_preset
from deepmoe.io import CheckpointError
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.train import checkpoint as train_ckpt
from deepmoe.train.trainer import TrainConfig, resume, train

# cpu_only: pickle scans of files on disk
pytestmark = pytest.mark.cpu_only

SRC = Path(deepmoe.__file__).parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kwarg(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems_in(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    where = lambda node: f"{path.relative_to(root.parent)}:{node.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{where(node)}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES or (
                module == "torch" and any(a.name in ("load", "save") for a in node.names)
            ):
                found.append(f"{where(node)}: from {module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.save") or name in ("save", "torch.save"):
                if name != "save":  # a bare save() is someone else's function
                    found.append(f"{where(node)}: {name}")
            elif name.endswith("torch.load") and not _is_true(_kwarg(node, "weights_only")):
                found.append(f"{where(node)}: {name} without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and _is_true(_kwarg(node, "allow_pickle")):
                found.append(f"{where(node)}: {name}(allow_pickle=True)")
            elif name.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where(node)}: {name}")
    return found


def test_scanner_catches_what_it_should(tmp_path, ledger):
    bad = tmp_path / "deepmoe" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle\nimport torch, numpy as np\nfrom torch import load\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.save({}, 'x')\n"
        "np.load('x', allow_pickle=True)\npickle.loads(b'')\n"
        "torch.load('x', weights_only=True)\nnp.load('x')\n"
    )
    found = problems_in(bad, root=bad.parent)
    ledger.record("pickle", "ok" if len(found) == 7 else "crash", f"scanner self-test: {found}")
    assert len(found) == 7, found


def test_no_pickle_in_the_source(ledger):
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        problems = problems_in(path)
        ledger.record("pickle", "crash" if problems else "ok", f"{path.name}: {problems}")
        found += problems
    assert not found, found


# ---- a trainer checkpoint, loaded and resumed with every unpickler disabled ---------------------------------


def _refuse(*args, **kwargs):
    raise AssertionError("an unpickler was called while loading a checkpoint")


class _RefusingUnpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _refuse()


@pytest.fixture
def no_unpickling(monkeypatch):
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _RefusingUnpickler)
    monkeypatch.setattr(torch, "load", _refuse)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    words = "alpha beta gamma delta river stone cloud light night tree water fire moon sun bird fish".split()
    r = random.Random(1)
    for i in range(2):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(500)))
    return root


def test_trainer_checkpoint_is_safetensors_and_json_only(tmp_path, monkeypatch, text_dir, ledger, no_unpickling):
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = TrainConfig(
        preset="tiny-v3",
        layers=1,
        hidden_size=64,
        seq_len=32,
        batch_size=4,
        steps=2,
        save_every=1,
        eval_every=0,
        vocab_size=300,
        out=str(out),
        data=str(text_dir),
        progress=False,
        device="cpu",
    )
    train(config)
    for step_dir in sorted(out.glob("step-*")):
        for path in step_dir.iterdir():
            safe = path.suffix in (".safetensors", ".json")
            ledger.record("pickle", "ok" if safe else "crash", f"{step_dir.name}/{path.name}")
            assert safe, path
    # reading it back (weights, training state, a resume) never unpickles
    from_pretrained(out / "step-2")
    train_ckpt.read_training_state(out / "step-2")
    assert resume(out, steps=3).step == 3
    ledger.record("pickle", "ok", "load + resume with pickle.load/loads/Unpickler and torch.load disabled")


class Payload:
    """Unpickling this runs `Path.touch` on the sentinel: code execution."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "training_state.pt", "optimizer.pt"])
def test_planted_pickle_is_never_run(name, tmp_path, ledger):
    sentinel = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    config = tiny_preset(num_hidden_layers=1, num_nextn_predict_layers=0)
    DeepSeekForCausalLM(config).save_pretrained(ckpt)
    if name in ("pytorch_model.bin", "model.pt"):
        (ckpt / "model.safetensors").unlink()  # only the pickle is left to load
    (ckpt / name).write_bytes(pickle.dumps(Payload(sentinel)))
    try:
        from_pretrained(ckpt)
        outcome = "ok"
    except CheckpointError as err:
        outcome = "clear_error"
        assert "\n" not in str(err) and name in str(err), err
    ran = sentinel.exists()
    ledger.record("pickle", "crash" if ran else outcome, f"planted {name}: {'executed' if ran else 'not executed'}")
    assert not ran
    assert (outcome == "clear_error") == (name in ("pytorch_model.bin", "model.pt"))
