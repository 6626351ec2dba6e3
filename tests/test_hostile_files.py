"""Loading never runs code from a file: hostile training checkpoints and artifacts are refused
with an error naming the problem, and the file a payload would create never appears.

Every payload here is proven live first: a fresh Python process unpickles it, or hands the
hostile program to plain ``torch.export.load(f).module()``, and the payload's marker file
appears. Only then is pysparse shown to refuse the same file without the marker appearing, so a
test whose payload were a dud could not pass. Artifact edits rewrite the manifest to match (sizes
and sha256), as an attacker would."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_models import bert_with_batches

import pysparse
from pysparse.artifacts.store import ArtifactError
from pysparse.learning.train import TrainConfig, Trainer


class _CreatesFile:
    """Unpickling this object opens ``path`` for writing, which creates it: a harmless stand-in
    for "runs any code"."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_CreatesFile(marker), buf)  # a torch.save zip, as torch.load expects
    return buf.getvalue()


def _run_python(code: str, *args: str) -> None:
    """Runs ``code`` in a fresh interpreter; its errors are expected (a payload's return value
    breaks whatever loads it) and ignored: the marker file is what counts."""
    # Not from the repository root: `python -c` puts the working directory first on sys.path, and
    # there `import pysparse` would find the source folder (no compiled _C, no ops registered).
    subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        capture_output=True,
        timeout=120,
        cwd=Path(tempfile.gettempdir()),
    )


def _prove_unpickling_creates(payload: Path, marker: Path) -> None:
    _run_python("import sys, torch; torch.load(sys.argv[1], weights_only=False)", str(payload))
    assert marker.exists(), "the payload is a dud: unpickling it did not create the marker"
    marker.unlink()


def _prove_torch_export_load_runs(program: Path, marker: Path) -> None:
    _run_python(
        "import sys, torch, pysparse\ntorch.export.load(sys.argv[1]).module()\n", str(program)
    )
    assert marker.exists(), "the payload is a dud: plain torch.export.load did not run it"
    marker.unlink()


# ---- training checkpoints -----------------------------------------------------------------------
def _trainer(checkpoint_dir: Path, crash_at: int | None = None) -> Trainer:
    """Four AdamW steps on a two-element weight, checkpointed every two; ``crash_at``: the loss
    call that raises, as a crash mid-run would."""
    w = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    calls = [0]

    def loss(b):
        calls[0] += 1
        if calls[0] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        return ((w - b) ** 2).sum(), {}

    return Trainer(
        {"w": w},
        loss,
        [torch.tensor([1.0, 2.0])],
        TrainConfig(steps=4, lr=0.1, checkpoint_dir=str(checkpoint_dir), checkpoint_every=2),
    )


def test_checkpoint_round_trips_without_pickle(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, crash_at=4).run()  # in step 3, after the checkpoint of step 2
    ckpt = tmp_path / "checkpoint.safetensors"
    assert ckpt.is_file() and not (tmp_path / "checkpoint.pt").exists()
    assert not zipfile.is_zipfile(ckpt)  # not a torch.save archive
    resumed = _trainer(tmp_path)
    resumed.run()
    assert resumed.resumed_from == 2
    straight = _trainer(tmp_path / "other")
    straight.run()
    assert torch.equal(resumed.params["w"], straight.params["w"])
    assert resumed.history == straight.history
    state = resumed.optimizer.state_dict()
    assert state["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again after JSON
    assert torch.equal(
        state["state"][0]["exp_avg"], straight.optimizer.state_dict()["state"][0]["exp_avg"]
    )


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "marker"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    payload = tmp_path / "payload.bin"  # torch.load hands *.safetensors to safetensors
    payload.write_bytes(_pickle_payload(marker))
    _prove_unpickling_creates(payload, marker)
    shutil.copy(payload, ckpt_dir / name)
    # checkpoint.pt: the old pickle checkpoint, refused unopened; checkpoint.safetensors holding a
    # pickle: not safetensors, refused by the parser.
    want = "older pysparse, a pickle" if name == "checkpoint.pt" else "not a safetensors file"
    with pytest.raises(RuntimeError, match=f"{name}.*{want}.*delete it"):
        _trainer(ckpt_dir).run()
    assert not marker.exists()


def test_checkpoint_with_bad_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint.safetensors"
    meta = {"format": "pysparse-checkpoint", "version": "1", "state": "{not json"}
    save_file({"param/w": torch.zeros(2)}, str(ckpt), metadata=meta)
    with pytest.raises(RuntimeError, match="state is not JSON"):
        _trainer(tmp_path).run()
    meta["state"] = json.dumps({"step": 2, "fingerprint": "x"})
    save_file({}, str(ckpt), metadata=meta)
    with pytest.raises(RuntimeError, match="incomplete: no param/w"):
        _trainer(tmp_path).run()


# ---- artifacts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, batches = bert_with_batches(1)
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], *batches[0])
    out = pysparse.save(sm, tmp_path_factory.mktemp("good") / "art")
    expected = sm(*batches[0][0], **batches[0][1]).last_hidden_state
    return out, batches[0], expected


def _copy(artifact_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifact_dir, dst)
    return dst


def _edit_program(art: Path, edit) -> None:
    """Rewrites ``program.pt2`` with ``edit({member: bytes})`` (member names without the archive's
    top folder), then the manifest's size and sha256 to match."""
    path = art / "program.pt2"
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data)
    _match_manifest(art, "program.pt2")


def _match_manifest(art: Path, name: str) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    data = (art / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (art / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(members: dict, name: str, edit) -> None:
    doc = json.loads(members[name])
    edit(doc)
    members[name] = json.dumps(doc).encode()


def _first_expr(doc) -> dict:
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "expr_str" in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError("the program has no symbolic size (was it captured with dynamic dims?)")


def _pickled_weight(marker):
    def edit(m):
        def flag(cfg):
            name = next(iter(cfg["config"]))
            cfg["config"][name]["use_pickle"] = True
            m["data/weights/" + cfg["config"][name]["path_name"]] = _pickle_payload(marker)

        _edit_json(m, "data/weights/model_weights_config.json", flag)

    return edit


def _pickled_sample_inputs(marker):
    def edit(m):
        # torch tries weights_only=True, which refuses io.open, then retries without it
        m["data/sample_inputs/model.pt"] = _pickle_payload(marker)

    return edit


def _sympy_eval(marker):
    def edit(m):
        def inject(doc):
            node = _first_expr(doc)
            node["expr_str"] = f"__import__('io').open({str(marker)!r}, 'w') and {node['expr_str']}"

        _edit_json(m, "models/model.json", inject)

    return edit


def _input_name(marker):
    def edit(m):
        # fx writes the last input's name into `def forward(self, ..., attention_mask)`: as
        # `attention_mask=open(...)` it is a default value, evaluated when the source is exec'd
        hostile = f"attention_mask=__import__('io').open({str(marker)!r}, 'w')"
        text = m["models/model.json"].decode()
        m["models/model.json"] = text.replace('"attention_mask"', json.dumps(hostile)).encode()

    return edit


# (edit, proven with plain torch.export.load, what the error must say)
HOSTILE_PROGRAMS = {
    "use_pickle weight": (_pickled_weight, True, "weight_0 with weights_only=False"),
    "pickled sample inputs": (_pickled_sample_inputs, True, "sample_inputs/model.pt is not empty"),
    "sympy expression": (_sympy_eval, True, "expr_str .*sympy.sympify"),
    "input name": (_input_name, True, "attention_mask=.*not a dotted name"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PROGRAMS))
def test_hostile_program_is_refused_before_torch_reads_it(artifact, tmp_path, case):
    make_edit, proven, message = HOSTILE_PROGRAMS[case]
    marker = tmp_path / "marker"
    art = _copy(artifact[0], tmp_path)
    _edit_program(art, make_edit(marker))
    if proven:
        _prove_torch_export_load_runs(art / "program.pt2", marker)
    with pytest.raises(ArtifactError, match=f"program.pt2 .*{message}.*Refused"):
        pysparse.load(art)
    assert not marker.exists()


def test_program_members_beyond_a_plain_program_are_refused(artifact, tmp_path):
    """Not proven live (no real shared library or TorchBind class here); see pysparse.artifacts.pt2check
    for what torch would do with each."""
    cases = {
        "data/aotinductor/model/model.so": (b"\x7fELF", "AOTInductor code"),
        "data/weights/model.pt": (b"", "a pickle"),
        "extra/notes.txt": (b"hi", "pysparse loads no archive that carries more"),
    }
    for member, (data, message) in cases.items():
        art = _copy(artifact[0], tmp_path / member.replace("/", "_"))
        _edit_program(art, lambda m, member=member, data=data: m.__setitem__(member, data))
        with pytest.raises(ArtifactError, match=f"member {member} .*{message}"):
            pysparse.load(art)

    def opaque_constant(m):
        def add(cfg):
            cfg["config"]["blob"] = {"path_name": "opaque_obj_0", "is_param": False,
                                     "use_pickle": False, "tensor_meta": None}  # fmt: skip

        _edit_json(m, "data/constants/model_constants_config.json", add)

    def guard_code(m):
        _edit_json(m, "models/model.json", lambda d: d.__setitem__("guards_code", ["True"]))

    def os_call(m):
        text = m["models/model.json"].decode()
        m["models/model.json"] = text.replace('"torch.ops.aten.', '"torch.os.system.', 1).encode()

    for edit, message in [
        (opaque_constant, "stored as 'opaque_obj_0'"),
        (guard_code, "carries guards_code"),
        (os_call, "not an operator"),
    ]:
        art = _copy(artifact[0], tmp_path / edit.__name__)
        _edit_program(art, edit)
        with pytest.raises(ArtifactError, match=message):
            pysparse.load(art)


def test_example_input_names_that_would_become_code_are_refused(artifact, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    marker = tmp_path / "marker"
    art = _copy(artifact[0], tmp_path)
    path = art / "example_inputs.safetensors"
    with safe_open(str(path), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    # pysparse.export writes `def forward(self, input0, kw_<name>)` and exec()s it: with this
    # name the default value `open(...)` would be evaluated right there.
    hostile = f"x=__import__('io').open({str(marker)!r}, 'w')"
    layout["kwargs"] = {hostile: layout["kwargs"]["attention_mask"]}
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})
    _match_manifest(art, "example_inputs.safetensors")
    with pytest.raises(ArtifactError, match="keyword input .* is not a Python name"):
        pysparse.load(art)
    from pysparse.artifacts.export import _named

    with pytest.raises(ValueError, match="is not a Python name"):
        _named(torch.nn.Identity(), 1, [hostile])
    assert not marker.exists()


def test_clean_artifact_passes_the_check_and_runs(artifact):
    out, (args, kwargs), expected = artifact
    loaded = pysparse.load(out)
    torch.testing.assert_close(loaded(*args, **kwargs).last_hidden_state, expected)
    assert loaded.example_kwargs.keys() == {"attention_mask"}
    with zipfile.ZipFile(out / "program.pt2") as z:
        sample = [i for i in z.infolist() if i.filename.endswith("sample_inputs/model.pt")]
        assert [i.file_size for i in sample] == [0]  # no pickle anywhere in the program
